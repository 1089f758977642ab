"""Synthetic attention with known concepts, for the localization benchmark (a stand-in for the paper's CLEVR set,
appendix B, which needs a diffusion model and the dataset).

A scene on an h x w grid: background regions (Voronoi cells) and M objects (ellipses, 1 cell apart), optionally split
into parts. Every segment has a feature vector; objects of the same category ("look-alikes") share theirs up to a
small jitter. Each cell's feature is its segment's plus Gaussian noise, and the self-attention row of cell p is a
softmax over cells q of

    beta * <g_p, g_q> - |x_p - x_q|^2 / (2 sigma^2) + logit noise,

i.e. attention to cells that look alike, preferring nearby ones, as diffusion self-attention does, mixed with a little
uniform attention. The end-of-text
map is high on objects (each with its own saliency) and low on the background, noisy, and average-pooled to a 4x
coarser grid like the reference's 16x16 map. The ground truth is one mask per object. Everything comes from
one seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .attention import AttentionMaps


@dataclass(frozen=True)
class SceneSpec:
    grid: tuple[int, int] = (64, 64)
    objects: tuple[int, int] = (3, 5)  # inclusive range of the number of objects
    background_regions: int = 2
    parts: bool = False  # split each object in two parts with distinct (but related) features
    lookalikes: int = 0  # objects that copy another object's category
    feature_noise: float = 0.3  # per-cell feature noise (segment features have unit scale)
    logit_noise: float = 0.3  # per-entry noise on the attention logits
    eot_noise: float = 0.05
    beta: float = 3.0
    sigma: float = 0.35  # spatial scale of attention, as a fraction of the grid side
    uniform: float = 0.01  # share of uniform attention in every row, the broad floor that the low-resolution layers
    # put under aggregated SD attention; it keeps every entry far above the kernels' floor of 2^-24


@dataclass
class Scene:
    maps: AttentionMaps
    truth: torch.Tensor  # (M, h, w) bool, one mask per object
    seed: int
    spec: SceneSpec = field(default_factory=SceneSpec)


def make_scene(spec: SceneSpec, seed: int) -> Scene:
    rng = np.random.default_rng(seed)
    h, w = spec.grid
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    cells = np.stack([ys.ravel() / max(h, w), xs.ravel() / max(h, w)], axis=1)

    segment = _background(rng, spec.background_regions, cells).reshape(h, w)
    num_objects = int(rng.integers(spec.objects[0], spec.objects[1] + 1))
    objects = _place_objects(rng, num_objects, h, w)
    truth = np.stack(objects) if objects else np.zeros((0, h, w), bool)

    dim = 16
    features = [rng.normal(size=dim) for _ in range(spec.background_regions)]
    categories = [rng.normal(size=dim) for _ in objects]
    for k in range(min(spec.lookalikes, len(objects) - 1)):
        categories[k + 1] = categories[0] + 0.05 * rng.normal(size=dim)
    saliency = []
    for k, mask in enumerate(objects):
        pieces = _split(rng, mask) if spec.parts else [mask]
        for piece in pieces:
            segment[piece] = len(features)
            features.append(categories[k] + (0.5 * rng.normal(size=dim) if spec.parts else 0))
        saliency.append(rng.uniform(0.6, 1.0))
    features = np.stack(features) / np.sqrt(dim)

    g = features[segment.ravel()] + spec.feature_noise * rng.normal(size=(h * w, dim)) / np.sqrt(dim)
    distance2 = ((cells[:, None, :] - cells[None, :, :]) ** 2).sum(-1)
    logits = spec.beta * (g @ g.T) - distance2 / (2 * spec.sigma**2)
    logits += spec.logit_noise * rng.normal(size=logits.shape)
    logits -= logits.max(axis=1, keepdims=True)
    attention = np.exp(logits)
    attention *= (1 - spec.uniform) / attention.sum(axis=1, keepdims=True)
    attention += spec.uniform / (h * w)

    background = segment < spec.background_regions
    eot = np.empty((h, w))
    eot[background] = rng.uniform(0.05, 0.25, size=spec.background_regions)[segment[background]]
    for mask, s in zip(objects, saliency):
        eot[mask] = s
    eot = eot + spec.eot_noise * rng.normal(size=(h, w))
    eot = _pool(eot, 4) if h % 4 == 0 and w % 4 == 0 else eot

    image = _picture(segment, spec.background_regions, rng)
    maps = AttentionMaps(
        torch.from_numpy(attention.astype(np.float32)),
        torch.from_numpy(eot.astype(np.float32)),
        (h, w),
        image,
        {"synthetic": True, "seed": seed},
    )
    return Scene(maps, torch.from_numpy(truth), seed, spec)


def _background(rng, regions: int, cells: np.ndarray) -> np.ndarray:
    centres = rng.uniform(0, 1, size=(regions, 2)) * cells.max(axis=0)
    return np.argmin(((cells[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)


def _place_objects(rng, count: int, h: int, w: int, tries: int = 200) -> list[np.ndarray]:
    """Up to ``count`` ellipses, none within one cell of another."""
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    taken = np.zeros((h, w), bool)
    objects = []
    for _ in range(tries):
        if len(objects) == count:
            break
        ry, rx = rng.uniform(0.08, 0.18, size=2) * np.array([h, w])
        cy, cx = rng.uniform(ry, h - ry), rng.uniform(rx, w - rx)
        mask = ((ys - cy) / max(ry, 1.0)) ** 2 + ((xs - cx) / max(rx, 1.0)) ** 2 <= 1.0
        if mask.sum() < 4 or (_dilate(mask) & taken).any():
            continue
        objects.append(mask)
        taken |= mask
    return objects


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _split(rng, mask: np.ndarray) -> list[np.ndarray]:
    """Two parts of a mask, cut by a random line through its centre."""
    ys, xs = np.nonzero(mask)
    angle = rng.uniform(0, np.pi)
    side = (ys - ys.mean()) * np.cos(angle) + (xs - xs.mean()) * np.sin(angle) >= 0
    parts = []
    for keep in (side, ~side):
        part = np.zeros_like(mask)
        part[ys[keep], xs[keep]] = True
        if part.any():
            parts.append(part)
    return parts


def _pool(image: np.ndarray, factor: int) -> np.ndarray:
    h, w = image.shape
    return image.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def _picture(segment: np.ndarray, background_regions: int, rng, cell: int = 8) -> torch.Tensor:
    """A flat-coloured picture of the segments (for overlays): greys for the background, colours for objects."""
    count = int(segment.max()) + 1
    colours = rng.integers(40, 230, size=(count, 3))
    colours[:background_regions] = rng.integers(90, 170, size=(background_regions, 1))
    picture = colours[segment].astype(np.uint8)
    return torch.from_numpy(np.repeat(np.repeat(picture, cell, axis=0), cell, axis=1).copy())
