"""Symmetric KL in plain torch (any device): the blocked first-neighbour search, pair distances, dense matrices.

All functions here expect prepared rows (``prepare_distributions``: float32, strictly positive, rows summing to 1).

For such rows, with L = log A + c and h_i = a_i . l_i (the entropy term, shifted by c),

    d_ij = 1/2 (h_i + h_j - (a_i . l_j + l_i . a_j))                                                  (identity)

holds for every constant c: each of the four terms moves by c times a row sum, and the shifts cancel. We take c = minus
the mean of the unshifted h, which centres h and the cross terms near 0 instead of near -log d, so the float32
cancellation error in the first-neighbour search drops several-fold. For a fixed row i, argmin_j d_ij is
argmin_{j != i} (h_j - a_i . l_j - l_i . a_j): the 1/2 and h_i do not change it.
"""
import torch

STRIP_ROWS = 256  # rows per GEMM strip in the first-neighbour search (2 strips x n float32 of scratch)
_CHUNK_ELEMENTS = 1 << 22  # elementwise passes work on about this many entries at a time


def _row_chunks(rows: int, d: int):
    step = max(1, _CHUNK_ELEMENTS // max(d, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_k a_ik b_ik per row, accumulated in float64, without an (m, d) float64 temporary."""
    out = torch.empty(a.shape[0], dtype=torch.float64, device=a.device)
    for rows in _row_chunks(a.shape[0], a.shape[1]):
        out[rows] = (a[rows].double() * b[rows].double()).sum(dim=1)
    return out


def shifted_log_terms(*row_sets: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each prepared row matrix A: (L, h) with L = log A + c and h = rowwise A . L, one constant c for all sets.

    L has the dtype of A; h is computed in float64 from the rounded L (so the identity holds for the values the GEMM
    sees) and returned in A's dtype.
    """
    logs = [torch.log(a) for a in row_sets]
    shift = -torch.cat([row_dots(a, l) for a, l in zip(row_sets, logs)]).mean()
    terms = []
    for a, l in zip(row_sets, logs):
        l.add_(shift.to(l.dtype))
        terms.append((l, row_dots(a, l).to(a.dtype)))
    return terms


def first_neighbours_blocked(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """argmin_j d(a_i, b_j) for every row of ``a`` (b=None: against the other rows of ``a``), float32 throughout.

    b=None uses the symmetric strip scheme: strip I of rows computes the cross terms against columns j >= start of I
    only, and serves both its own rows (row minima) and the later rows (column minima), so the whole search costs the
    flops of one n x n x d GEMM (the reference computes two) and needs 2 x STRIP_ROWS x n floats of scratch, never an
    n x n matrix. Candidates reach each row in increasing column order and only strictly smaller values replace the
    running best, so exact ties go to the lowest index, as np.argmin does.
    """
    if b is None:
        ((l, h),) = shifted_log_terms(a)
        return _self_strips(a, l, h)
    (la, _), (lb, hb) = shifted_log_terms(a, b)
    return _cross_strips(a, la, b, lb, hb)


def _self_strips(a: torch.Tensor, l: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    n = a.shape[0]
    strip = min(STRIP_ROWS, n)
    best_val = torch.full((n,), float("inf"), dtype=torch.float32, device=a.device)
    best_idx = torch.zeros(n, dtype=torch.long, device=a.device)
    cross_buf = torch.empty(strip * n, dtype=torch.float32, device=a.device)
    vals_buf = torch.empty(strip * n, dtype=torch.float32, device=a.device)
    for r0 in range(0, n, strip):
        r1 = min(r0 + strip, n)
        rows, width = r1 - r0, n - r0
        cross = cross_buf[: rows * width].view(rows, width)  # a_i . l_j + l_i . a_j, i in strip, j >= r0
        torch.mm(a[r0:r1], l[r0:].T, out=cross)
        cross.addmm_(l[r0:r1], a[r0:].T)

        vals = vals_buf[: rows * width].view(rows, width)
        torch.sub(h[r0:].unsqueeze(0), cross, out=vals)
        vals.diagonal().fill_(float("inf"))  # column r0 + k is row r0 + k itself
        v, j = vals.min(dim=1)
        _keep_smaller(best_val, best_idx, slice(r0, r1), v, j + r0)

        if r1 < n:  # the same products, read column-wise, are the strip's candidates for every later row
            later = vals_buf[: rows * (n - r1)].view(rows, n - r1)
            torch.sub(h[r0:r1].unsqueeze(1), cross[:, rows:], out=later)
            v, i = later.min(dim=0)
            _keep_smaller(best_val, best_idx, slice(r1, n), v, i + r0)
    return best_idx


def _cross_strips(a, la, b, lb, hb) -> torch.Tensor:
    m, n = a.shape[0], b.shape[0]
    strip = min(STRIP_ROWS, m)
    best_idx = torch.empty(m, dtype=torch.long, device=a.device)
    cross = torch.empty(strip, n, dtype=torch.float32, device=a.device)
    for r0 in range(0, m, strip):
        r1 = min(r0 + strip, m)
        c = cross[: r1 - r0]
        torch.mm(a[r0:r1], lb.T, out=c)
        c.addmm_(la[r0:r1], b.T)
        best_idx[r0:r1] = (hb.unsqueeze(0) - c).argmin(dim=1)
    return best_idx


def _keep_smaller(best_val, best_idx, rows: slice, v, idx) -> None:
    better = v < best_val[rows]
    best_val[rows] = torch.where(better, v, best_val[rows])
    best_idx[rows] = torch.where(better, idx, best_idx[rows])


def pair_distances(a: torch.Tensor, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """d(a_i[k], b_j[k]) for each k, from the definition 1/2 sum (p - q)(log p - log q), chunked over pairs.

    Each term is evaluated as |p - q| * log1p(|p - q| / min(p, q)), which equals (p - q)(log p - log q) and is accurate
    to a few ulp for every ratio p / q: a difference of logs loses digits when p ~ q, log(p / q) when p ~ q too, and
    log1p((p - q) / q) when p << q. So every term is >= 0 and the result keeps its relative accuracy, also for
    near-duplicate rows and for entries at the floor.
    """
    out = torch.empty(i.shape[0], dtype=torch.float32, device=a.device)
    for pairs in _row_chunks(i.shape[0], a.shape[1]):
        p, q = a[i[pairs]], b[j[pairs]]
        gap = (p - q).abs_()
        terms = gap * torch.log1p(gap / torch.minimum(p, q))
        out[pairs] = (0.5 * terms.sum(dim=1, dtype=torch.float64)).float()
    return out


def dense_distances(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """The full m x n matrix of d(a_i, b_j) by the identity in float64 (accurate to ~1e-14), returned as float32."""
    a64 = a.double()
    if b is None:
        ((la, ha),) = shifted_log_terms(a64)
        b64, lb, hb = a64, la, ha
    else:
        b64 = b.double()
        (la, ha), (lb, hb) = shifted_log_terms(a64, b64)
    cross = a64 @ lb.T + la @ b64.T
    return (0.5 * (ha.unsqueeze(1) + hb.unsqueeze(0) - cross)).clamp_(min=0.0).float()
