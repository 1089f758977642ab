"""The world recipe's attention-focus stage: a short fine-tuning of the trained UNet that teaches it the two
attention properties ConceptExpress reads from a real Stable Diffusion model, because on this small model trained for
two CPU hours they do not emerge (or do not last).

1. **End-of-text focus.** The method's background filter (paper eq. 5) keeps a region only when the empty prompt's
   end-of-text (EOT) map is stronger on it than on the image. In real Stable Diffusion that focus comes from web-scale
   CLIP and training; in the world model it appeared early (foreground ratio 1.13 at UNet step 500, after the CLIP
   stage) and then faded as the UNet trained on (1.04 at step 2,000, 0.96 at 2,200). Each training caption's EOT
   column at the cross-attention layers the capture reads (down and up blocks, the grid closest to a quarter of the
   latent's: ``attention.closest_grid``) is pushed to put its mass on the scene's objects:

       L_eot = mean_b [ -log( sum_cells p_b(cell) * fg_b(cell) ) ]

   with p_b the head- and layer-averaged EOT column normalised over the cells and fg_b the fraction of each cell
   covered by objects.
2. **Object grouping in self-attention.** The method clusters self-attention rows (paper eq. 2-4); in real Stable
   Diffusion a pixel attends to the pixels of its own object. In the world model the rows group mostly by colour
   (with the true foreground in place of the EOT map, the default localization reached IoU 0.316 at UNet step 2,200),
   so two objects of one colour merge and an object's pattern splits it. Each query cell that one region (an object,
   or the background) covers for at least half (``PURE``) is pushed to put its row's mass on that region, at the
   timesteps below ``GROUP_BELOW`` (the capture's is 0):

       L_group = mean_(b, layer, pure cells i) [ -log( sum_j p_(b,layer)(i, j) * f_b(j, r_i) ) ]

   with p the head-averaged self-attention of each down and up layer (not the 4x4 middle), f_b(j, r) the fraction of
   cell j covered by region r and r_i the region covering cell i.

The loss is L_denoise + eot_weight * L_eot + group_weight * L_group, the denoising loss as the UNet stage has it; the
masks are re-rendered from the scenes' seeds. The stage fine-tunes the exponential moving average (the weights that
are exported) directly, at a low constant rate, for ``eot_steps`` steps.

From step ``eot_even_from`` on, both terms ask for *even* attention instead of mass: the cross-entropy from the
uniform distribution over the target to the attention,

    L_eot  = mean_b [ -sum_cells q_b(cell) log p_b(cell) ],          q_b = fg_b / sum fg_b
    L_group = mean_(b, layer, pure cells i) [ -sum_j q(j) log p(i, j) ],  q = f_b(., r_i) / sum_j f_b(j, r_i)

Mass alone is met by putting it anywhere on the target: the end-of-text column then sat on the most salient object
(the demo scene's ball got almost none, so the filter dropped it) and a row on a part of its object (objects
fragmented: with the true foreground in place of the EOT map, 3.8 concepts per scene for 3.3 objects). Spreading
the mass over the whole target makes the rows of one object alike, which is what FINCH's first neighbours need; on
the test scenes it raised recall from 0.66 to 0.90 (docs/world.md has the figures).

What this means for measurements: on the world model both attention properties are taught, not emergent, so
bench_world's localization and EOT figures say that the project's capture, clustering and filter find objects in a
model that has them (and that a wrong layer or grid breaks it), not that a small model develops them; docs/world.md
says so.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoints import load, restore, save, snapshot
from .evaluation import cell_coverage
from .scenes import SPLITS, compose_caption, render_scene

PURE = 0.5  # a query cell joins the grouping term when one region covers at least half of it (the benchmark's
# ground truth on the grid gives a cell to an object on the same rule: evaluation.truth_on_grid)
GROUP_BELOW = 500  # the grouping term is taught at timesteps below this (the capture reads t = 0; near t = 999 the
# latent is mostly noise and no model can tell its objects apart)


class FocusRecorder:
    """Attention processor: computes attention as diffusers' ``AttnProcessor`` does and keeps each call's
    head-averaged probabilities (B, queries, keys) in ``store`` under ``kind`` ("self" or "cross"), with their
    gradient."""

    def __init__(self, store: list, kind: str):
        self.store, self.kind = store, kind

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, None)
        batch = hidden_states.shape[0]
        self.store.append((self.kind, probs.view(batch, attn.heads, *probs.shape[1:]).mean(dim=1)))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


def regions_on_grid(seeds: list[int], grid: int) -> torch.Tensor:
    """(len(seeds), 6, grid * grid) fraction of each cell covered by each region: the background first, then the
    scene's objects (at most five; absent objects cover nothing)."""
    out = np.zeros((len(seeds), 6, grid * grid), dtype=np.float32)
    for i, seed in enumerate(seeds):
        masks = render_scene(seed).masks.astype(np.float32)
        labels = np.concatenate([1.0 - masks.sum(axis=0, keepdims=True), masks])  # the masks do not overlap
        out[i, : len(labels)] = cell_coverage(labels, (grid, grid)).reshape(len(labels), -1)
    return torch.from_numpy(out)


def eot_focus_loss(columns: torch.Tensor, foreground: torch.Tensor, even: bool = False) -> torch.Tensor:
    """(B, cells) EOT columns (any positive scale), (B, cells) foreground fractions -> the mean over the samples
    that have a foreground of -log(share of the column's mass on it), or with ``even`` of the cross-entropy from
    the foreground's uniform distribution to the column."""
    p = columns / columns.sum(dim=1, keepdim=True)
    has = foreground.sum(dim=1) > 0
    if not bool(has.any()):
        return columns.sum() * 0.0
    if even:
        q = foreground[has] / foreground[has].sum(dim=1, keepdim=True)
        return -(q * p[has].clamp_min(1e-8).log()).sum(dim=1).mean()
    return -p.mul(foreground).sum(dim=1)[has].clamp_min(1e-6).log().mean()


def group_loss(rows: torch.Tensor, regions: torch.Tensor, even: bool = False) -> torch.Tensor:
    """(B, n, n) self-attention rows (each sums to 1), (B, R, n) region fractions of the n cells -> the mean over
    the cells that one region covers for at least ``PURE`` of -log(share of the cell's row on that region), or with
    ``even`` of the cross-entropy from that region's uniform distribution to the row."""
    cover, own = regions.max(dim=1)  # (B, n)
    pure = cover >= PURE
    if not bool(pure.any()):
        return rows.sum() * 0.0
    if even:
        q = regions / regions.sum(dim=2, keepdim=True).clamp_min(1e-6)  # (B, R, n): uniform over each region
        terms = -torch.einsum("bij,brj->bir", rows.clamp_min(1e-8).log(), q)  # (B, n, R): cross-entropies
        return terms.gather(2, own.unsqueeze(-1)).squeeze(-1)[pure].mean()
    share = torch.einsum("bij,brj->bir", rows, regions)  # (B, n, R): mass of row i on region r
    return -share.gather(2, own.unsqueeze(-1)).squeeze(-1)[pure].clamp_min(1e-6).log().mean()


def _grids(unet, store: list, latents: torch.Tensor, cond: torch.Tensor) -> tuple[tuple[int, int], set[int]]:
    """The grid of the recorded cross-attention layers that the capture reads its EOT map from, and the sides of
    the recorded self-attention layers."""
    from ..attention import closest_grid

    store.clear()
    with torch.no_grad():
        unet(latents[:1], torch.zeros(1, dtype=torch.long), cond[:1])
    sides = {kind: {math.isqrt(p.shape[1]) for k, p in store if k == kind} for kind in ("self", "cross")}
    store.clear()
    return closest_grid([(side, side) for side in sides["cross"]], tuple(latents.shape[-2:]), 4), sides["self"]


def _recorders(unet, store: list) -> dict:
    """The down and up blocks' self- and cross-attention record; the middle block's 4x4 keeps its processor."""
    out = {}
    for name, proc in unet.attn_processors.items():
        if name.startswith("mid_block"):
            out[name] = proc
        else:
            out[name] = FocusRecorder(store, "self" if name.endswith("attn1.processor") else "cross")
    return out


def _flip(cells: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """(B, ..., g * g) cell maps, mirrored left-right where ``flip`` (B,) is set."""
    g = math.isqrt(cells.shape[-1])
    mirrored = cells.unflatten(-1, (g, g)).flip(-1).flatten(-2)
    return torch.where(flip.view(-1, *[1] * (cells.dim() - 1)), mirrored, cells)


def stage_focus(out: Path, s, parts, latents: torch.Tensor, progress) -> dict | None:
    """Fine-tune ``parts["unet"]`` (the EMA weights) with the EOT-focus and grouping terms, checkpointed in
    ``OUT/focus.pt``; returns what it did (steps, grid, scenes, seconds, per-step losses), or None when
    ``eot_steps`` is 0."""
    if s.eot_steps <= 0:
        return None
    unet, text_encoder, tokenizer, scheduler = (parts[k] for k in ("unet", "text_encoder", "tokenizer", "scheduler"))
    seeds = [SPLITS["train"][s.seed * s.scenes + i] for i in range(min(s.eot_scenes, len(latents)))]
    objects = json.loads((out / "data" / "objects.json").read_text())
    store: list = []
    original = dict(unet.attn_processors)
    unet.set_attn_processor(_recorders(unet, store))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=s.eot_lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(s.seed + 5)
    rng = np.random.default_rng(s.seed + 6)
    step, curves, seconds = 0, {"denoise": [], "focus": [], "group": []}, 0.0
    path = out / "focus.pt"
    state = load(path)
    if state is not None:
        restore(state, generator, rng, unet=unet, optimizer=optimizer)
        step, curves, seconds = state["step"], state["curves"], state["seconds"]
    started = time.time() - seconds
    eos = tokenizer.eos_token_id
    text_encoder.requires_grad_(False).eval()

    def encode(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids  # fmt: skip
        with torch.no_grad():
            return text_encoder(ids)[0], (ids == eos).int().argmax(dim=1)  # the first end-of-text token

    grid, self_sides = _grids(unet, store, latents, encode([""])[0])
    regions: dict[int, torch.Tensor] = {}  # side -> (scenes, 6, side * side)
    if step < s.eot_steps:
        regions = {side: regions_on_grid(seeds, side) for side in sorted(self_sides | {grid[0]})}
    alphas = scheduler.alphas_cumprod.float()
    snr = alphas / (1 - alphas)
    unet.requires_grad_(True).train()  # the EMA copy was frozen while it averaged
    bar = progress(total=s.eot_steps, initial=step, desc="teach the attention focus")
    while step < s.eot_steps:
        idx = torch.randint(len(seeds), (s.eot_batch,), generator=generator)
        flip = torch.rand(s.eot_batch, generator=generator) < 0.5
        x0 = torch.where(flip[:, None, None, None], latents[idx].flip(-1), latents[idx])
        cond, eot = encode([compose_caption(objects[int(i)], rng) for i in idx])
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (s.eot_batch,), generator=generator)
        store.clear()
        pred = unet(scheduler.add_noise(x0, noise, t), t, cond).sample
        weight = torch.clamp(snr[t], max=s.min_snr) / snr[t]
        denoise = (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        rows = torch.arange(s.eot_batch)
        cells = grid[0] * grid[1]
        columns = [p[rows, :, eot] for kind, p in store if kind == "cross" and p.shape[1] == cells]
        foreground = 1.0 - _flip(regions[grid[0]][idx], flip)[:, 0]
        even = step >= s.eot_even_from
        focus = eot_focus_loss(torch.stack(columns).mean(dim=0), foreground, even)
        low = t < GROUP_BELOW
        group = torch.stack([
            group_loss(p[low], _flip(regions[math.isqrt(p.shape[1])][idx], flip)[low], even)
            for kind, p in store if kind == "self"
        ]).mean()  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        (denoise + s.eot_weight * focus + s.group_weight * group).backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        for name, value in (("denoise", denoise), ("focus", focus), ("group", group)):
            curves[name].append(float(value.detach()))
        step += 1
        bar.update(1)
        bar.set_postfix(focus=f"{np.mean(curves['focus'][-20:]):.3f}", group=f"{np.mean(curves['group'][-20:]):.3f}")
        if step % s.checkpoint_every == 0 or step == s.eot_steps:
            save(path, {**snapshot(generator, rng, unet=unet, optimizer=optimizer), "step": step, "curves": curves,
                        "seconds": time.time() - started})  # fmt: skip
    bar.close()
    unet.set_attn_processor(original)
    unet.eval()
    return {"steps": step, "grid": list(grid), "scenes": len(seeds), "seconds": round(time.time() - started),
            **curves}  # fmt: skip
