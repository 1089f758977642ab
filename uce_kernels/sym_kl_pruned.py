"""Exact first neighbours among the rows of one matrix that skip most pairs (CPU): a lower bound in a few dimensions.

For positive p, q each term of the symmetric KL obeys (p - q)(log p - log q) >= 4 (sqrt p - sqrt q)^2 (it is
log t >= 2 (t - 1) / (t + 1) for t = p / q >= 1), and projecting onto orthonormal columns V never lengthens a vector:

    d(a_i, a_j) >= 2 |sqrt a_i - sqrt a_j|^2 >= 2 |x_i - x_j|^2,    x_i = V^T sqrt a_i                  (bound)

With V the PROJECTION_DIM leading principal directions of the square-rooted rows (from a sample of rows), the bound
for all pairs costs n^2 k instead of the n^2 d of the distances, and it is close to d for the pairs that matter: near
neighbours differ mostly along the leading directions (d ~ 2 |sqrt a_i - sqrt a_j|^2 when a_i ~ a_j).

The search, on the values h_j - cross_ij of the blocked search (``sym_kl_search``; d_ij = (h_i + value) / 2):
1. rows are cut into groups of at most GROUP_ROWS similar rows by recursive bisection of the x_i along their
   principal axis;
2. the pairs inside each group are computed exactly (one-GEMM identity), which gives every row an upper bound u_i on
   its nearest distance: the best found so far;
3. group by group, only the rows j of later groups with bound_ij <= max(u_i, u_j) + margin for some row i of the
   group are gathered and multiplied with the group. A skipped pair cannot be the nearest of either row: it is
   farther than a candidate already found. The products serve the group's rows (row minima) and the gathered rows
   (column minima), so each pair is computed at most once, and u tightens as the search goes.
The margin is three times a worst-case bound on the float32 rounding of a distance by the identity: cross_ij is a sum
of 2d products whose magnitudes add up to at most 2 max|l| (rows sum to 1), so it is off by at most 2d eps 2 max|l|,
a distance by half that, 2 d eps max|l| (eps = 2^-24); the bounds themselves are computed in float64. So a skipped
pair's float32 value would exceed the value of the candidate already kept: the answer is the full search's, up to
float32 rounding inside near ties, and exact ties go to the lowest index.

Rows without such structure leave most pairs in: when a sample of groups says more than MAX_KEPT_FRACTION of the
pairs would be computed, ``first_neighbours_pruned`` returns None and the caller runs the blocked search.
"""

import numpy as np
import torch

from .sym_kl_search import keep_better

ENABLED = True  # tests and benchmarks switch it off to compare with the blocked search
MIN_ROWS = 1024  # below this the full search takes milliseconds
PROJECTION_DIM = 32  # k: dimensions of the bound
GROUP_ROWS = 128
MAX_KEPT_FRACTION = 0.5
GATHER_BYTES = 4 << 20  # per gathered operand (a and log a rows of the later groups), float32
_SAMPLE_ROWS = 256  # rows whose principal directions give V
_CHUNK_ROWS = 128  # rows square-rooted and projected at a time (float64)
_EPS = 2.0**-24


def first_neighbours_pruned(a: torch.Tensor, la: torch.Tensor, ha: torch.Tensor, stats: dict | None = None):
    """argmin_j (h_j - cross_ij) over the other rows j of ``a``, as ``first_neighbours_blocked`` does for b=None, or
    None where this search does not apply (pruning off, not a CPU tensor, fewer than MIN_ROWS rows, d too small for
    the bound to be cheaper) or would not pay (too many pairs kept). ``stats`` receives "pairs", the pairs computed."""
    n, d = a.shape
    if not ENABLED or a.device.type != "cpu" or n < MIN_ROWS or d < 8 * PROJECTION_DIM:
        return None
    a_np, la_np, h = a.numpy(), la.numpy(), ha.numpy()
    x = _coordinates(a_np, PROJECTION_DIM)
    groups = [np.sort(g) for g in _bisect(x, GROUP_ROWS)]
    margin = 6.0 * d * _EPS * max(float(la_np.max()), -float(la_np.min()))
    search = _Search(a_np, la_np, h, x, groups, margin)
    for g in range(len(groups)):
        search.within_group(g)
    if search.kept_fraction_estimate() > MAX_KEPT_FRACTION:
        return None
    for g in range(len(groups) - 1):
        search.against_later_groups(g)
    if stats is not None:
        stats["pairs"] = search.pairs
    return torch.from_numpy(search.idx)


def _coordinates(a: np.ndarray, k: int) -> np.ndarray:
    """x_i = V^T sqrt(a_i) for every row, float64 (n, k'), k' <= k; V: orthonormal (QR in float64), spanning about the
    leading directions of a sample (found in float32: any orthonormal V gives a valid bound, a good one a tight bound).
    The square roots are taken in float32 (relative error 2^-24, far below the margin), the projection in float64."""
    n = a.shape[0]
    sample = np.sqrt(a[:: max(1, n // _SAMPLE_ROWS)])
    sample -= sample.mean(axis=0)
    _, vectors = np.linalg.eigh((sample @ sample.T).astype(np.float64))  # ascending eigenvalues
    v, _ = np.linalg.qr((sample.T @ vectors[:, ::-1][:, :k].astype(np.float32)).astype(np.float64))
    x = np.empty((n, v.shape[1]))
    for r0 in range(0, n, _CHUNK_ROWS):
        np.matmul(np.sqrt(a[r0 : r0 + _CHUNK_ROWS]).astype(np.float64), v, out=x[r0 : r0 + _CHUNK_ROWS])
    return x


def _bisect(x: np.ndarray, leaf: int) -> list[np.ndarray]:
    """Row indices in groups of at most ``leaf``, by splitting at the median along each part's principal axis."""
    groups, parts = [], [np.arange(x.shape[0])]
    while parts:
        rows = parts.pop()
        if rows.shape[0] <= leaf:
            groups.append(rows)
            continue
        centred = x[rows] - x[rows].mean(axis=0)
        axis = centred[np.argmax((centred * centred).sum(axis=1))]  # start at the farthest point: never orthogonal
        for _ in range(6):  # power iteration on the part's covariance
            axis = centred.T @ (centred @ axis)
            axis /= max(np.linalg.norm(axis), 1e-300)
        ordered = rows[np.argsort(centred @ axis, kind="stable")]
        half = ordered.shape[0] // 2
        parts += [ordered[half:], ordered[:half]]
    return groups


class _Search:
    """Best value and index per row, and the exact products of the pairs the bounds keep."""

    def __init__(self, a, la, h, x, groups, margin):
        self.a, self.la, self.h, self.groups, self.margin = a, la, h, groups, margin
        self.order = np.concatenate(groups)  # positions: group after group
        self.x = x[self.order]
        self.sq = (self.x * self.x).sum(axis=1)
        self.starts = np.cumsum([0] + [g.shape[0] for g in groups])
        n, d = a.shape
        self.val = np.full(n, np.inf, dtype=np.float32)  # by row index
        self.idx = np.zeros(n, dtype=np.int64)
        rows = max(64, GATHER_BYTES // (4 * d))
        self.gathered = np.empty((2, rows, d), dtype=np.float32)
        self.pairs = 0

    def within_group(self, g: int) -> None:
        rows = self.groups[g]
        cross = self._cross(self.a[rows], self.la[rows], self.a[rows], self.la[rows])
        vals = self.h[rows][None, :] - cross
        np.fill_diagonal(vals, np.inf)
        j = vals.argmin(axis=1)
        self.val[rows], self.idx[rows] = vals[np.arange(rows.shape[0]), j], rows[j]
        self.pairs += rows.shape[0] * (rows.shape[0] - 1) // 2

    def kept_fraction_estimate(self, sample_every: int = 4) -> float:
        sampled = range(0, len(self.groups) - 1, sample_every)
        kept = sum(self._kept_later_rows(g).shape[0] * self.groups[g].shape[0] for g in sampled)
        total = sum((self.starts[-1] - self.starts[g + 1]) * self.groups[g].shape[0] for g in sampled)
        return kept / max(total, 1)

    def against_later_groups(self, g: int) -> None:
        rows = self.groups[g]
        a_rows, la_rows = self.a[rows], self.la[rows]
        later = self._kept_later_rows(g)
        step = self.gathered.shape[1]
        for c0 in range(0, later.shape[0], step):
            cols = later[c0 : c0 + step]
            a_cols, la_cols = (
                np.take(m, cols, axis=0, out=buf[: cols.shape[0]])
                for m, buf in ((self.a, self.gathered[0]), (self.la, self.gathered[1]))
            )
            cross = self._cross(a_rows, la_rows, a_cols, la_cols)
            vals = self.h[cols][None, :] - cross
            j = vals.argmin(axis=1)
            keep_better(self.val, self.idx, rows, vals[np.arange(rows.shape[0]), j], cols[j])
            vals = np.subtract(self.h[rows][:, None], cross, out=vals)
            i = vals.argmin(axis=0)
            keep_better(self.val, self.idx, cols, vals[i, np.arange(cols.shape[0])], rows[i])
        self.pairs += rows.shape[0] * later.shape[0]

    def _kept_later_rows(self, g: int) -> np.ndarray:
        """Row indices j of the groups after g, ascending, with bound_ij <= max(u_i, u_j) + margin for some i in g."""
        s0, s1 = self.starts[g], self.starts[g + 1]
        u = 0.5 * (self.h[self.order].astype(np.float64) + self.val[self.order])
        bound = self.x[s0:s1] @ self.x[s1:].T  # 2 |x_i - x_j|^2, in place
        bound *= -2.0
        bound += self.sq[s0:s1, None]
        bound += self.sq[None, s1:]
        bound *= 2.0
        for_cols = bound.min(axis=0) <= u[s1:] + self.margin
        bound -= u[s0:s1, None]
        for_rows = bound.min(axis=0) <= self.margin
        return np.sort(self.order[s1:][for_rows | for_cols])

    @staticmethod
    def _cross(a_rows, la_rows, a_cols, la_cols) -> np.ndarray:
        cross = a_rows @ la_cols.T
        cross += la_rows @ a_cols.T
        return cross
