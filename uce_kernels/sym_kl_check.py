"""The self-check of the Triton first-neighbour kernel (run by ``_guard`` before backend="auto" trusts it on a device).

The problem has clear answers: CLUSTERS chains of three rows over COLUMNS columns, shuffled: a centre c (random
logits), m1 = c + STEP e1 and m2 = m1 + sqrt(2) STEP e2 (e1, e2 random logit directions). With d ~ |logit change|^2 / 2
for small changes, c's nearest is m1 (d ~ STEP^2 / 2, m2 three times farther), m1's is c (m2 twice as far), m2's is
m1 (c 1.5 times as far), and chains lie far apart. Queries: fresh noisy copies of some centres (step STEP), whose
nearest row is that centre (m1 twice as far). ``tests/test_kernels_guard.py`` checks against float64 maths that every
answer wins by at least 10 % relative (measured: 30 %; TF32's error is ~1e-3), so a float32 search of any precision
must give exactly these indices.

The expected answers come from the torch path on the CPU, once per process. On the device under test the kernel's
indices must equal them; the distances d(i, kappa_i) computed there must match the CPU's within DISTANCE_RTOL; FINCH's
components of the kernel's first neighbours (computed there) must equal the CPU's labels. The sizes are multiples of
16, as a latent grid's n is, so the check compiles the same specialisation as the real calls, and not multiples of any
tile size, so ragged tile edges and off-diagonal tiles are exercised.
"""

import functools

import torch

from . import sym_kl_torch
from ._guard import SelfCheckFailed
from .finch_ops import first_neighbour_clusters
from .sym_kl_search import first_neighbours_blocked

CLUSTERS, COLUMNS, QUERIES = 96, 208, 48  # 288 rows
CENTRE_SCALE, STEP = 0.5, 0.2  # logit noise of the centres, and the first step along a chain
DISTANCE_RTOL = 1e-5


@functools.cache
def check_problem() -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (3 CLUSTERS, COLUMNS), queries (QUERIES, COLUMNS)): float32 CPU distributions, the same in every
    process."""
    g = torch.Generator().manual_seed(16)

    def noise(count, scale):
        return scale * torch.randn(count, COLUMNS, generator=g, dtype=torch.float64)

    centres = noise(CLUSTERS, CENTRE_SCALE)
    first = centres + noise(CLUSTERS, STEP)
    second = first + noise(CLUSTERS, 2**0.5 * STEP)
    rows = torch.cat([centres, first, second])[torch.randperm(3 * CLUSTERS, generator=g)]
    queries = centres[torch.randperm(CLUSTERS, generator=g)[:QUERIES]] + noise(QUERIES, STEP)
    return rows.softmax(dim=1).float(), queries.softmax(dim=1).float()


@functools.cache
def expected(queries: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch path's answer on the CPU: (kappa, d(i, kappa_i), FINCH labels of kappa (self case; empty else))."""
    a, b = _operands(queries, torch.device("cpu"))
    kappa = _search(a, b, first_neighbours_blocked)
    dist = sym_kl_torch.pair_distances(a, a if b is None else b, None, kappa)
    labels = first_neighbour_clusters(kappa) if b is None else torch.empty(0, dtype=torch.long)
    return kappa, dist, labels


def self_check(device: torch.device, precision: str, queries: bool) -> None:
    """Run the Triton kernel on the check problem on ``device``; raise SelfCheckFailed where it disagrees."""
    from .sym_kl_triton import first_neighbours_triton  # imports triton: an import error is a failure too

    want_kappa, want_dist, want_labels = expected(queries)
    a, b = _operands(queries, device)
    got = _search(a, b, functools.partial(first_neighbours_triton, precision=precision))
    n = a.shape[0] if b is None else b.shape[0]
    if got.shape != want_kappa.shape:
        raise SelfCheckFailed(f"the kernel returned shape {tuple(got.shape)}, expected {tuple(want_kappa.shape)}")
    got = got.long()
    low, high = int(got.min()), int(got.max())
    if low < 0 or high >= n:  # before any gather with these indices (an out-of-range gather kills a CUDA context)
        raise SelfCheckFailed(f"the kernel returned indices in [{low}, {high}], outside [0, {n})")
    got_cpu = got.cpu()
    wrong = (got_cpu != want_kappa).nonzero().flatten()
    if wrong.numel():
        r = int(wrong[0])
        raise SelfCheckFailed(
            f"first neighbours differ from the torch path on {wrong.numel()} of {len(got_cpu)} rows "
            f"(row {r}: {int(got_cpu[r])} instead of {int(want_kappa[r])}; the answers are clear by a 10 % margin)"
        )
    dist = sym_kl_torch.pair_distances(a, a if b is None else b, None, got).cpu()
    if not torch.allclose(dist, want_dist, rtol=DISTANCE_RTOL, atol=0.0):
        r = int((dist - want_dist).abs().argmax())
        raise SelfCheckFailed(f"d(i, kappa_i) on row {r} is {float(dist[r])!r}, the CPU's {float(want_dist[r])!r}")
    if b is None and not torch.equal(first_neighbour_clusters(got).cpu(), want_labels):
        raise SelfCheckFailed("FINCH components of the kernel's first neighbours differ from the torch path's")


def _operands(queries: bool, device: torch.device):
    rows, qs = (t.to(device) for t in check_problem())
    return (qs, rows) if queries else (rows, None)


def _search(a, b, search):
    if b is None:
        ((la, ha),) = sym_kl_torch.shifted_log_terms(a)
        return search(a, la, ha)
    (la, ha), (lb, hb) = sym_kl_torch.shifted_log_terms(a, b)
    return search(a, la, ha, b, lb, hb)
