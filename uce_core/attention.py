"""Stage 1: capture the UNet's attention on one image and aggregate it (paper sec. 3.2 and appendix A; reference
spec sections 1.2-1.3).

One UNet call on the clean latent (posterior mean, no flip) at t = 0 with the empty prompt records

* every self-attention layer's probabilities, averaged over heads as they are computed and folded straight into
  one (n, n) accumulator (n = h*w of the target grid), so no layer map outlives its layer (peak extra memory: the aggregate, one layer's head-mean and a 32 MiB
  chunk of scores); and
* the end-of-text column of the cross-attention at the down and up layers whose grid is 1/4 of the latent grid
  (16x16 for a 64x64 latent: the reference's ``res=16, from_where=("up", "down")``), averaged over those layers and
  their heads (SDXL's mid block also runs at that grid; like the reference, it is left out).

Aggregation is the reference's (``aggregate_self_attention`` below), in float32: per layer, bilinear interpolation
of the key dimensions to the target grid (align_corners=False), nearest duplication of the query dimensions,
weight r/R (r the layer's grid side, R the target's; the reference's r/64), sum, divide by the sum of weights, and
renormalise every row to sum 1. A row that sums to zero (impossible for a softmax, but guarded) becomes uniform.

Non-square images keep their aspect ratio (see ``images.fit_to_model``): the latent grid is h x w, every layer's grid
is (h/f, w/f) for its downsampling factor f, and the same aggregation runs on rectangles. A layer finer than the
target grid (only when a coarser target is asked for) is reduced by averaging its query blocks instead of
duplicating them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConceptExpressError

# Bytes of float32 scores materialised at once (heads x query chunk x keys); bounds the temporary memory of a layer.
CHUNK_BYTES = 32 * 2**20


def grid_of(num_queries: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) grid of a layer with ``num_queries`` positions, from the latent grid it was computed on."""
    lh, lw = latent_hw
    factor = math.sqrt(lh * lw / num_queries)
    f = int(round(factor))
    if f < 1 or lh % f or lw % f or (lh // f) * (lw // f) != num_queries:
        raise ValueError(f"{num_queries} query positions do not tile the {lh}x{lw} latent grid")
    return lh // f, lw // f


def closest_grid(grids, latent_hw: tuple[int, int], factor: int = 4) -> tuple[int, int]:
    """Of the layer grids seen, the one closest to 1/``factor`` of the latent grid (ties: the finer one)."""
    wanted = latent_hw[0] / factor
    return min(grids, key=lambda g: (abs(math.log(g[0] / wanted)), -g[0]))


def attention_with_probs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float, chunk_bytes: int = CHUNK_BYTES
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention that also returns the probabilities averaged over heads.

    q: (B, Nq, heads*dq), k: (B, Nk, heads*dq), v: (B, Nk, heads*dv) -> out (B, Nq, heads*dv) in v's dtype and
    probs (B, Nq, Nk) in float32. Scores and softmax are float32 (also under autocast, which is switched off here)
    and computed for as many queries at a time as fit in ``chunk_bytes``. Without autograd the softmax runs in place and the head-means go straight into their
    output, so a layer needs only its (B, Nq, Nk) result plus one chunk; with autograd (training's small
    cross-attention layers) the same maths runs out of place.
    """
    with torch.autocast(q.device.type, enabled=False):
        return _attention_with_probs(q, k, v, heads, scale, chunk_bytes)


def _attention_with_probs(q, k, v, heads, scale, chunk_bytes):
    b, nq, _ = q.shape
    nk = k.shape[1]
    qh = q.reshape(b, nq, heads, -1).transpose(1, 2).float()
    kt = k.reshape(b, nk, heads, -1).transpose(1, 2).float().transpose(-1, -2)
    vh = v.reshape(b, nk, heads, -1).transpose(1, 2)
    rows = max(1, chunk_bytes // (4 * b * heads * nk))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        outs, means = [], []
        for start in range(0, nq, rows):
            probs = (torch.matmul(qh[:, :, start : start + rows], kt) * scale).softmax(dim=-1)
            outs.append(torch.matmul(probs.to(vh.dtype), vh))
            means.append(probs.mean(dim=1))
        out, mean = torch.cat(outs, dim=2), torch.cat(means, dim=1)
    else:
        out = torch.empty(b, heads, nq, vh.shape[-1], dtype=vh.dtype, device=vh.device)
        mean = torch.empty(b, nq, nk, dtype=torch.float32, device=q.device)
        for start in range(0, nq, rows):
            stop = min(nq, start + rows)
            scores = torch.matmul(qh[:, :, start:stop], kt).mul_(scale)
            scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
            scores.div_(scores.sum(dim=-1, keepdim=True))
            torch.mean(scores, dim=1, out=mean[:, start:stop])
            torch.matmul(scores.to(vh.dtype), vh, out=out[:, :, start:stop])
    return out.transpose(1, 2).reshape(b, nq, -1), mean


def aggregate_self_attention(
    acc: torch.Tensor, probs: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]
) -> float:
    """Add one layer's head-mean self-attention (Nq, Nk) on ``grid`` into ``acc`` (n, n) on ``target``, with the
    reference's weight r/R. Returns the weight (the caller divides by the sum of weights). No (n, n) temporary."""
    (rh, rw), (th, tw) = grid, target
    if rh * rw != probs.shape[0] or probs.shape[0] != probs.shape[1]:
        raise ValueError(f"self-attention of shape {tuple(probs.shape)} does not match grid {grid}")
    if (th % rh and rh % th) or (tw % rw and rw % tw) or (th * rw != tw * rh):
        raise ValueError(f"layer grid {grid} and target grid {target} are not integer multiples of each other")
    weight = rh / th
    keys = probs.float()
    if (rh, rw) != (th, tw):  # bilinear on the key dims, queries as channels (the reference's F.interpolate)
        keys = F.interpolate(keys.view(1, -1, rh, rw), size=(th, tw), mode="bilinear", align_corners=False)
    keys = keys.reshape(rh, rw, th * tw)
    if rh <= th:  # nearest duplication of the query dims
        fy, fx = th // rh, tw // rw
        acc.view(rh, fy, rw, fx, -1).add_(keys.view(rh, 1, rw, 1, -1), alpha=weight)
    else:  # a layer finer than the target: average its query blocks instead
        fy, fx = rh // th, rw // tw
        acc.view(th, tw, -1).add_(keys.view(th, fy, tw, fx, -1).mean(dim=(1, 3)), alpha=weight)
    return weight


def normalise_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Rows renormalised to sum 1 in place; an all-zero (or non-finite) row becomes uniform."""
    matrix.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).clamp_(min=0.0)
    sums = matrix.sum(dim=-1, keepdim=True)
    empty = sums.squeeze(-1) <= 0
    if bool(empty.any()):
        matrix[empty] = 1.0
        sums[empty] = matrix.shape[-1]
    return matrix.div_(sums)


class CaptureRecorder:
    """The ``AttentionRecorder`` used at capture: folds self-attention into the aggregate and keeps the mean
    cross-attention column of the end-of-text token per grid."""

    def __init__(self, target: tuple[int, int], eot_position: int, device: torch.device | str = "cpu"):
        self.target = tuple(target)
        n = self.target[0] * self.target[1]
        self.acc = torch.zeros(n, n, dtype=torch.float32, device=device)
        self.weight_sum = 0.0
        self.self_layers: list[tuple[int, int]] = []
        self.eot_position = eot_position
        self.eot_sums: dict[tuple[int, int], torch.Tensor] = {}
        self.eot_counts: dict[tuple[int, int], int] = {}

    def wants(self, layer) -> bool:
        return layer.kind == "self" or layer.place != "mid"  # the reference reads cross-attention from down and up

    def record(self, layer, probs: torch.Tensor) -> None:
        if probs.shape[0] != 1:
            raise ValueError("capture runs on one image at a time")
        grid = tuple(layer.grid)
        if layer.kind == "self":
            self.weight_sum += aggregate_self_attention(self.acc, probs[0].to(self.acc.device), grid, self.target)
            self.self_layers.append(grid)
        else:
            column = probs[0, :, self.eot_position].float().to(self.acc.device)
            self.eot_sums[grid] = self.eot_sums.get(grid, 0) + column
            self.eot_counts[grid] = self.eot_counts.get(grid, 0) + 1

    def self_attention(self) -> torch.Tensor:
        if not self.self_layers:
            raise ConceptExpressError("the model ran no self-attention layer; is this a Stable Diffusion UNet?")
        return normalise_rows(self.acc.div_(self.weight_sum))

    def eot_map(self, latent_hw: tuple[int, int], factor: int = 4) -> tuple[torch.Tensor, tuple[int, int]]:
        """Mean EOT column over the down and up cross-attention layers at 1/``factor`` of the latent grid (the
        reference's 16x16 for a 64x64 latent), or at the recorded grid closest to it."""
        if not self.eot_sums:
            raise ConceptExpressError("the model ran no cross-attention layer; is this a Stable Diffusion UNet?")
        grid = closest_grid(self.eot_sums, latent_hw, factor)
        mean = self.eot_sums[grid] / self.eot_counts[grid]
        return mean.view(grid).contiguous(), grid


@dataclass
class AttentionMaps:
    """Aggregated attention of one image.

    ``self_attention``: (n, n) float32, row i is a distribution over the n = h*w grid positions (row-major).
    ``eot``: (he, we) float32 end-of-text cross-attention, at its own grid (upsample with ``eot_on_grid``).
    ``image``: (H, W, 3) uint8, the image exactly as the model saw it (for previews and overlays).
    ``info``: provenance and settings (model, family, timestep, prompt, layers, resize mode, ...).
    """

    self_attention: torch.Tensor
    eot: torch.Tensor
    grid: tuple[int, int]
    image: torch.Tensor
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.grid = tuple(int(x) for x in self.grid)
        n = self.grid[0] * self.grid[1]
        if tuple(self.self_attention.shape) != (n, n):
            raise ValueError(
                f"self_attention must be ({n}, {n}) for grid {self.grid}, got {tuple(self.self_attention.shape)}"
            )

    @property
    def n(self) -> int:
        return self.grid[0] * self.grid[1]

    def eot_on_grid(self) -> torch.Tensor:
        """The EOT map bilinearly upsampled to the attention grid (what the filter of eq. 5 uses)."""
        return F.interpolate(self.eot[None, None].float(), size=self.grid, mode="bilinear", align_corners=False)[0, 0]

    def row_map(self, index: int) -> torch.Tensor:
        return self.self_attention[index].view(self.grid)

    def save(self, path: str | os.PathLike) -> Path:
        from .fileio import save_tensors

        meta = {"grid": list(self.grid), "info": self.info, "format": "concept-express/attention-maps/1"}
        tensors = {"self_attention": self.self_attention, "eot": self.eot, "image": self.image}
        return save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> AttentionMaps:
        from .fileio import load_tensors

        tensors, meta = load_tensors(path, expected_format="concept-express/attention-maps/1")
        return cls(
            tensors["self_attention"], tensors["eot"], tuple(meta["grid"]), tensors["image"], meta.get("info", {})
        )


def capture_attention(
    backend,
    image,
    *,
    timestep: int = 0,
    prompt: str = "",
    resize: str = "keep",
    resolution: int | None = None,
    grid: tuple[int, int] | None = None,
    noise_seed: int = 0,
    eot_factor: int = 4,
) -> AttentionMaps:
    """Run the capture on ``image`` (anything ``images.load_image`` takes) and return the aggregated maps.

    ``timestep`` 0 and ``prompt`` "" are the reference's choices. At t > 0 the latent is noised with a generator
    seeded by ``noise_seed`` (the reference never does this). ``grid`` defaults to the latent grid.
    """
    from .backends.base import Prompt
    from .images import crop_box, fit_to_model, load_image, to_tensor

    info = backend.info
    source = load_image(image)
    picture = fit_to_model(source, resolution or info.resolution, 8 * info.vae_scale_factor, resize)
    pixels = to_tensor(picture).to(backend.device)
    with torch.no_grad():
        latents = backend.encode_image(pixels)
        latent_hw = tuple(latents.shape[-2:])
        target = tuple(grid) if grid is not None else latent_hw
        timesteps = torch.tensor([timestep], dtype=torch.long)
        if timestep > 0:
            gen = torch.Generator(device="cpu").manual_seed(noise_seed)
            noise = torch.randn(latents.shape, generator=gen).to(latents)
            latents = backend.add_noise(latents, noise, timesteps)
        cond = backend.encode_prompts([Prompt.text(prompt)])
        recorder = CaptureRecorder(target, cond.eot_positions[0], device=latents.device)
        backend.predict(latents, timesteps.to(latents.device), cond, recorder)
        self_attention = recorder.self_attention().cpu()
        eot, eot_grid = recorder.eot_map(latent_hw, eot_factor)
    meta = {
        "model": info.name,
        "family": info.family,
        "prediction_type": info.prediction_type,
        "timestep": timestep,
        "prompt": prompt,
        "resize": resize,
        "latent_grid": list(latent_hw),
        "self_layers": [list(g) for g in recorder.self_layers],
        "eot_grid": list(eot_grid),
        "eot_layers": recorder.eot_counts[eot_grid],
        "eot_position": cond.eot_positions[0],
        "image_size": [picture.width, picture.height],
        "source_size": [source.width, source.height],
        "source_crop": list(crop_box(source.width, source.height, picture.size))
        if resize == "keep"
        else [0.0, 0.0, float(source.width), float(source.height)],
    }
    image_tensor = torch.from_numpy(np.asarray(picture, dtype=np.uint8).copy())
    return AttentionMaps(self_attention, eot.cpu(), target, image_tensor, meta)
