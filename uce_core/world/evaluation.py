"""Measuring a model on the scene world: localization against the ground truth, the end-of-text map's foreground
ratio, and the two low-level baselines the world is built to defeat.

Ground truth on the latent grid: a cell belongs to an object when at least half of its pixels do (area fraction),
and to at most one object (the one covering most of it). Predictions are scored with the project's Hungarian
metrics (``evaluate.score_masks``, the paper's eqs. 18-20).

Baselines (on the image as the model sees it, average-pooled to the same grid, then scored the same way):

* ``kmeans_rgb``: k-means on the cells' RGB with k = number of objects + 1; every cluster but the one covering most
  of the image border is an object prediction (the border is the background);
* ``saturation_components``: cells whose HSV saturation exceeds the image's Otsu threshold, split into
  4-connected components, each component of at least 2 cells an object prediction.
"""

from __future__ import annotations

import numpy as np
import torch

from ..evaluate import LocalizationScore, kmeans, score_masks
from .scenes import Scene


def cell_coverage(masks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(M, H, W) pixel masks -> (M, h, w) share of each grid cell's pixels that each mask covers."""
    m, size, _ = masks.shape
    h, w = grid
    return masks.reshape(m, h, size // h, w, size // w).mean(axis=(2, 4))


def truth_on_grid(scene: Scene, grid: tuple[int, int]) -> torch.Tensor:
    """(M, h, w) bool: each object's cells (area fraction >= 0.5, each cell given to the object covering most)."""
    m = scene.masks.shape[0]
    cover = cell_coverage(scene.masks, grid)
    best = cover.argmax(axis=0)
    owned = (np.arange(m)[:, None, None] == best[None]) & (cover >= 0.5)
    return torch.from_numpy(owned)


def eot_foreground_ratio(eot_on_grid: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean of the end-of-text map over the objects' cells / its mean over the whole grid (1 = no object focus)."""
    inside = truth.any(dim=0)
    total = float(eot_on_grid.double().mean())
    if not bool(inside.any()) or total <= 0:
        return float("nan")
    return float(eot_on_grid.double()[inside].mean()) / total


def pooled_image(scene: Scene, grid: tuple[int, int]) -> np.ndarray:
    size = scene.image.shape[0]
    h, w = grid
    return scene.image.reshape(h, size // h, w, size // w, 3).astype(np.float64).mean(axis=(1, 3)) / 255.0


def kmeans_rgb(scene: Scene, grid: tuple[int, int], seed: int = 0) -> torch.Tensor:
    cells = pooled_image(scene, grid)
    k = len(scene.objects) + 1
    labels = kmeans(torch.from_numpy(cells.reshape(-1, 3)).float(), k, seed=seed).reshape(grid)
    border = torch.cat([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    background = int(torch.bincount(border, minlength=k).argmax())
    kept = [c for c in range(int(labels.max()) + 1) if c != background]
    return torch.stack([labels == c for c in kept]) if kept else torch.zeros((0, *grid), dtype=torch.bool)


def _otsu(values: np.ndarray) -> float:
    v = np.sort(values.ravel())
    best, threshold = -1.0, float(v[0])
    for i in range(1, len(v)):
        w0, w1 = i / len(v), 1 - i / len(v)
        between = w0 * w1 * (v[:i].mean() - v[i:].mean()) ** 2
        if between > best:
            best, threshold = between, float((v[i - 1] + v[i]) / 2)
    return threshold


def _components(mask: np.ndarray) -> list[np.ndarray]:
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp = np.zeros_like(mask, dtype=bool)
        stack = [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp[y, x] = True
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(comp)
    return out


def saturation_components(scene: Scene, grid: tuple[int, int]) -> torch.Tensor:
    cells = pooled_image(scene, grid)
    high, low = cells.max(axis=-1), cells.min(axis=-1)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-9), 0.0)
    parts = [c for c in _components(saturation > _otsu(saturation)) if c.sum() >= 2]
    return torch.from_numpy(np.stack(parts)) if parts else torch.zeros((0, *grid), dtype=torch.bool)


def score(predicted: torch.Tensor, truth: torch.Tensor) -> LocalizationScore:
    return score_masks(predicted.bool(), truth.bool())
