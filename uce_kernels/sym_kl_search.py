"""The blocked first-neighbour search of the torch path ("fast" mode): no m x n matrix, one GEMM's worth of flops.

With L = log A + c and h_i = a_i . l_i (``sym_kl_torch.shifted_log_terms``), row i's nearest neighbour is
argmin_j (h_j - cross_ij) with cross_ij = a_i . l_j + l_i . a_j; the 1/2 and h_i of d_ij do not change it.

Self case: cross is symmetric, so only the triangle is computed. Rows are cut into strips of STRIP_ROWS; strip I is
multiplied with the later columns [end of I, n) (a rectangular GEMM pair) whose products serve both the strip's rows
(row minima) and every later row (column minima, h_i - cross_ij), and the strip's square diagonal block is the same
problem on fewer rows, solved recursively with strips a quarter the size down to squares of BASE_ROWS. So the search
costs about the flops of one n x n x d GEMM (the reference computes two), mostly in large GEMMs, with 2 strips x n
floats of scratch. A candidate replaces a row's running best when it is smaller, or equal with a lower index
(``keep_better``): exact ties go to the lowest index, as np.argmin does, in whatever order blocks come.

Queries against other rows: strips of queries times all the other rows, row minima only.

On CPU tensors the blocks run in numpy (OpenBLAS in the numpy wheels) on the tensors' memory, without copies: its
sgemm measured 20-25 % faster than torch's MKL sgemm on the development machine (AMD EPYC), and keeping the whole
search in one thread pool avoids the oversubscription that interleaving OpenBLAS and torch's OpenMP pool caused under
load. On other devices (a CUDA tensor when triton is missing or its kernel was refused there) the same blocks run in
torch, in full float32 whatever the TF32 setting.
"""

import contextlib

import numpy as np
import torch

from ._device import cuda_matmul_precision

# Rows per top-level strip. None: d / 8 (a multiple of 64 in [256, 2048]), so that the scratch, 2 strips x n floats,
# stays under a quarter of L (n x d) while there are always about 8 strips: few, large GEMM calls. Each GEMM call is a
# synchronisation point of the BLAS threads, which costs dearly on a loaded machine.
STRIP_ROWS: int | None = None
# Diagonal blocks this small are searched as one square (both triangles). None: a quarter strip, i.e. one level of
# recursion, which wastes about strip / (4 n) of the flops (3 % when d = n).
BASE_ROWS: int | None = None
CPU_ENGINE = "numpy"  # "numpy" or "torch": which library runs the blocks for CPU tensors (tests use both)


def first_neighbours_blocked(a, la, ha, b=None, lb=None, hb=None) -> torch.Tensor:
    """argmin_j (h_j - cross_ij) for each row of ``a``; b=None: among the other rows of ``a``. int64, a's device."""
    symmetric = b is None
    strip = STRIP_ROWS or max(256, min(2048, a.shape[1] // 8 // 64 * 64))
    if symmetric:
        b, lb, hb = a, la, ha
        blocks = _triangle_blocks(0, a.shape[0], strip, BASE_ROWS or strip // 4)
    else:
        blocks = ((r0, min(r0 + strip, a.shape[0]), 0, b.shape[0]) for r0 in range(0, a.shape[0], strip))
    engine = _NumpyEngine if a.device.type == "cpu" and CPU_ENGINE == "numpy" else _TorchEngine
    search = engine(a, la, ha, b, lb, hb, scratch=min(strip, a.shape[0]) * b.shape[0])
    # Full float32 products in torch whatever TF32 setting the process chose (TF32 is ~1e-3 relative: not exact).
    with cuda_matmul_precision(tf32=False) if engine is _TorchEngine else contextlib.nullcontext():
        for r0, r1, c0, c1 in blocks:
            cross = search.cross(r0, r1, c0, c1)
            search.offer_row_minima(cross, r0, r1, c0, c1, exclude_self=symmetric and r0 == c0)
            if symmetric and c0 >= r1:
                search.offer_column_minima(cross, r0, r1, c0, c1)
    return search.best_index()


def _triangle_blocks(lo: int, hi: int, strip: int, base: int):
    """(r0, r1, c0, c1) blocks covering every pair of rows in [lo, hi): square diagonal blocks (r0 == c0) at the
    bottom of the recursion, and strips times their later columns; yielded so that each row meets its candidates in
    increasing column order (earlier strips' column minima, then its diagonal block, then its later columns)."""
    if hi - lo <= base:
        yield lo, hi, lo, hi
        return
    for r0 in range(lo, hi, strip):
        r1 = min(r0 + strip, hi)
        yield from _triangle_blocks(r0, r1, max(strip // 4, base), base)
        if r1 < hi:
            yield r0, r1, r1, hi


class _NumpyEngine:
    def __init__(self, a, la, ha, b, lb, hb, scratch: int):
        self.device = a.device
        self.a, self.la, self.ha, self.b, self.lb, self.hb = (t.numpy() for t in (a, la, ha, b, lb, hb))
        self.buffers = np.empty((2, scratch), dtype=np.float32)
        self.val = np.full(a.shape[0], np.inf, dtype=np.float32)
        self.idx = np.zeros(a.shape[0], dtype=np.int64)

    def cross(self, r0, r1, c0, c1):
        shape = (r1 - r0, c1 - c0)
        cross, other = (buf[: shape[0] * shape[1]].reshape(shape) for buf in self.buffers)
        np.matmul(self.a[r0:r1], self.lb[c0:c1].T, out=cross)
        np.matmul(self.la[r0:r1], self.b[c0:c1].T, out=other)
        return np.add(cross, other, out=cross)

    def _values(self, shape):
        return self.buffers[1][: shape[0] * shape[1]].reshape(shape)

    def offer_row_minima(self, cross, r0, r1, c0, c1, exclude_self: bool):
        vals = np.subtract(self.hb[c0:c1], cross, out=self._values(cross.shape))
        if exclude_self:
            np.fill_diagonal(vals, np.inf)
        j = vals.argmin(axis=1)
        keep_better(self.val, self.idx, slice(r0, r1), vals[np.arange(r1 - r0), j], j + c0)

    def offer_column_minima(self, cross, r0, r1, c0, c1):
        vals = np.subtract(self.ha[r0:r1, None], cross, out=self._values(cross.shape))
        best = vals.min(axis=0)
        # argmin along axis 0 is ~3x slower in numpy than this: the lowest row holding the minimum, by a second min.
        holds_best = vals == best
        vals.fill(np.inf)
        np.copyto(vals, np.arange(r1 - r0, dtype=np.float32)[:, None], where=holds_best)
        keep_better(self.val, self.idx, slice(c0, c1), best, vals.min(axis=0).astype(np.int64) + r0)

    def best_index(self) -> torch.Tensor:
        return torch.from_numpy(self.idx).to(self.device)


class _TorchEngine:
    def __init__(self, a, la, ha, b, lb, hb, scratch: int):
        self.a, self.la, self.ha, self.b, self.lb, self.hb = a, la, ha, b, lb, hb
        self.buffers = torch.empty((2, scratch), dtype=torch.float32, device=a.device)
        self.val = torch.full((a.shape[0],), float("inf"), dtype=torch.float32, device=a.device)
        self.idx = torch.zeros(a.shape[0], dtype=torch.long, device=a.device)

    def cross(self, r0, r1, c0, c1):
        cross = self.buffers[0][: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
        torch.mm(self.a[r0:r1], self.lb[c0:c1].T, out=cross)
        return cross.addmm_(self.la[r0:r1], self.b[c0:c1].T)

    def _values(self, shape):
        return self.buffers[1][: shape[0] * shape[1]].view(shape)

    def offer_row_minima(self, cross, r0, r1, c0, c1, exclude_self: bool):
        vals = torch.sub(self.hb[c0:c1], cross, out=self._values(cross.shape))
        if exclude_self:
            vals.diagonal().fill_(float("inf"))
        v, j = vals.min(dim=1)
        keep_better(self.val, self.idx, slice(r0, r1), v, j + c0)

    def offer_column_minima(self, cross, r0, r1, c0, c1):
        v, i = torch.sub(self.ha[r0:r1, None], cross, out=self._values(cross.shape)).min(dim=0)
        keep_better(self.val, self.idx, slice(c0, c1), v, i + r0)

    def best_index(self) -> torch.Tensor:
        return self.idx


def keep_better(best_val, best_idx, rows, val, idx) -> None:
    """Keep the candidates that are smaller, or equal with a lower index: np.argmin's rule, whatever order candidates
    come in. numpy arrays or torch tensors alike; ``rows`` a slice or an index array (without repeats)."""
    current, current_idx = best_val[rows], best_idx[rows]
    better = (val < current) | ((val == current) & (idx < current_idx))
    if isinstance(current, torch.Tensor):  # where, not masked writes: no host synchronisation on a GPU
        best_val[rows] = torch.where(better, val, current)
        best_idx[rows] = torch.where(better, idx, current_idx)
        return
    current[better] = val[better]
    current_idx[better] = idx[better]
    best_val[rows], best_idx[rows] = current, current_idx
