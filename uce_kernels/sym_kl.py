"""Symmetric KL between rows: first neighbours, pair distances and small dense matrices (the public entry points).

d(a, b) = 1/2 (KL(a || b) + KL(b || a)) for rows a, b that are distributions. Every function prepares its rows with
``prepare_distributions`` (float32, floor 2^-24, rows summing to 1), so zeros, NaNs and fp16/bf16 inputs are fine and
no NaN comes out. Which implementation runs is decided in one place (``_dispatch.choose_backend``).
"""

import functools

import torch

from . import _dispatch, _guard, sym_kl_check, sym_kl_torch
from ._dispatch import PRECISIONS
from .distributions import prepare_distributions
from .sym_kl_pruned import first_neighbours_pruned
from .sym_kl_reference import first_neighbours_reference
from .sym_kl_search import first_neighbours_blocked

MODES = ("fast", "reference")


def sym_kl_first_neighbours(
    rows: torch.Tensor,
    others: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    precision: str = "ieee",
    mode: str = "fast",
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row, the index of its nearest neighbour under symmetric KL, and that distance.

    others=None: each of the m rows against the other rows (itself excluded; needs m >= 2). others given (n, d): each
    row against all n others, nothing excluded. Exact ties go to the lowest index. Returns (kappa int64 [m],
    distance float32 [m]) on the rows' device.

    backend: "auto" (Triton for CUDA tensors when triton imports and the kernel passed its self-check on that device,
    else torch: see ``_guard``), "triton" (raises where Triton fails) or "torch".
    precision: Triton's tl.dot input precision, "ieee" | "tf32x3" | "tf32" (the torch path is always plain fp32).
    mode: torch path only. "fast" (default): blocked float32 search, about one n x n x d GEMM of work and no n x n
    matrix; rows of a CPU tensor against each other (from sym_kl_pruned.MIN_ROWS rows on) first try the pruned
    search (``sym_kl_pruned``: exact, it skips the pairs a lower bound rules out, 80-90 % on attention rows).
    "reference": the reference's numpy float32 arithmetic, bitwise the same first neighbours and distances as
    ptp_utils.kld_distance + np.argmin on the same rows (n x n memory; for verification).

    Distances: in "fast" mode and on Triton, d(i, kappa_i) is recomputed from the definition for the chosen pairs
    (``sym_kl_pair_distances``: never negative, relative error ~1e-7); in "reference" mode it is the reference's
    float32 matrix entry.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if mode == "reference" and backend == "triton":
        raise ValueError("mode='reference' is the numpy reference arithmetic; it cannot run on backend='triton'")
    a = _prepared(rows, "rows")
    b = None if others is None else _prepared(others, "others")
    if b is not None and b.shape[1] != a.shape[1]:
        raise ValueError(f"rows have {a.shape[1]} columns but others have {b.shape[1]}")
    if b is None and a.shape[0] < 2:
        raise ValueError("first neighbours among the rows themselves need at least two rows")
    if b is not None and b.shape[0] == 0 and a.shape[0] > 0:
        raise ValueError("others is empty: there is no neighbour to find")
    if a.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=a.device), torch.empty(0, device=a.device)

    chosen = _dispatch.choose_backend(backend, a)
    if mode == "reference":
        return first_neighbours_reference(a, b)
    if b is None:
        ((la, ha),) = sym_kl_torch.shifted_log_terms(a)
        lb = hb = None
    else:
        (la, ha), (lb, hb) = sym_kl_torch.shifted_log_terms(a, b)
    kappa = None
    if chosen == "triton":
        triton_call = functools.partial(_triton_first_neighbours, a, la, ha, b, lb, hb, precision)
        if backend == "triton":
            kappa = triton_call()
        else:  # auto: checked on first use on this device; None where the device was refused
            queries = b is not None
            kappa = _guard.run_guarded(
                "sym_kl_first_neighbours",
                f"{precision}, {'queries' if queries else 'self'}",
                a.device,
                functools.partial(sym_kl_check.self_check, a.device, precision, queries),
                lambda: _in_range(triton_call(), a.shape[0] if b is None else b.shape[0]),
            )
    if kappa is None:
        kappa = first_neighbours_pruned(a, la, ha) if b is None else None
        if kappa is None:
            kappa = first_neighbours_blocked(a, la, ha, b, lb, hb)
    del la, ha, lb, hb  # free the logs (m x d) before the distances allocate their chunks
    return kappa, sym_kl_torch.pair_distances(a, a if b is None else b, None, kappa)


def _triton_first_neighbours(a, la, ha, b, lb, hb, precision):
    from .sym_kl_triton import first_neighbours_triton  # imports triton

    return first_neighbours_triton(a, la, ha, b, lb, hb, precision=precision)


def _in_range(kappa: torch.Tensor, n: int) -> torch.Tensor:
    """kappa, after checking it can be used to gather (an out-of-range gather would kill a CUDA context)."""
    low, high = torch.stack(torch.aminmax(kappa)).tolist() if kappa.numel() else (0, 0)
    if low < 0 or high >= n:
        raise RuntimeError(f"the kernel returned indices in [{low}, {high}], outside [0, {n})")
    return kappa


def sym_kl_pair_distances(rows: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """d(rows[i[k]], rows[j[k]]) for each k (float32 [p]), from the definition, chunked over pairs."""
    if i.shape != j.shape or i.dim() != 1:
        raise ValueError(f"i and j must be 1-D of the same length, got {tuple(i.shape)} and {tuple(j.shape)}")
    a = _prepared(rows, "rows")
    i, j = i.to(device=a.device, dtype=torch.long), j.to(device=a.device, dtype=torch.long)
    return sym_kl_torch.pair_distances(a, a, i, j)


def sym_kl_distances(rows: torch.Tensor, others: torch.Tensor | None = None) -> torch.Tensor:
    """The dense float32 matrix of d(rows_i, others_j) (others=None: rows against rows; the diagonal is NOT filled,
    it holds ~0). Computed in float64 by the one-GEMM identity: for small inputs, e.g. tens of centroids."""
    a = _prepared(rows, "rows")
    b = None if others is None else _prepared(others, "others")
    if b is not None and b.shape[1] != a.shape[1]:
        raise ValueError(f"rows have {a.shape[1]} columns but others have {b.shape[1]}")
    return sym_kl_torch.dense_distances(a, b)


def _prepared(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor (count, d)")
    return prepare_distributions(x)
