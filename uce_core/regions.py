"""Regions on the latent grid, held as a label per cell: masks, the mean attention of a region (paper eq. 6), the EOT
saliency score (eq. 5), and which regions touch (4-connectivity).

A cell label is a region index 0..k-1, or -1 for a cell in no region. Everything is vectorised tensor arithmetic
on the labels' device; nothing loops over cells in Python.
"""

from __future__ import annotations

import torch

from ..uce_kernels import cluster_means


def masks_of(cell_labels: torch.Tensor, k: int, grid: tuple[int, int]) -> torch.Tensor:
    """(k, h, w) bool masks of regions 0..k-1."""
    regions = torch.arange(k, device=cell_labels.device)
    return (cell_labels.reshape(1, -1) == regions[:, None]).reshape(k, *grid)


def areas(cell_labels: torch.Tensor, k: int) -> torch.Tensor:
    """Cells per region, int64 (k,)."""
    inside = cell_labels >= 0
    return torch.bincount(cell_labels[inside], minlength=k)[:k]


def relabel(cell_labels: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
    """Cell labels after regions are renamed: region r becomes ``mapping[r]``; -1 stays -1 (and ``mapping[r] = -1``
    takes a region out)."""
    inside = cell_labels >= 0
    return torch.where(inside, mapping[cell_labels.clamp(min=0)], torch.full_like(cell_labels, -1))


def region_means(rows: torch.Tensor, cell_labels: torch.Tensor, k: int) -> torch.Tensor:
    """Paper eq. 6: f_r = m_r A / |m_r|, the mean attention row of the cells of region r, float32 (k, d).

    ``rows`` has one row per grid cell. Cells in no region are summed into a spare cluster k that is dropped, so no
    row is copied."""
    spare = torch.where(cell_labels >= 0, cell_labels, torch.full_like(cell_labels, k))
    return cluster_means(rows, spare.reshape(-1), k + 1)[:k]


def eot_scores(eot: torch.Tensor, cell_labels: torch.Tensor, k: int) -> torch.Tensor:
    """Paper eq. 5 as a ratio: mean EOT activation over each region divided by its mean over the whole grid (float64).

    A region is salient iff its score is > 1. Sums are float64 per region plus one bin for cells in no region, and the
    grid's total is the sum of those bins, so a region covering the whole grid scores exactly 1.
    """
    labels = cell_labels.reshape(-1)
    spare = torch.where(labels >= 0, labels, torch.full_like(labels, k))
    sums = torch.bincount(spare, weights=eot.reshape(-1).double(), minlength=k + 1)
    counts = torch.bincount(spare, minlength=k + 1).double()
    grid_mean = sums.sum() / labels.numel()
    return (sums[:k] / counts[:k].clamp(min=1)) / grid_mean


def touching(image: torch.Tensor, k: int) -> torch.Tensor:
    """(k, k) bool, True where some cell of region i is a 4-neighbour of some cell of region j (i != j).

    ``image`` is the (h, w) label image. For disjoint regions this is the reference's get_connect test (the union of
    two masks has fewer connected components than the two apart), computed by comparing the label image with itself
    shifted by one cell right and one cell down.
    """
    if image.dim() != 2:
        raise ValueError(f"cell labels must form an (h, w) image, got shape {tuple(image.shape)}")
    a = torch.cat([image[:, :-1].reshape(-1), image[:-1, :].reshape(-1)])
    b = torch.cat([image[:, 1:].reshape(-1), image[1:, :].reshape(-1)])
    meet = (a >= 0) & (b >= 0) & (a != b)
    out = torch.zeros(k, k, dtype=torch.bool, device=image.device)
    out[a[meet], b[meet]] = True
    return out | out.T
