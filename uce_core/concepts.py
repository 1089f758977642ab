"""``Concepts``: what localization hands to token learning (paper eq. 7's lookup table minus the tokens).

For each of N concepts: a binary mask on the latent grid (m_i), the mean self-attention of its region (f_i of
eq. 6, a distribution over the grid positions) and its EOT saliency score (eq. 5's ratio). ``info`` records how
they were found (chosen FINCH level, N', delta, settings, provenance of the attention maps).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

FORMAT = "concept-express/concepts/1"


@dataclass
class Concepts:
    masks: torch.Tensor  # (N, h, w) bool
    features: torch.Tensor  # (N, h*w) float32, each row sums to 1 (f_i)
    scores: torch.Tensor  # (N,) float32, mean EOT activation in the mask / mean over the image
    grid: tuple[int, int]
    image: torch.Tensor  # (H, W, 3) uint8, the image as the model saw it
    info: dict = field(default_factory=dict)
    # the AttentionMaps the concepts were found on, when known (not saved): editing uses it to compute f_i of new
    # masks (concept_edits.py)
    attention: object = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.grid = tuple(int(x) for x in self.grid)
        n, (h, w) = self.masks.shape[0], self.grid
        if self.masks.shape != (n, h, w) or self.features.shape != (n, h * w) or self.scores.shape != (n,):
            raise ValueError(
                f"inconsistent shapes: masks {tuple(self.masks.shape)}, features "
                f"{tuple(self.features.shape)}, scores {tuple(self.scores.shape)}, grid {self.grid}"
            )
        self.masks = self.masks.bool()

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    def masks_at(self, size: tuple[int, int]) -> torch.Tensor:
        """(N, H, W) float masks nearest-upsampled to ``size`` (H, W), e.g. the image resolution."""
        return torch.nn.functional.interpolate(self.masks[:, None].float(), size=size, mode="nearest")[:, 0]

    def masks_on_source(self) -> torch.Tensor:
        """(N, H, W) float masks on the user's original image (before resizing and cropping), from the crop the
        capture recorded; areas cropped away are 0. Falls back to the working image when that is unknown."""
        size, box = self.info.get("source_size"), self.info.get("source_crop")
        if not size or not box:
            return self.masks_at(tuple(self.image.shape[:2]))
        width, height = size
        left, top, right, bottom = (int(round(v)) for v in box)
        out = torch.zeros(len(self), height, width)
        out[:, top:bottom, left:right] = self.masks_at((bottom - top, right - left))
        return out

    def save(self, path: str | os.PathLike) -> Path:
        from .fileio import save_tensors

        meta = {"grid": list(self.grid), "info": self.info, "format": FORMAT}
        tensors = {
            "masks": self.masks.to(torch.uint8),
            "features": self.features,
            "scores": self.scores,
            "image": self.image,
        }
        return save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Concepts:
        from .fileio import load_tensors

        t, meta = load_tensors(path, expected_format=FORMAT)
        return cls(t["masks"].bool(), t["features"], t["scores"], tuple(meta["grid"]), t["image"], meta.get("info", {}))

    def overlay(self, alpha: float = 0.45) -> Image.Image:
        """The image with each concept tinted in its own colour, outlined, and numbered 1..N (the number sits at the
        cell of the mask farthest from its border, so it lands inside rings and crescents too)."""
        from PIL import ImageDraw, ImageFont

        from .previews import PALETTE

        image = self.image.numpy().astype(np.float64)
        height, width = image.shape[:2]
        masks = self.masks_at((height, width)).numpy() > 0.5
        line = max(1, round(min(height, width) / 200))
        for i, mask in enumerate(masks):
            colour = np.array(PALETTE[i % len(PALETTE)], dtype=np.float64)
            image[mask] = (1 - alpha) * image[mask] + alpha * colour
            inner = mask
            for _ in range(line):
                inner = _erode(inner)
            image[mask & ~inner] = colour
        picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(picture)
        size = max(12, min(height, width) // 24)
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: fixed-size bitmap font
            font = ImageFont.load_default()
        (h, w) = self.grid
        names = list(self.info.get("names") or [])
        names += [None] * (len(self) - len(names))
        for i, mask in enumerate(self.masks.numpy()):
            if not mask.any():
                continue
            y, x = _deepest_cell(mask)
            cx, cy = (x + 0.5) * width / w, (y + 0.5) * height / h
            text = f"{i + 1} {names[i]}" if names[i] else str(i + 1)
            left, top, right, bottom = draw.textbbox((cx, cy), text, font=font, anchor="mm")
            colour = PALETTE[i % len(PALETTE)]
            draw.rectangle([left - 3, top - 2, right + 3, bottom + 2], fill=colour, outline=(255, 255, 255))
            dark = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 140
            draw.text((cx, cy), text, fill=(0, 0, 0) if dark else (255, 255, 255), font=font, anchor="mm")
        return picture


def _erode(mask: np.ndarray) -> np.ndarray:
    """Cells of ``mask`` whose four neighbours are all in it (outside the array counts as outside the mask)."""
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    out[0] = out[-1] = False
    out[:, 0] = out[:, -1] = False
    return out


def _deepest_cell(mask: np.ndarray) -> tuple[int, int]:
    """The cell of a non-empty mask that survives the most erosions (nearest the mask's mean on ties)."""
    depth = np.zeros(mask.shape, dtype=np.int64)
    layer = mask
    while layer.any():
        depth += layer
        layer = _erode(layer)
    ys, xs = np.nonzero(depth == depth.max())
    k = np.argmin((ys - np.nonzero(mask)[0].mean()) ** 2 + (xs - np.nonzero(mask)[1].mean()) ** 2)
    return int(ys[k]), int(xs[k])
