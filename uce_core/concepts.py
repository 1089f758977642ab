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

    def __post_init__(self):
        self.grid = tuple(int(x) for x in self.grid)
        n, (h, w) = self.masks.shape[0], self.grid
        if self.masks.shape != (n, h, w) or self.features.shape != (n, h * w) or self.scores.shape != (n,):
            raise ValueError(f"inconsistent shapes: masks {tuple(self.masks.shape)}, features "
                             f"{tuple(self.features.shape)}, scores {tuple(self.scores.shape)}, grid {self.grid}")
        self.masks = self.masks.bool()

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    def feature_map(self, i: int) -> torch.Tensor:
        """f_i as an (h, w) map."""
        return self.features[i].view(self.grid)

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
        tensors = {"masks": self.masks.to(torch.uint8), "features": self.features, "scores": self.scores, "image": self.image}
        return save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Concepts":
        from .fileio import load_tensors

        t, meta = load_tensors(path, expected_format=FORMAT)
        return cls(t["masks"].bool(), t["features"], t["scores"], tuple(meta["grid"]), t["image"], meta.get("info", {}))

    def overlay(self, alpha: float = 0.55) -> Image.Image:
        """The image with each concept's mask tinted in its own colour and numbered 1..N."""
        from PIL import ImageDraw

        from .previews import PALETTE

        image = self.image.numpy().astype(np.float64)
        height, width = image.shape[:2]
        masks = self.masks_at((height, width)).numpy() > 0.5
        for i, mask in enumerate(masks):
            colour = np.array(PALETTE[i % len(PALETTE)], dtype=np.float64)
            image[mask] = (1 - alpha) * image[mask] + alpha * colour
        picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(picture)
        for i, mask in enumerate(masks):
            ys, xs = np.nonzero(mask)
            if len(ys):
                cy, cx = int(ys.mean()), int(xs.mean())
                draw.rectangle([cx - 7, cy - 8, cx + 9, cy + 8], fill=(255, 255, 255))
                draw.text((cx - 4, cy - 6), str(i + 1), fill=(0, 0, 0))
        return picture
