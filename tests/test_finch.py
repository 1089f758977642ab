"""FINCH hierarchy, its graph, the constrained (post-clustering) variant and the fixed-count mode, against the float64
oracle in localize_oracle.py (dense distances, (K+I)(K+I)^T, scipy components, pixel union-find)."""

import localize_oracle as oracle
import numpy as np
import pytest
import torch

from concept_express.uce_core.finch import (
    Graph,
    KernelOptions,
    constrained_finch,
    finch,
    finch_with_count,
    shared_neighbour_pairs,
)


def segment_image(rng, grid, count):
    """A Voronoi partition of the grid into ``count`` segments."""
    h, w = grid
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    centres = rng.uniform(0, 1, size=(count, 2)) * [h, w]
    return np.argmin((ys[..., None] - centres[:, 0]) ** 2 + (xs[..., None] - centres[:, 1]) ** 2, axis=-1)


def block_rows(rng, segments, sharp=4.0, noise=0.7, reach=0.3):
    """Rows that put most mass on their own segment and on nearby cells, with independent noise per entry (float32
    distributions). The spatial term gives FINCH several levels inside each segment."""
    seg = segments.ravel()
    h, w = segments.shape
    ys, xs = np.divmod(np.arange(seg.size), w)
    near = ((ys[:, None] - ys[None, :]) ** 2 + (xs[:, None] - xs[None, :]) ** 2) / (2 * (reach * max(h, w)) ** 2)
    logits = sharp * (seg[:, None] == seg[None, :]) - near + noise * rng.normal(size=(seg.size, seg.size))
    e = np.exp(logits - logits.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def assert_safe(rows, levels):
    """Fixture precondition: at every level each node's best neighbour beats its second best by a relative 1e-4 (tens
    of times the float32 error of the distances at these sizes), so float32 and float64 argmins cannot differ."""
    nodes = rows.astype(np.float64)
    assert oracle.nearest_gap(nodes) > 1e-4
    for labels in levels[:-1]:
        assert oracle.nearest_gap(oracle.means(nodes, labels)) > 1e-4


@pytest.mark.parametrize("seed,grid,segments", [(0, (16, 16), 6), (1, (12, 20), 9), (2, (20, 20), 4)])
def test_hierarchy_matches_float64_oracle(seed, grid, segments):
    rng = np.random.default_rng(seed)
    rows = block_rows(rng, segment_image(rng, grid, segments))
    levels, counts, _ = oracle.finch(rows)
    assert_safe(rows, levels)
    ours = finch(torch.from_numpy(rows))
    assert ours.counts == counts
    assert len(counts) >= 2
    for level, expected in zip(ours.levels, levels):
        np.testing.assert_array_equal(level.labels.numpy(), expected)


def test_reference_mode_kernel_gives_the_same_hierarchy():
    rng = np.random.default_rng(3)
    rows = torch.from_numpy(block_rows(rng, segment_image(rng, (16, 16), 5)))
    fast, ref = finch(rows), finch(rows, KernelOptions(mode="reference"))
    assert fast.counts == ref.counts
    for a, b in zip(fast.levels, ref.levels):
        assert torch.equal(a.labels, b.labels)


def test_cluster_rows_are_means_of_the_original_rows_not_means_of_means():
    rng = np.random.default_rng(4)
    rows = block_rows(rng, segment_image(rng, (16, 16), 6))
    hierarchy = finch(torch.from_numpy(rows))
    assert len(hierarchy.levels) >= 2
    for index, level in enumerate(hierarchy.levels):
        expected = oracle.means(rows.astype(np.float64), level.labels.numpy())
        # atol: entries below the kernels' floor 2^-24 are raised to it before anything else
        np.testing.assert_allclose(
            hierarchy.centroids(index, torch.from_numpy(rows)).numpy(), expected, rtol=1e-5, atol=2.0**-24
        )


def test_graph_edges_are_the_reference_adjacency_with_counts_and_distances():
    rng = np.random.default_rng(5)
    nodes = rng.dirichlet(np.full(24, 0.5), size=40).astype(np.float32)
    kappa, d = oracle.first_neighbours(nodes)
    adj = oracle.adjacency(kappa)
    graph = Graph(torch.from_numpy(kappa), torch.from_numpy(d[np.arange(40), kappa]).float())
    edges = graph.edges(torch.from_numpy(nodes))
    got = np.zeros_like(adj)
    got[edges.src.numpy(), edges.dst.numpy()] = edges.count.numpy()
    np.testing.assert_array_equal(got + got.T, adj)  # every edge exactly once, with its count
    np.testing.assert_allclose(edges.distance.numpy(), d[edges.src.numpy(), edges.dst.numpy()], rtol=1e-5)
    assert (edges.count == 2).sum() == (adj == 2).sum() / 2 > 0  # mutual pairs exist in this fixture
    first_only = graph.edges()  # without node rows: the edges i - kappa_i only, a mutual pair once
    assert len(first_only.src) == 40 - (adj == 2).sum() / 2
    assert bool((first_only.dst == graph.kappa[first_only.src]).all())


@pytest.mark.parametrize("kappa", [[1, 0, 0, 0, 0, 2], [3, 3, 3, 0, 0, 1, 1, 1], [1, 0], [2, 2, 0, 0, 0, 0, 0, 0]])
def test_shared_neighbour_pairs_brute_force(kappa):
    k = torch.tensor(kappa)
    p, q = shared_neighbour_pairs(k)
    got = sorted(tuple(sorted(t)) for t in zip(p.tolist(), q.tolist()))
    expected = [(i, j) for i in range(len(kappa)) for j in range(i + 1, len(kappa)) if kappa[i] == kappa[j]]
    assert got == expected


def tiles(grid, tile, missing=()):
    """Label image of square tiles (row-major ids), with some tiles left out (-1); returns image and masks."""
    h, w = grid
    ids = (np.arange(h)[:, None] // tile) * (w // tile) + np.arange(w)[None, :] // tile
    kept = [t for t in range(ids.max() + 1) if t not in missing]
    remap = np.full(ids.max() + 1, -1)
    remap[kept] = np.arange(len(kept))
    image = remap[ids]
    masks = np.stack([image == c for c in range(len(kept))])
    return image, masks


def constrained_case(seed, delta_quantile=None, gaps=10):
    """Candidate regions = 2x2 tiles of a 16x16 grid, some left out; each tile's row mixes its Voronoi region's
    pattern, a smooth spatial trend and noise, so that neighbours in feature space are often not spatial neighbours.
    delta (optional) is a quantile of the level-0 first-neighbour distances."""
    rng = np.random.default_rng(seed)
    image, masks = tiles((16, 16), 2, missing=set(rng.choice(64, size=gaps, replace=False).tolist()))
    k = len(masks)
    cy, cx = np.array([np.argwhere(m).mean(0) for m in masks]).T / 16
    region = segment_image(rng, (8, 8), 4).ravel()[
        [int(np.argwhere(m)[0][0] // 2 * 8 + np.argwhere(m)[0][1] // 2) for m in masks]
    ]
    logits = (
        2.0 * rng.normal(size=(4, 32))[region]
        + np.outer(cy, rng.normal(size=32))
        + np.outer(cx, rng.normal(size=32))
        + 0.5 * rng.normal(size=(k, 32))
    )
    feats = np.exp(logits - logits.max(1, keepdims=True))
    feats = (feats / feats.sum(1, keepdims=True)).astype(np.float32)
    delta = None
    if delta_quantile is not None:
        kappa, d = oracle.first_neighbours(feats)
        delta = float(np.quantile(d[np.arange(k), kappa], delta_quantile))
    return feats, image, masks, delta


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_constrained_matches_oracle_and_the_constraint_matters(seed):
    feats, image, masks, _ = constrained_case(seed)
    levels, counts, _ = oracle.finch(feats, masks=masks)
    ours = constrained_finch(torch.from_numpy(feats), torch.from_numpy(image), None)
    assert ours.counts == counts
    for level, expected in zip(ours.levels, levels):
        np.testing.assert_array_equal(level.labels.numpy(), expected)
    free, _, _ = oracle.finch(feats)
    assert not np.array_equal(free[0], levels[0])  # without touching, level 0 would differ
    final = ours.levels[-1].labels.numpy()
    for c in range(final.max() + 1):  # every final region is spatially connected through touching tiles
        assert oracle.count_components(masks[final == c].any(0)) == 1


@pytest.mark.parametrize("seed,quantile", [(0, 0.5), (1, 0.7), (5, 0.5), (9, 0.7)])
def test_delta_cuts_edges_like_the_oracle(seed, quantile):
    feats, image, masks, delta = constrained_case(seed, quantile)
    levels, counts, _ = oracle.finch(feats, min_sim=delta, masks=masks)
    ours = constrained_finch(torch.from_numpy(feats), torch.from_numpy(image), delta)
    assert ours.counts == counts
    for level, expected in zip(ours.levels, levels):
        np.testing.assert_array_equal(level.labels.numpy(), expected)
    uncut = constrained_finch(torch.from_numpy(feats), torch.from_numpy(image), None)
    assert ours.counts[-1] > uncut.counts[-1]  # the cut kept some touching neighbours apart


@pytest.mark.parametrize("seed,quantile", [(0, None), (1, 0.5)])
def test_a_level_with_exactly_one_merge_is_kept_and_ends_the_loop(seed, quantile):
    """The reference keeps a level that has one cluster fewer than the level before and stops there."""
    feats, image, masks, delta = constrained_case(seed, quantile)
    levels, counts, _ = oracle.finch(feats, min_sim=delta, masks=masks)
    assert len(counts) >= 3 and counts[-2] - counts[-1] == 1 and all(a - b > 1 for a, b in zip(counts, counts[1:-1]))
    ours = constrained_finch(torch.from_numpy(feats), torch.from_numpy(image), delta)
    assert ours.counts == counts
    np.testing.assert_array_equal(ours.levels[-1].labels.numpy(), levels[-1])


def reference_with_count(rows, count):
    """FINCH's req_clust, written from the reference's description: from the last level with >= count clusters,
    merge the closest first-neighbour pair of centroids, one pair at a time."""
    levels, counts, _ = oracle.finch(rows)
    if count in counts:
        return levels[counts.index(count)]
    if count > counts[0]:
        return levels[0]
    labels = levels[max(i for i, c in enumerate(counts) if c >= count)]
    while labels.max() + 1 > count:
        kappa, d = oracle.first_neighbours(oracle.means(rows.astype(np.float64), labels))
        i = int(np.argmin(d[np.arange(len(kappa)), kappa]))
        j = kappa[i]
        labels = oracle.canonical(np.where(labels == max(i, j), min(i, j), labels))
    return labels


@pytest.mark.parametrize("count", [1, 2, 3, 5, 7, 40, 10_000])
def test_fixed_count_mode_matches_the_reference_rule(count):
    rng = np.random.default_rng(6)
    rows = block_rows(rng, segment_image(rng, (16, 16), 7))
    ours = finch_with_count(torch.from_numpy(rows), count)
    expected = reference_with_count(rows, count)
    np.testing.assert_array_equal(ours.numpy(), expected)
    assert ours.max() + 1 == min(count, expected.max() + 1)


def test_tiny_and_degenerate_inputs():
    one = finch(torch.ones(1, 1))
    assert one.counts == [1] and one.levels[0].graph is None
    two = finch(torch.tensor([[0.9, 0.1], [0.2, 0.8]]))
    assert two.counts == [1]
    same = finch(torch.full((50, 7), 1 / 7))  # identical rows: every row's neighbour is row 0 (row 0's is row 1)
    assert same.counts == [1]
    assert torch.equal(same.levels[0].graph.kappa, torch.tensor([1] + [0] * 49))
    zeros = torch.rand(64, 64)
    zeros[zeros < 0.5] = 0  # half the entries are exact zeros: the floor keeps every distance finite
    h = finch(zeros)
    assert all(torch.isfinite(level.graph.distance).all() for level in h.levels)
    single = constrained_finch(torch.rand(1, 5), torch.zeros(3, 3, dtype=torch.long), 1.0)
    assert single.counts == [1]
