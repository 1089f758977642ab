"""Symmetric-KL first neighbours, pair and dense distances: torch paths and Triton kernels against float64 oracles.

The oracle is the definition d(p, q) = 1/2 sum_k (p_k - q_k)(log p_k - log q_k) in float64 numpy, on the same float32
rows the ops receive. The Triton kernels run under TRITON_INTERPRET=1 when there is no GPU (set in conftest.py).

Near ties: a float32 search may pick another neighbour only where the oracle's relative gap between the best and the
second best distance, (d2 - d1) / d1, is below TIE_RTOL, and then the neighbour it picks must itself be within TIE_RTOL
of the best. The fixtures keep nearest distances above 1e-3, so float32 errors (~1e-7 on these terms) sit far below
TIE_RTOL * d1 and any larger disagreement is a bug.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch

from concept_express.uce_kernels import (
    _device,
    _dispatch,
    prepare_distributions,
    sym_kl_distances,
    sym_kl_first_neighbours,
    sym_kl_pair_distances,
    sym_kl_pruned,
    sym_kl_search,
    sym_kl_torch,
)
from concept_express.uce_kernels.sym_kl_reference import reference_distance_matrix

TIE_RTOL = 1e-4
# "torch" on a CPU tensor runs the default: the pruned search from MIN_ROWS rows on, the blocked search in numpy below;
# "torch-pruned" forces the pruned search on any size, in small groups, even where it keeps every pair;
# "torch-engine" runs the blocked search's blocks in torch, as a CUDA tensor does when triton is missing; "triton" runs
# the kernels (under the interpreter without a GPU).
BACKENDS = ["torch", "torch-pruned", "torch-engine", "triton"]


@pytest.fixture(autouse=True)
def _engine(request, monkeypatch):
    if "torch-engine" in request.node.name:
        monkeypatch.setattr(sym_kl_search, "CPU_ENGINE", "torch")
    if "torch-pruned" in request.node.name:
        force_pruning(monkeypatch)


def force_pruning(monkeypatch, group_rows: int = 16):
    monkeypatch.setattr(sym_kl_pruned, "MIN_ROWS", 2)
    monkeypatch.setattr(sym_kl_pruned, "PROJECTION_DIM", 4)
    monkeypatch.setattr(sym_kl_pruned, "GROUP_ROWS", group_rows)
    monkeypatch.setattr(sym_kl_pruned, "MAX_KEPT_FRACTION", 1.0)


# ----------------------------------------------------------------------------------------------------------- oracle
def oracle_distances(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = a if b is None else np.asarray(b, dtype=np.float64)
    la, lb = np.log(a), np.log(b)
    out = np.empty((a.shape[0], b.shape[0]))
    for s in range(0, a.shape[0], 16):
        diff = a[s : s + 16, None, :] - b[None, :, :]
        log_diff = la[s : s + 16, None, :] - lb[None, :, :]
        out[s : s + 16] = 0.5 * (diff * log_diff).sum(axis=-1)
    return out


def check_first_neighbours(kappa, dist, oracle: np.ndarray, exclude_self: bool, allow_ties: bool = True) -> int:
    """Assert (kappa, dist) against the oracle matrix; returns how many rows were near ties (gap below TIE_RTOL)."""
    kappa, dist = kappa.cpu().numpy(), dist.cpu().numpy()
    o = oracle.copy()
    if exclude_self:
        np.fill_diagonal(o, np.inf)
    rows = np.arange(o.shape[0])
    two = np.argsort(o, axis=1, kind="stable")[:, :2]
    best, second = o[rows, two[:, 0]], o[rows, two[:, 1]]
    near_tie = (second - best) <= TIE_RTOL * best
    expected = np.argmin(o, axis=1)
    wrong = kappa != expected
    assert not (wrong & ~near_tie).any(), (
        f"rows {np.flatnonzero(wrong & ~near_tie)[:10]} pick a clearly worse neighbour"
    )
    if not allow_ties:
        assert not wrong.any()
    assert (o[rows, kappa] <= best * (1 + TIE_RTOL)).all()
    # The returned distance is d(i, kappa_i) of the neighbour actually returned.
    np.testing.assert_allclose(dist, o[rows, kappa], rtol=2e-5, atol=1e-7)
    return int(near_tie.sum())


# --------------------------------------------------------------------------------------------------------- fixtures
def softmax_rows(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)


def well_separated(n: int, d: int, seed: int) -> np.ndarray:
    """n/2 random rows and a close partner for each: every row's nearest is its partner, by a wide margin."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, 1.5, (n // 2, d))
    partner = base + rng.normal(0.0, 1.0, (n // 2, d)) * rng.uniform(0.02, 0.1, (n // 2, 1))
    return softmax_rows(np.concatenate([base, partner]))[rng.permutation(n)]


def random_walk(n: int, d: int, seed: int, step: float = 0.15) -> np.ndarray:
    """Rows along a random walk in logit space, shuffled: each row's nearest is one of its two walk neighbours,
    and which one is often a near tie."""
    rng = np.random.default_rng(seed)
    logits = np.cumsum(rng.normal(0.0, step, (n, d)), axis=0) + rng.normal(0.0, 1.0, (1, d))
    return softmax_rows(logits)[rng.permutation(n)]


# The Triton tests run the real kernels on CUDA tensors where there is a GPU, the interpreter on CPU tensors elsewhere.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run(rows, others=None, backend="torch", **kw):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    t = torch.from_numpy(rows) if isinstance(rows, np.ndarray) else rows
    o = torch.from_numpy(others) if isinstance(others, np.ndarray) else others
    kappa, dist = sym_kl_first_neighbours(
        t.to(device), None if o is None else o.to(device), backend="triton" if backend == "triton" else "torch", **kw
    )
    return kappa.cpu(), dist.cpu()


# -------------------------------------------------------------------------------------------- first neighbours
@pytest.mark.parametrize("backend", BACKENDS)
def test_well_separated_rows_give_exact_neighbours(backend):
    rows = well_separated(512, 256, seed=1)
    kappa, dist = run(rows, backend=backend)
    check_first_neighbours(kappa, dist, oracle_distances(rows), exclude_self=True, allow_ties=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_near_ties_differ_only_below_the_tie_tolerance(backend):
    rows = random_walk(512, 128, seed=2)
    oracle = oracle_distances(rows)
    kappa, dist = run(rows, backend=backend)
    check_first_neighbours(kappa, dist, oracle, exclude_self=True)
    # The fixture must really contain close calls, or this test could not fail on precision bugs.
    o = oracle + np.diag(np.full(len(rows), np.inf))
    gaps = np.diff(np.sort(o, axis=1)[:, :2], axis=1)[:, 0] / o.min(axis=1)
    assert (gaps < 1e-2).sum() >= 3 and o.min() > 1e-3


@pytest.mark.parametrize("backend", ["torch", "torch-engine"])
def test_blocked_search_with_ragged_strips_covers_every_pair(backend, monkeypatch):
    """Ragged strips at three levels of recursion: candidates from earlier strips (column minima), the diagonal blocks
    and the later columns (row minima) must all count, in the right order; also for queries in ragged strips."""
    monkeypatch.setattr(sym_kl_search, "STRIP_ROWS", 150)
    monkeypatch.setattr(sym_kl_search, "BASE_ROWS", 9)
    monkeypatch.setattr(_device, "CPU_CHUNK_ELEMENTS", 1000)
    rows = random_walk(300, 96, seed=3)
    kappa, dist = run(rows, backend=backend)
    check_first_neighbours(kappa, dist, oracle_distances(rows), exclude_self=True)
    queries = random_walk(160, 96, seed=4)
    kappa, dist = run(queries, rows, backend=backend)
    check_first_neighbours(kappa, dist, oracle_distances(queries, rows), exclude_self=False)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("rows", ["slice", "indices"])
def test_a_candidate_replaces_the_best_when_smaller_or_equal_with_a_lower_index(lib, rows):
    """np.argmin's rule whatever order candidates come in: smaller wins; of equal values the lower index wins."""
    arr = np.asarray if lib == "numpy" else torch.tensor
    val = arr([1.0, 2.0, 3.0, 4.0, 0.5], dtype=np.float32 if lib == "numpy" else torch.float32)
    idx = arr([5, 6, 7, 8, 1])
    where = slice(0, 4) if rows == "slice" else arr([3, 0, 2, 1])
    offered = arr([1.0, 1.5, 3.5, 4.0]) if rows == "slice" else arr([4.0, 1.0, 3.5, 1.5])
    offered_idx = arr([9, 9, 9, 2]) if rows == "slice" else arr([2, 9, 9, 9])
    sym_kl_search.keep_better(val, idx, where, offered, offered_idx)
    assert list(idx.tolist()) == [5, 9, 7, 2, 1] and list(val.tolist()) == [1.0, 1.5, 3.0, 4.0, 0.5]


@pytest.mark.parametrize("n, strip, base", [(97, 40, 5), (4096, 512, 128), (300, 256, 64)])
def test_triangle_blocks_cover_each_pair_once_in_increasing_column_order(n, strip, base):
    seen = np.zeros((n, n), dtype=np.int8)
    last = np.full(n, -1)
    for r0, r1, c0, c1 in sym_kl_search._triangle_blocks(0, n, strip, base):
        assert r0 < r1 <= n and c0 < c1 <= n and (c0 == r0 and c1 == r1 or c0 >= r1)
        seen[r0:r1, c0:c1] += 1
        assert (last[r0:r1] < c0).all()  # rows of the block: candidates c0.. come after everything they had
        last[r0:r1] = c1 - 1
        if c0 >= r1:
            seen[c0:c1, r0:r1] += 1  # the same products, read column-wise
            assert (last[c0:c1] < r0).all()
            last[c0:c1] = r1 - 1
    off_diagonal = ~np.eye(n, dtype=bool)
    assert (seen[off_diagonal] == 1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_queries_against_other_rows(backend):
    rng = np.random.default_rng(4)
    others = random_walk(300, 200, seed=4)
    near = softmax_rows(np.log(others[rng.choice(300, 40, replace=False)]) + rng.normal(0, 0.05, (40, 200)))
    queries = np.concatenate([near, random_walk(37, 200, seed=5)])
    kappa, dist = run(queries, others, backend=backend)
    check_first_neighbours(kappa, dist, oracle_distances(queries, others), exclude_self=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_query_identical_to_a_row_finds_it_at_distance_zero(backend):
    others = well_separated(64, 100, seed=6)
    kappa, dist = run(others[[5, 17, 40]], others, backend=backend)
    assert kappa.tolist() == [5, 17, 40]
    assert dist.abs().max().item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_ties_go_to_the_lowest_index(backend):
    others = well_separated(64, 100, seed=7)
    others[[9, 30, 51]] = others[40]  # four identical rows: 9 < 30 < 40 < 51
    queries = softmax_rows(np.log(others[[40, 40]]) + np.random.default_rng(7).normal(0, 0.05, (2, 100)))
    kappa, _ = run(queries, others, backend=backend)
    assert kappa.tolist() == [9, 9]


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_ties_among_the_rows_go_to_the_lowest_other_index(backend):
    rows = well_separated(64, 100, seed=7)
    rows[[9, 30, 51]] = rows[40]  # four identical rows: 9 < 30 < 40 < 51
    kappa, dist = run(rows, backend=backend)
    assert kappa[[9, 30, 40, 51]].tolist() == [30, 9, 9, 9]
    assert dist[[9, 30, 40, 51]].abs().max().item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_centroids_against_each_other(backend):
    """FINCH's coarser levels: a few dozen rows, d not a multiple of any block size."""
    rows = random_walk(37, 300, seed=8, step=0.3)
    kappa, dist = run(rows, backend=backend)
    check_first_neighbours(kappa, dist, oracle_distances(rows), exclude_self=True)
    two_rows = well_separated(2, 300, seed=8)
    assert run(two_rows, backend=backend)[0].tolist() == [1, 0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(backend, dtype):
    """The op upcasts and prepares; the oracle prepares the same quantised rows in float64 by the documented rule."""
    x = torch.from_numpy(random_walk(256, 128, seed=9, step=0.3)).to(dtype)
    kappa, dist = run(x, backend=backend)
    q = x.double().numpy()
    q = q / q.sum(axis=1, keepdims=True)
    q = np.maximum(q, 2.0**-24)
    q = q / q.sum(axis=1, keepdims=True)
    check_first_neighbours(kappa, dist, oracle_distances(q), exclude_self=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zeros_nans_and_infs_never_give_nan(backend):
    x = torch.from_numpy(random_walk(200, 64, seed=10, step=0.3))
    x[3, :10] = 0.0
    x[7] = 0.0  # a whole row of zeros becomes uniform
    x[11, 5] = float("nan")
    x[12, 0] = float("inf")
    x[13, 2] = -1.0
    x = x.to(torch.float16).float()  # fp16 flushes small entries to exact zeros, as under fp16 attention
    assert (x == 0).any(dim=1).sum() > 5
    kappa, dist = run(x, backend=backend)
    assert torch.isfinite(dist).all() and (dist >= 0).all()
    prepared = prepare_distributions(x).numpy()
    check_first_neighbours(kappa, dist, oracle_distances(prepared), exclude_self=True)


def test_triton_tile_config_with_several_k_steps_and_ragged_edges(monkeypatch):
    pytest.importorskip("triton")
    from concept_express.uce_kernels import sym_kl_triton as st
    from concept_express.uce_kernels.sym_kl_triton import TileConfig, first_neighbours_triton

    monkeypatch.setattr(st, "_working_config", {})

    rows = random_walk(100, 72, seed=11, step=0.3)
    others = random_walk(70, 72, seed=12, step=0.3)
    config = TileConfig(block=32, block_k=16, num_warps=4, num_stages=1)
    a, b = torch.from_numpy(rows).to(TRITON_DEVICE), torch.from_numpy(others).to(TRITON_DEVICE)
    ((la, ha),) = sym_kl_torch.shifted_log_terms(a)
    kappa = first_neighbours_triton(a, la, ha, config=config).cpu()
    check_first_neighbours(
        kappa,
        torch.from_numpy(oracle_distances(rows)[np.arange(100), kappa.numpy()]),
        oracle_distances(rows),
        exclude_self=True,
    )
    (la, ha), (lb, hb) = sym_kl_torch.shifted_log_terms(a, b)
    kappa = first_neighbours_triton(a, la, ha, b, lb, hb, config=config).cpu()
    oracle = oracle_distances(rows, others)
    check_first_neighbours(kappa, torch.from_numpy(oracle[np.arange(100), kappa.numpy()]), oracle, exclude_self=False)
    assert st._working_config == {}  # a config the caller chose is not remembered as the device's default


def test_triton_launcher_falls_back_to_a_smaller_tile_when_out_of_resources(monkeypatch):
    pytest.importorskip("triton")
    from concept_express.uce_kernels import sym_kl_triton as st

    big, small = st.TileConfig(128, 64, 4, 1), st.TileConfig(32, 32, 4, 1)
    launch = st._launch
    tried = []

    def fake_launch(operands, m, n, d, symmetric, precision, config):
        tried.append(config)
        if config == big:
            raise st.OutOfResources(300000, 232448, "shared memory")
        return launch(operands, m, n, d, symmetric, precision, config)

    monkeypatch.setattr(st, "_launch", fake_launch)
    monkeypatch.setattr(st, "candidate_configs", lambda device: [big, small])
    monkeypatch.setattr(st, "_working_config", {})
    rows = well_separated(96, 40, seed=24)
    kappa, dist = run(rows, backend="triton")
    check_first_neighbours(kappa, dist, oracle_distances(rows), exclude_self=True, allow_ties=False)
    assert tried == [big, small] and st.default_config(torch.device(TRITON_DEVICE)) == small
    run(rows, backend="triton")
    assert tried == [big, small, small]  # the working config is remembered


@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32"])
def test_every_triton_precision_is_accepted(precision):
    rows = well_separated(128, 64, seed=13)
    kappa, dist = run(rows, backend="triton", precision=precision)
    check_first_neighbours(kappa, dist, oracle_distances(rows), exclude_self=True, allow_ties=False)


# ---------------------------------------------------------------------------------------------- pruned search
def grid_attention(side: int, seed: int) -> np.ndarray:
    """Rows like aggregated self-attention on a side x side grid: each cell attends to nearby cells (a bump of random
    width) and more to cells of its own region (four quadrants of random size), with logit noise, plus 0.1 % uniform
    mass (no zeros, as in aggregated attention), prepared as the ops prepare them."""
    rng = np.random.default_rng(seed)
    yx = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1).reshape(-1, 2).astype(float)
    region = 2 * (yx[:, 0] > side * rng.uniform(0.3, 0.7)) + (yx[:, 1] > side * rng.uniform(0.3, 0.7))
    d2 = ((yx[:, None, :] - yx[None, :, :]) ** 2).sum(-1)
    width = rng.uniform(side / 16, side / 6, (side * side, 1))
    logits = -d2 / (2 * width**2) + 2.0 * (region[:, None] == region[None, :]) + rng.normal(0, 0.3, d2.shape)
    return prepare_distributions(torch.from_numpy(0.999 * softmax_rows(logits) + 0.001 / len(yx))).numpy()


def oracle_by_identity(a: np.ndarray) -> np.ndarray:
    """The definition expanded, d_ij = 1/2 (a_i.log a_i + a_j.log a_j - a_i.log a_j - a_j.log a_i), in float64 (errors
    ~1e-14, far below the tie tolerance): the oracle for fixtures too large for the elementwise one."""
    a = a.astype(np.float64)
    la = np.log(a)
    h = (a * la).sum(axis=1)
    cross = a @ la.T
    return 0.5 * (h[:, None] + h[None, :] - cross - cross.T)


def pruned_call(rows: np.ndarray):
    a = prepare_distributions(torch.from_numpy(rows))
    ((la, ha),) = sym_kl_torch.shifted_log_terms(a)
    stats = {}
    return sym_kl_pruned.first_neighbours_pruned(a, la, ha, stats), stats


def test_pruned_search_skips_most_pairs_and_still_finds_the_exact_neighbours():
    rows = grid_attention(32, seed=11)  # n = d = 1024: the default settings apply
    kappa, stats = pruned_call(rows)
    assert kappa is not None
    n = rows.shape[0]
    assert stats["pairs"] < 0.25 * n * (n - 1) / 2
    oracle = oracle_by_identity(rows)
    dist = sym_kl_pair_distances(torch.from_numpy(rows), torch.arange(n), kappa)
    check_first_neighbours(kappa, dist, oracle, exclude_self=True)
    # The public call takes this path at this size, and switching it off gives the same answer.
    assert torch.equal(run(rows)[0], kappa)


def test_pruned_search_hands_rows_without_structure_to_the_blocked_search():
    rows = softmax_rows(np.random.default_rng(12).normal(0.0, 1.0, (1024, 512)))
    kappa, _ = pruned_call(rows)
    assert kappa is None  # the bounds would keep nearly every pair
    kappa, dist = run(rows)
    check_first_neighbours(kappa, dist, oracle_by_identity(rows), exclude_self=True)


@pytest.mark.parametrize("fixture", ["grid", "random walk", "well separated"])
def test_projected_bound_never_exceeds_the_distance(fixture):
    rows = {
        "grid": lambda: grid_attention(16, seed=13),
        "random walk": lambda: random_walk(256, 256, seed=14),
        "well separated": lambda: well_separated(256, 256, seed=15),
    }[fixture]()
    x = sym_kl_pruned._coordinates(rows, 16)
    bound = 2.0 * ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    oracle = oracle_distances(rows)
    assert (bound <= oracle * (1 + 1e-9) + 1e-12).all()
    if fixture == "grid":  # and it is not vacuous: near neighbours are bounded to within a small factor
        np.fill_diagonal(oracle, np.inf)
        nearest = oracle.argmin(axis=1)
        rows_ = np.arange(len(rows))
        assert np.median(bound[rows_, nearest] / oracle[rows_, nearest]) > 0.25


# -------------------------------------------------------------------------------------------- reference mode
def numpy_reference_kld(mat1: np.ndarray, mat2: np.ndarray) -> np.ndarray:
    """The reference's two-GEMM form (ptp_utils.kld_distance), re-implemented in float32 numpy."""

    def compute_kld(p, q):
        return np.sum(p * np.log(p), axis=-1, keepdims=True) - p @ np.log(q).T

    return (compute_kld(mat1, mat2) + compute_kld(mat2, mat1).T) / 2


def valid_rows(rows: np.ndarray) -> np.ndarray:
    """Rows that preparation leaves alone (so both sides of a bitwise comparison see the same numbers)."""
    prepared = prepare_distributions(torch.from_numpy(rows)).numpy()
    assert np.array_equal(prepare_distributions(torch.from_numpy(prepared)).numpy(), prepared)
    return prepared


def test_reference_mode_is_bitwise_the_reference_self_case():
    rows = valid_rows(random_walk(400, 256, seed=14))
    expected = numpy_reference_kld(rows, rows)
    got = reference_distance_matrix(torch.from_numpy(rows)).numpy()
    assert got.dtype == np.float32 and np.array_equal(got, expected)
    np.fill_diagonal(expected, 1e12)
    kappa, dist = run(rows, mode="reference")
    ref_kappa = np.argmin(expected, axis=1)
    assert np.array_equal(kappa.numpy(), ref_kappa)
    assert np.array_equal(dist.numpy(), expected[np.arange(400), ref_kappa])


def test_reference_mode_is_bitwise_the_reference_queries_case():
    others = valid_rows(random_walk(300, 128, seed=15))
    queries = valid_rows(random_walk(50, 128, seed=16))
    expected = numpy_reference_kld(queries, others)
    assert np.array_equal(
        reference_distance_matrix(torch.from_numpy(queries), torch.from_numpy(others)).numpy(), expected
    )
    kappa, dist = run(queries, others, mode="reference")
    assert np.array_equal(kappa.numpy(), np.argmin(expected, axis=1))
    assert np.array_equal(dist.numpy(), expected[np.arange(50), kappa.numpy()])


def test_reference_mode_guards_zeros_where_the_reference_gives_nan():
    rows = random_walk(100, 64, seed=17)
    rows[4, 3] = 0.0
    with np.errstate(all="ignore"):
        assert np.isnan(numpy_reference_kld(rows, rows)).any()
    kappa, dist = run(rows, mode="reference")
    prepared = prepare_distributions(torch.from_numpy(rows)).numpy()
    expected = numpy_reference_kld(prepared, prepared)
    np.fill_diagonal(expected, 1e12)
    assert np.array_equal(kappa.numpy(), np.argmin(expected, axis=1))
    assert torch.isfinite(dist).all()


def test_fast_mode_agrees_with_the_reference_except_near_ties():
    rows = random_walk(512, 256, seed=18)
    fast, _ = run(rows)
    ref, _ = run(rows, mode="reference")
    oracle = oracle_distances(rows)
    check_first_neighbours(fast, sym_kl_pair_distances(torch.from_numpy(rows), torch.arange(512), fast), oracle, True)
    check_first_neighbours(ref, sym_kl_pair_distances(torch.from_numpy(rows), torch.arange(512), ref), oracle, True)


# --------------------------------------------------------------------------------------- pair and dense distances
def test_pair_distances_match_the_oracle():
    rng = np.random.default_rng(19)
    rows = random_walk(150, 300, seed=19)
    rows[10] = rows[11]  # a zero-distance pair
    i = torch.from_numpy(rng.integers(0, 150, 5000))
    j = torch.from_numpy(rng.integers(0, 150, 5000))
    i[0], j[0] = 10, 11
    got = sym_kl_pair_distances(torch.from_numpy(rows), i, j)
    oracle = oracle_distances(rows)[i.numpy(), j.numpy()]
    assert got.dtype == torch.float32 and got[0].item() == 0.0 and (got >= 0).all()
    np.testing.assert_allclose(got.numpy(), oracle, rtol=1e-5, atol=1e-9)


def test_pair_distances_stay_accurate_for_near_duplicate_rows():
    rng = np.random.default_rng(20)
    base = rng.normal(0, 1, (20, 4096))
    rows = softmax_rows(np.concatenate([base, base + rng.normal(0, 1e-3, (20, 4096))]))
    i, j = torch.arange(20), torch.arange(20, 40)
    got = sym_kl_pair_distances(torch.from_numpy(rows), i, j).numpy()
    oracle = oracle_distances(rows)[np.arange(20), np.arange(20, 40)]
    assert oracle.max() < 1e-5  # tiny distances: a cancelling formula would lose all digits here
    np.testing.assert_allclose(got, oracle, rtol=1e-4)


def test_dense_distances_match_the_oracle():
    rows = random_walk(40, 500, seed=21, step=0.3)
    others = random_walk(25, 500, seed=22, step=0.3)
    got = sym_kl_distances(torch.from_numpy(rows))
    assert got.shape == (40, 40) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), oracle_distances(rows), rtol=1e-6, atol=1e-7)
    assert got.diagonal().abs().max().item() < 1e-6  # not filled
    np.testing.assert_allclose(
        sym_kl_distances(torch.from_numpy(rows), torch.from_numpy(others)).numpy(),
        oracle_distances(rows, others),
        rtol=1e-6,
        atol=1e-7,
    )


def test_dense_distances_with_zeros_are_finite():
    x = torch.zeros(5, 16)
    x[:, 0] = 1.0
    x[1, 1] = 1.0
    d = sym_kl_distances(x)
    assert torch.isfinite(d).all() and (d >= 0).all() and d[0, 1] > 1.0


# ----------------------------------------------------------------------------------------------------- dispatch
def test_importing_the_package_does_not_import_triton():
    code = "import sys, concept_express.uce_kernels as k; assert 'triton' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    code = (
        "import sys, torch, concept_express.uce_kernels as k; k.sym_kl_first_neighbours(torch.rand(8, 4)); "
        "assert 'triton' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


class _CudaLike:
    is_cuda = True


def test_auto_dispatch(monkeypatch):
    assert _dispatch.choose_backend("auto", torch.zeros(1)) == "torch"
    assert _dispatch.choose_backend("torch", _CudaLike()) == "torch"
    monkeypatch.setattr(_dispatch, "triton_available", lambda: True)
    assert _dispatch.choose_backend("auto", _CudaLike()) == "triton"
    monkeypatch.setattr(_dispatch, "triton_available", lambda: False)
    assert _dispatch.choose_backend("auto", _CudaLike()) == "torch"  # CUDA without triton falls back to torch
    with pytest.raises(RuntimeError):
        _dispatch.choose_backend("triton", torch.zeros(1))


def test_bad_arguments_are_refused():
    x = torch.rand(10, 8)
    for kw in (
        {"backend": "cuda"},
        {"precision": "fp16"},
        {"mode": "exact"},
        {"mode": "reference", "backend": "triton"},
    ):
        with pytest.raises(ValueError):
            sym_kl_first_neighbours(x, **kw)
    with pytest.raises(ValueError):
        sym_kl_first_neighbours(x[:1])
    with pytest.raises(ValueError):
        sym_kl_first_neighbours(x, torch.rand(4, 9))
    with pytest.raises(ValueError):
        sym_kl_pair_distances(x, torch.arange(3), torch.arange(4))


def test_pair_distances_accumulated_in_float32_as_on_mps(monkeypatch):
    """Apple's MPS has no float64: pair distances then accumulate in float32 and stay accurate."""
    assert _device.accumulation_dtype(torch.device("mps")) == torch.float32
    assert _device.accumulation_dtype(torch.device("cpu")) == torch.float64
    monkeypatch.setattr(sym_kl_torch, "accumulation_dtype", lambda device: torch.float32)
    rows = random_walk(30, 200, seed=23, step=0.3)
    oracle = oracle_distances(rows)
    i, j = torch.arange(30), torch.arange(29, -1, -1)
    np.testing.assert_allclose(
        sym_kl_pair_distances(torch.from_numpy(rows), i, j).numpy(), oracle[i.numpy(), j.numpy()], rtol=1e-5, atol=1e-8
    )


def test_rows_that_require_grad_are_accepted():
    x = torch.rand(20, 16, requires_grad=True)
    kappa, dist = sym_kl_first_neighbours(x)
    assert kappa.shape == (20,) and not dist.requires_grad


# --------------------------------------------------------------------------------- the torch path on CUDA tensors
# A CUDA tensor runs the blocked search's torch engine (the "torch-engine" cases above run it on the CPU) when triton
# is missing or the Triton kernel was refused on the device (tests/test_kernels_guard.py).
def test_torch_engine_multiplies_in_full_float32_whatever_the_process_tf32_setting(monkeypatch):
    """A host program may allow TF32 for the whole process; the torch engine's GEMMs still run in full float32, and
    the setting comes back afterwards (the spy records the setting each GEMM saw)."""
    monkeypatch.setattr(sym_kl_search, "CPU_ENGINE", "torch")
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")
    name, tf32, ieee = ("fp32_precision", "tf32", "ieee") if new_api else ("allow_tf32", True, False)
    seen = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: seen.append(getattr(matmul, name)) or mm(*a, **k))
    rows = well_separated(128, 64, seed=25)
    previous = getattr(matmul, name)
    setattr(matmul, name, tf32)
    try:
        kappa, dist = run(rows)
        assert getattr(matmul, name) == tf32
    finally:
        setattr(matmul, name, previous)
    assert seen and set(seen) == {ieee}
    check_first_neighbours(kappa, dist, oracle_distances(rows), exclude_self=True, allow_ties=False)


def test_matmul_precision_is_restored_after_an_error():
    matmul = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    before = getattr(matmul, name)
    with pytest.raises(KeyError), _device.cuda_matmul_precision(tf32=before in ("ieee", "none", False)):
        assert getattr(matmul, name) != before
        raise KeyError
    assert getattr(matmul, name) == before


def test_torch_engine_keeps_the_running_best_without_masked_writes(monkeypatch):
    """A masked (boolean-index) read or write makes a GPU wait for the host at every block: the engine uses where."""
    monkeypatch.setattr(sym_kl_search, "CPU_ENGINE", "torch")
    monkeypatch.setattr(sym_kl_search, "STRIP_ROWS", 32)
    rows = random_walk(160, 64, seed=26)
    x = torch.from_numpy(rows)
    ((la, ha),) = sym_kl_torch.shifted_log_terms(x)
    masked = []
    get, put = torch.Tensor.__getitem__, torch.Tensor.__setitem__

    def is_mask(index):
        return isinstance(index, torch.Tensor) and index.dtype == torch.bool

    monkeypatch.setattr(
        torch.Tensor, "__getitem__", lambda t, i: (masked.append(i) if is_mask(i) else None) or get(t, i)
    )
    monkeypatch.setattr(
        torch.Tensor, "__setitem__", lambda t, i, v: (masked.append(i) if is_mask(i) else None) or put(t, i, v)
    )
    kappa = sym_kl_search.first_neighbours_blocked(x, la, ha)
    monkeypatch.undo()
    assert not masked
    dist = sym_kl_pair_distances(x, torch.arange(160), kappa)
    check_first_neighbours(kappa, dist, oracle_distances(rows), exclude_self=True)
