"""localize_concepts against the float64 oracle of the whole stage (localize_oracle.localize), the level rule and
its crash cases, delta, the EOT filter, options, degenerate inputs and the outputs."""

import math

import localize_oracle as oracle
import numpy as np
import pytest
import torch
from test_finch import block_rows, segment_image

from concept_express.uce_core.attention import AttentionMaps
from concept_express.uce_core.concepts import Concepts
from concept_express.uce_core.errors import ConceptExpressError
from concept_express.uce_core.finch import finch
from concept_express.uce_core.localize import LocalizeSettings, choose_level, level_delta, localize_concepts

OBJECTS = ((2, 2, 6, 7), (9, 3, 14, 6), (4, 10, 8, 14))  # (y0, x0, y1, x1) rectangles on a 16 x 16 grid


def scene(seed, grid=(16, 16), objects=OBJECTS):
    """Two background regions and rectangular objects; the EOT map is high on objects, pooled to a 4x coarser grid."""
    rng = np.random.default_rng(seed)
    segments = segment_image(rng, grid, 2)
    for k, (y0, x0, y1, x1) in enumerate(objects):
        segments[y0:y1, x0:x1] = 2 + k
    rows = block_rows(rng, segments)
    h, w = grid
    full = 0.1 + 0.8 * (segments >= 2) + 0.05 * rng.normal(size=grid)
    eot = full.reshape(h // 4, 4, w // 4, 4).mean((1, 3))
    image = torch.from_numpy(
        np.repeat(np.repeat((segments * 40 % 255).astype(np.uint8)[..., None], 3, 2), 8, 0).repeat(8, 1)
    )
    maps = AttentionMaps(torch.from_numpy(rows), torch.from_numpy(eot.astype(np.float32)), grid, image, {"test": 1})
    return maps, rows, eot


@pytest.mark.parametrize("seed", [2, 6, 7])
def test_whole_stage_matches_the_float64_oracle(seed):
    maps, rows, eot = scene(seed)
    masks, feats, info = oracle.localize(rows, eot, maps.grid)
    levels, _, _ = oracle.finch(rows)
    nodes = rows.astype(np.float64)
    for labels in [None] + levels[:-1]:  # fixture precondition: no near ties anywhere (see test_finch.assert_safe)
        assert oracle.nearest_gap(nodes if labels is None else oracle.means(nodes, labels)) > 1e-4
    assert oracle.nearest_gap(np.stack([nodes[levels[info["index"]] == c].mean(0) for c in info["kept"]])) > 1e-4

    concepts = localize_concepts(maps)
    assert concepts.info["levels"] == info["counts"]
    assert concepts.info["chosen_level"] == info["index"] and concepts.info["level_rule"] == "reference"
    assert concepts.info["delta"] == pytest.approx(info["delta"], rel=1e-5)
    assert concepts.info["kept_pre_clusters"] == info["kept"]
    assert concepts.info["post_levels"] == info["post_counts"]
    np.testing.assert_array_equal(concepts.masks.numpy(), masks)
    np.testing.assert_allclose(concepts.features.numpy(), feats, rtol=1e-5, atol=2.0**-24)
    e = oracle.eot_on_grid(eot, maps.grid).ravel()
    expected_scores = [e[m.ravel()].mean() / e.mean() for m in masks]
    np.testing.assert_allclose(concepts.scores.numpy(), expected_scores, rtol=1e-5)


def test_the_reference_kernel_mode_gives_the_same_concepts():
    maps, _, _ = scene(6)
    a, b = localize_concepts(maps), localize_concepts(maps, LocalizeSettings(mode="reference"))
    assert torch.equal(a.masks, b.masks)
    assert a.info["delta"] == pytest.approx(b.info["delta"], rel=1e-5)


@pytest.mark.parametrize(
    "counts,n_max",
    [
        ([50, 11, 3], 10),
        ([50, 10, 9, 2], 10),
        ([12, 4], 10),
        ([30, 20, 12, 4], 12),
        ([5, 2], 3),
        ([9, 4], 9),
    ],
)
def test_level_rule_is_the_references_where_it_does_not_crash(counts, n_max):
    assert choose_level(counts, n_max).index == oracle.reference_level(counts, n_max)
    assert choose_level(counts, n_max).rule == "reference"


def test_level_rule_where_the_reference_crashes():
    with pytest.raises(UnboundLocalError):  # no level with >= n_max clusters
        oracle.reference_level([8, 3], 10)
    assert choose_level([8, 3], 10).index == 0 and choose_level([8, 3], 10).rule.startswith("finest")
    with pytest.raises(IndexError):  # every level has >= n_max clusters
        oracle.reference_level([40, 15, 11], 10)
    assert choose_level([40, 15, 11], 10).index == 2 and choose_level([40, 15, 11], 10).rule.startswith("coarsest")
    assert choose_level([1], 10).index == 0
    assert choose_level([10], 10).index == 0


def bernoulli_rows(logits):
    """Two-bin rows (sigmoid(x), 1 - sigmoid(x)): d between two of them is (s1 - s2)(x1 - x2) / 2 in closed form."""
    s = 1 / (1 + np.exp(-np.asarray(logits, dtype=np.float64)))
    return np.stack([s, 1 - s], axis=1), s


def test_delta_reference_counts_mutual_pairs_twice_paper_does_not():
    x = [0.0, 0.1, 1.0, 1.3, 3.0, 3.2, 3.9]
    rows, s = bernoulli_rows(x)

    def d(i, j):
        return (s[i] - s[j]) * (x[i] - x[j]) / 2

    hierarchy = finch(torch.from_numpy(rows).float())
    # first neighbours: 0<->1, 2<->3, 4<->5 mutual; 6 -> 5. Level 0: {0,1} {2,3} {4,5,6}; level 1 would be 1 cluster.
    assert hierarchy.levels[0].graph.kappa.tolist() == [1, 0, 3, 2, 5, 4, 5]
    assert hierarchy.counts == [3]
    rows_t = torch.from_numpy(rows).float()
    reference = level_delta(hierarchy, 0, rows_t, "reference")
    paper = level_delta(hierarchy, 0, rows_t, "paper")
    assert reference == pytest.approx(max(2 * d(0, 1), 2 * d(2, 3), 2 * d(4, 5), d(6, 5)), rel=1e-5)
    assert paper == pytest.approx(max(d(0, 1), d(2, 3), d(4, 5), d(6, 5)), rel=1e-5)
    assert reference == pytest.approx(2 * d(2, 3), rel=1e-5) and paper == pytest.approx(d(2, 3), rel=1e-5)


@pytest.mark.parametrize("seed", [2, 7])
def test_delta_at_coarser_levels_is_the_references_min_sim_list(seed):
    """delta of level k >= 1 is max(D * A) over the centroids of level k-1 (shared-neighbour edges included)."""
    _, rows, _ = scene(seed)
    levels, counts, min_sims = oracle.finch(rows)
    hierarchy = finch(torch.from_numpy(rows))
    assert hierarchy.counts == counts
    for k in range(1, len(counts)):
        got = level_delta(hierarchy, k, torch.from_numpy(rows), "reference")
        assert got == pytest.approx(min_sims[k], rel=1e-5)
        kappa, d = oracle.first_neighbours(oracle.means(rows.astype(np.float64), levels[k - 1]))
        adj = oracle.adjacency(kappa)
        paper = level_delta(hierarchy, k, torch.from_numpy(rows), "paper")
        assert paper == pytest.approx(float(np.max(np.where(adj > 0, d, 0))), rel=1e-5)
        assert paper <= got


def test_level_zero_delta_is_defined_from_the_cells_graph():
    """Where the reference chooses level 0 it has no delta (None); here it is max count * d over the cells'
    first-neighbour edges."""
    maps, rows, _ = scene(6)
    hierarchy = finch(torch.from_numpy(rows))
    n_max = hierarchy.counts[1] + 1  # level 0 >= n_max > level 1: the reference picks index 0
    concepts = localize_concepts(maps, LocalizeSettings(n_max=n_max))
    assert concepts.info["chosen_level"] == 0 and concepts.info["level_rule"] == "reference"
    kappa, d = oracle.first_neighbours(rows.astype(np.float64))
    mutual = kappa[kappa] == np.arange(len(kappa))
    expected = np.max((1 + mutual) * d[np.arange(len(kappa)), kappa])
    assert concepts.info["delta"] == pytest.approx(expected, rel=1e-5)


def test_eot_filter_is_strict_and_nothing_passing_is_a_clear_error():
    grid = (4, 4)
    rows = torch.full((16, 16), 1 / 16)  # identical rows: one cluster covering the grid, score exactly 1
    eot = torch.arange(16.0).view(4, 4)
    maps = AttentionMaps(rows, eot, grid, torch.zeros(8, 8, 3, dtype=torch.uint8))
    with pytest.raises(ConceptExpressError, match="no region stands out.*1 pre-clusters"):
        localize_concepts(maps)


def test_all_background_is_a_clear_error():
    """No object: the EOT map has no salient region (flat), so eq. 5 cannot keep anything."""
    maps, _, _ = scene(2, objects=())
    background = AttentionMaps(maps.self_attention, torch.full_like(maps.eot, 0.1), maps.grid, maps.image)
    with pytest.raises(ConceptExpressError, match="constant"):
        localize_concepts(background)
    # A noisy EOT map always has a region above its mean (eq. 5 is relative), so that is not an error.
    check_outputs(localize_concepts(maps), maps.grid)


def test_a_constant_eot_map_is_a_clear_error():
    maps, _, _ = scene(2)
    flat = AttentionMaps(maps.self_attention, torch.full_like(maps.eot, 0.3), maps.grid, maps.image)
    with pytest.raises(ConceptExpressError, match="constant"):
        localize_concepts(flat)
    # Constant up to float rounding (a range of 1e-7 relative, as bilinear upsampling of a constant map leaves) is
    # constant too; the same pattern with a range of 1e-3 relative is a real, if faint, map.
    pattern = (maps.eot - maps.eot.min()) / (maps.eot.max() - maps.eot.min())
    for relative_range, constant in ((1e-7, True), (1e-3, False)):
        eot = (0.3 * (1 + relative_range * pattern.double())).float()
        faint = AttentionMaps(maps.self_attention, eot, maps.grid, maps.image)
        if constant:
            with pytest.raises(ConceptExpressError, match="constant"):
                localize_concepts(faint)
        else:
            check_outputs(localize_concepts(faint), maps.grid)


def check_outputs(concepts: Concepts, grid):
    n = grid[0] * grid[1]
    assert concepts.masks.dtype == torch.bool and concepts.masks.shape[1:] == grid
    assert concepts.features.shape == (len(concepts), n)
    assert torch.isfinite(concepts.features).all() and torch.isfinite(concepts.scores).all()
    torch.testing.assert_close(concepts.features.sum(1), torch.ones(len(concepts)), rtol=0, atol=1e-5)
    assert (concepts.masks.sum(0) <= 1).all() and (concepts.masks.sum((1, 2)) > 0).all()  # disjoint, non-empty
    assert (concepts.scores > 1.0).all()  # every concept is a union of salient regions


def test_one_object():
    maps, rows, eot = scene(1, objects=((5, 5, 11, 11),))
    masks, _, info = oracle.localize(rows, eot, maps.grid)
    concepts = localize_concepts(maps)
    check_outputs(concepts, maps.grid)
    assert concepts.info["levels"] == info["counts"]
    np.testing.assert_array_equal(concepts.masks.numpy(), masks)
    obj = torch.zeros(1, 16, 16, dtype=torch.bool)
    obj[0, 5:11, 5:11] = True
    assert torch.equal(concepts.masks, obj)  # exactly the object


def test_zeros_in_the_input_give_no_nan():
    maps, rows, eot = scene(2)
    holes = maps.self_attention.clone()
    holes[holes < holes.median()] = 0  # half of every row is exact zeros (the reference's log gives NaN)
    holes[3] = 0  # and one all-zero row
    concepts = localize_concepts(AttentionMaps(holes, maps.eot, maps.grid, maps.image))
    check_outputs(concepts, maps.grid)


def test_identical_rows_and_a_one_cell_grid_raise_clear_errors():
    image = torch.zeros(8, 8, 3, dtype=torch.uint8)
    with pytest.raises(ConceptExpressError):
        localize_concepts(AttentionMaps(torch.ones(1, 1), torch.ones(1, 1), (1, 1), image))
    with pytest.raises(ConceptExpressError, match="no region stands out"):
        localize_concepts(AttentionMaps(torch.full((36, 36), 5.0), torch.rand(6, 6), (6, 6), image))


@pytest.mark.parametrize("grid,n_max", [((2, 2), 10), ((4, 4), 100), ((6, 5), 31)])
def test_n_max_above_the_number_of_cells(grid, n_max):
    rng = np.random.default_rng(1)
    n = grid[0] * grid[1]
    rows = torch.from_numpy(rng.dirichlet(np.ones(n), size=n).astype(np.float32))
    eot = torch.from_numpy(rng.uniform(size=grid).astype(np.float32))
    concepts = localize_concepts(
        AttentionMaps(rows, eot, grid, torch.zeros(4, 4, 3, dtype=torch.uint8)), LocalizeSettings(n_max=n_max)
    )
    assert concepts.info["chosen_level"] == 0 and concepts.info["level_rule"].startswith("finest")
    check_outputs(concepts, grid)


def test_every_level_above_n_max_takes_the_coarsest():
    maps, _, _ = scene(2)
    concepts = localize_concepts(maps, LocalizeSettings(n_max=2))
    counts = concepts.info["levels"]
    assert counts[-1] >= 2 and concepts.info["chosen_level"] == len(counts) - 1
    assert concepts.info["level_rule"].startswith("coarsest")
    check_outputs(concepts, maps.grid)


def test_paper_features_are_eq6_over_each_concepts_cells():
    maps, rows, _ = scene(2)
    concepts = localize_concepts(maps, LocalizeSettings(features="paper"))
    check_outputs(concepts, maps.grid)
    for mask, f in zip(concepts.masks, concepts.features):
        np.testing.assert_allclose(
            f.numpy(), rows[mask.reshape(-1).numpy()].astype(np.float64).mean(0), rtol=1e-5, atol=2.0**-24
        )
    reference = localize_concepts(maps)
    assert len(reference) > 1 and not torch.allclose(reference.features[0], concepts.features[0])


def test_paper_delta_is_tighter_and_gives_at_least_as_many_concepts():
    maps, _, _ = scene(7)
    reference, paper = localize_concepts(maps), localize_concepts(maps, LocalizeSettings(delta="paper"))
    assert paper.info["delta"] < reference.info["delta"]
    assert len(paper) >= len(reference)


@pytest.mark.parametrize("small", ["drop", "merge"])
def test_small_concepts_are_dropped_or_merged(small):
    maps, _, _ = scene(3)
    base = localize_concepts(maps)
    sizes = base.masks.sum((1, 2))
    limit = (float(sizes.min()) + 0.5) / maps.n  # just above the smallest concept
    assert (sizes < limit * maps.n).sum() == 1
    concepts = localize_concepts(maps, LocalizeSettings(min_area=limit, small=small))
    check_outputs(concepts, maps.grid)
    assert len(concepts) == len(base) - 1
    smallest = base.masks[int(torch.argmin(sizes))]
    if small == "drop":
        assert not (concepts.masks.any(0) & smallest).any()
        assert concepts.info["small_regions"]["dropped"] == 1
    else:
        assert torch.equal(concepts.masks.any(0), base.masks.any(0))
        host = [m for m in concepts.masks if (m & smallest).any()]
        assert len(host) == 1 and (host[0] & ~smallest).any()  # merged into one existing concept
        assert concepts.info["small_regions"]["merged"] == 1


def test_min_area_removing_everything_is_a_clear_error():
    maps, _, _ = scene(2)
    with pytest.raises(ConceptExpressError, match="min_area"):
        localize_concepts(maps, LocalizeSettings(min_area=0.99))


@pytest.mark.parametrize(
    "bad",
    [
        dict(n_max=0),
        dict(delta="x"),
        dict(features="mean"),
        dict(min_area=1.5),
        dict(small="keep"),
        dict(backend="cuda"),
        dict(mode="slow"),
    ],
)
def test_bad_settings_are_user_errors(bad):
    with pytest.raises(ConceptExpressError):
        LocalizeSettings(**bad)


def test_outputs_save_load_and_overlay(tmp_path):
    maps, _, _ = scene(2)
    concepts = localize_concepts(maps)
    path = concepts.save(tmp_path / "concepts.safetensors")
    back = Concepts.load(path)
    assert torch.equal(back.masks, concepts.masks) and torch.equal(back.features, concepts.features)
    assert back.info["levels"] == concepts.info["levels"] and back.info["test"] == 1
    assert set(back.info["timings_s"]) >= {"pre_clustering", "post_clustering"}
    assert all(math.isfinite(v) for v in back.info["timings_s"].values())
    picture = concepts.overlay()
    assert picture.size == (128, 128) and picture.mode == "RGB"
    from concept_express.uce_core.previews import PALETTE

    pixels = np.asarray(picture).astype(int)
    for i, mask in enumerate(concepts.masks_at((128, 128)).bool()):
        inside = pixels[mask.numpy()]
        distance = np.abs(inside - np.array(PALETTE[i % len(PALETTE)])).sum(1)
        assert (distance == 0).any()  # the outline is drawn in the concept's colour


def test_captured_attention_localizes_and_masks_map_back_to_the_source(sd1_backend, example_image):
    """Stage 1 -> stage 2 on a real (random-weight) capture: the provenance reaches Concepts.info, so the masks map
    back onto the user's image."""
    from PIL import Image

    from concept_express.uce_core.attention import capture_attention

    maps = capture_attention(sd1_backend, example_image)
    concepts = localize_concepts(maps)
    check_outputs(concepts, maps.grid)
    assert concepts.info["model"] == maps.info["model"]
    width, height = Image.open(example_image).size
    assert tuple(concepts.masks_on_source().shape) == (len(concepts), height, width)


def test_kernel_settings_reach_every_first_neighbour_search(monkeypatch):
    """backend, precision and mode give the same concepts when the kernels are right (see above), so only watching
    the searches shows that they reach them: pre-clustering and post-clustering both search with the user's
    options."""
    import concept_express.uce_core.finch as finch_module

    calls = []
    search = finch_module.sym_kl_first_neighbours

    def spy(nodes, **options):
        calls.append(options)
        return search(nodes, **options)

    monkeypatch.setattr(finch_module, "sym_kl_first_neighbours", spy)
    maps, _, _ = scene(2)
    localize_concepts(maps, LocalizeSettings(backend="torch", precision="tf32x3", mode="reference"))
    assert len(calls) >= 3  # several pre-clustering levels and at least one post-clustering level
    assert all(c == dict(backend="torch", precision="tf32x3", mode="reference") for c in calls)
