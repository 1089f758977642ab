"""FINCH merge ops against scipy.sparse.csgraph and numpy, on every device available (CPU; CUDA when present)."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components as scipy_components

from concept_express.uce_kernels import cluster_means, connected_components, first_neighbour_clusters
from concept_express.uce_kernels.finch_ops import _component_roots

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def canonical(labels: np.ndarray) -> np.ndarray:
    """Relabel a partition 0..k-1 in order of each part's smallest node: the label rule the ops promise."""
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank[np.unique(labels, return_inverse=True)[1]]


def scipy_labels(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    graph = sp.csr_matrix((np.ones(len(src)), (src, dst)), shape=(n, n))
    return canonical(scipy_components(graph, directed=True, connection="weak")[1])


def random_graphs(seed: int):
    rng = np.random.default_rng(seed)
    for n, e in [(1, 0), (7, 0), (50, 20), (500, 300), (500, 1500), (3000, 2500)]:
        src, dst = rng.integers(0, n, e), rng.integers(0, n, e)
        yield n, src, dst
    yield 10, np.array([3, 3, 4, 4, 9]), np.array([3, 4, 3, 4, 0])  # self loops and repeated edges


@pytest.mark.parametrize("device", DEVICES)
def test_components_match_scipy_with_the_label_order_rule(device):
    for n, src, dst in random_graphs(seed=0):
        got = connected_components(n, torch.from_numpy(src).to(device), torch.from_numpy(dst).to(device))
        assert got.dtype == torch.long and got.device.type == device
        assert np.array_equal(got.cpu().numpy(), scipy_labels(n, src, dst)), (n, len(src))


def test_label_order_rule_on_a_small_graph():
    # components {0, 4}, {1}, {2, 3, 5}: numbered by smallest node 0, 1, 2
    got = connected_components(6, torch.tensor([4, 5, 3]), torch.tensor([0, 2, 5]))
    assert got.tolist() == [0, 1, 2, 2, 0, 2]


def test_hooking_rounds_grow_like_log_n():
    rng = np.random.default_rng(1)
    for n in (1000, 20000):
        path = torch.from_numpy(rng.permutation(n))  # a path visiting the nodes in random order
        kappa = torch.from_numpy(rng.integers(0, n, n))  # a random functional graph, like a first-neighbour graph
        for src, dst in [(path[:-1], path[1:]), (torch.arange(n), kappa)]:
            parent, rounds = _component_roots(n, src, dst)
            assert 1 <= rounds <= math.ceil(math.log2(n))
            assert np.array_equal(canonical(parent.numpy()), scipy_labels(n, src.numpy(), dst.numpy()))


def finch_adjacency_labels(kappa: np.ndarray) -> np.ndarray:
    """The reference's clust_rank + get_clust: A = (K + I)(K + I)^T, diagonal 0, weak components."""
    n = len(kappa)
    k = sp.csr_matrix((np.ones(n, dtype=np.float32), (np.arange(n), kappa)), shape=(n, n))
    k = k + sp.eye(n, dtype=np.float32, format="csr")
    a = (k @ k.T).tolil()
    a.setdiag(0)
    return canonical(scipy_components(a.tocsr(), directed=True, connection="weak")[1])


@pytest.mark.parametrize("device", DEVICES)
def test_first_neighbour_clusters_are_finch_equation_2(device):
    rng = np.random.default_rng(2)
    for n in (2, 3, 40, 1000):
        kappa = rng.integers(0, n - 1, n)
        kappa[kappa >= np.arange(n)] += 1  # a first neighbour is never the node itself
        got = first_neighbour_clusters(torch.from_numpy(kappa).to(device))
        assert np.array_equal(got.cpu().numpy(), finch_adjacency_labels(kappa))
    # Nearest neighbours of points on a line: clusters are runs of mutual pairs and their followers.
    x = np.array([0.0, 1.0, 1.1, 5.0, 5.3, 5.5, 9.0])
    dist = np.abs(x[:, None] - x[None, :]) + np.diag(np.full(7, np.inf))
    kappa = dist.argmin(axis=1)
    assert first_neighbour_clusters(torch.from_numpy(kappa).to(device)).tolist() == [0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("device", DEVICES)
def test_cluster_means_match_numpy(device):
    rng = np.random.default_rng(3)
    rows = rng.random((1000, 70)).astype(np.float32)
    labels = rng.integers(0, 13, 1000)
    got = cluster_means(torch.from_numpy(rows).to(device), torch.from_numpy(labels).to(device))
    expected = np.stack([rows[labels == c].astype(np.float64).mean(axis=0) for c in range(13)])
    assert got.dtype == torch.float32 and got.shape == (13, 70)
    np.testing.assert_allclose(got.cpu().numpy(), expected, rtol=1e-6)


def test_cluster_means_of_half_rows_empty_clusters_and_bad_entries():
    rows = torch.tensor([[1.0, 2.0], [3.0, float("nan")], [5.0, 6.0]])
    got = cluster_means(rows.half(), torch.tensor([0, 0, 2]), num_clusters=4)
    assert torch.isfinite(got).all()
    assert got.tolist() == [[2.0, 1.0], [0.0, 0.0], [5.0, 6.0], [0.0, 0.0]]
    with pytest.raises(ValueError):
        cluster_means(rows, torch.tensor([0, 1, 5]), num_clusters=3)


def test_bad_edge_lists_are_refused():
    with pytest.raises(ValueError):
        connected_components(3, torch.tensor([0, 3]), torch.tensor([1, 1]))
    with pytest.raises(ValueError):
        connected_components(3, torch.tensor([0]), torch.tensor([1, 2]))
    with pytest.raises(ValueError):
        first_neighbour_clusters(torch.zeros(2, 2, dtype=torch.long))
