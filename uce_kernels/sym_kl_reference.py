"""The reference's float32 symmetric-KL arithmetic, for verification (mode="reference").

The official code (ptp_utils.kld_distance, clustering/finch.clust_rank) computes, in numpy float32,
K = h - A @ log(B).T with h = sum(A * log A) per row, D = (K_AB + K_BA.T) / 2, fills the diagonal with 1e12 and takes
np.argmin. In the self case its second GEMM is the same sgemm as the first, so D = (K + K.T) / 2 from one GEMM is bit
for bit the same (reference-spec 5.1). Bitwise agreement needs the same BLAS, so this runs in numpy (OpenBLAS in the
numpy wheels), not in torch (MKL on CPU). It materialises several m x n float32 matrices: a verification mode only.
Rows must be prepared (``prepare_distributions``); valid rows pass through preparation unchanged, so on inputs
without zeros this is the reference's own result.
"""

import numpy as np
import torch

DIAGONAL_FILL = np.float32(1e12)


def reference_distance_matrix(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's float32 distance matrix (its ``orig_dist`` before the diagonal fill), on a's device."""
    return torch.from_numpy(_distance_matrix(_as_numpy(a), None if b is None else _as_numpy(b))).to(a.device)


def first_neighbours_reference(a: torch.Tensor, b: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(kappa, d(i, kappa_i)) exactly as the reference computes them; b=None excludes each row itself."""
    dist = _distance_matrix(_as_numpy(a), None if b is None else _as_numpy(b))
    if b is None:
        np.fill_diagonal(dist, DIAGONAL_FILL)
    kappa = np.argmin(dist, axis=1)
    nearest = dist[np.arange(dist.shape[0]), kappa]
    return torch.from_numpy(kappa).to(a.device), torch.from_numpy(nearest).to(a.device)


def _as_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float32).numpy()


def _kld_terms(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """K_pq = h_p - p @ log(q).T, in the reference's operation order."""
    return np.sum(p * np.log(p), axis=-1, keepdims=True) - p @ np.log(q).T


def _distance_matrix(a: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    if b is None:
        k = _kld_terms(a, a)
        return (k + k.T) / 2
    return (_kld_terms(a, b) + _kld_terms(b, a).T) / 2
