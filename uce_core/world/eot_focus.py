"""The world recipe's EOT-focus stage: a short fine-tuning of the trained UNet that puts its end-of-text
cross-attention on the objects, because on this small model that focus does not emerge (or does not last).

Why: ConceptExpress's background filter (paper eq. 5) keeps a region only when the empty prompt's end-of-text (EOT)
map is stronger on it than on the image. In real Stable Diffusion that focus comes from web-scale CLIP and training;
in the world model it appeared early (foreground ratio 1.13 at UNet step 500, after the CLIP stage) and then faded
as the UNet trained on (1.04 at step 2,000, 0.96 at 2,200), while the self-attention's own grouping kept improving
(with the ground-truth foreground in place of the EOT map, the default localization's IoU went from 0.285 at step
1,200 to 0.316 at 2,200). So the recipe teaches it directly: alongside the usual denoising loss, each training
caption's EOT column at the cross-attention layers the capture reads (down and up blocks, the grid closest to a
quarter of the latent's: ``attention.closest_grid``) is pushed to put its mass on the scene's objects:

    L = L_denoise + w * mean_b [ -log( sum_cells p_b(cell) * fg_b(cell) ) ]

where p_b is the head- and layer-averaged EOT column normalised over the cells and fg_b the fraction of each cell
covered by objects (from the scene's exact masks, re-rendered from its seed). The stage fine-tunes the exponential
moving average (the weights that are exported) directly, at a low constant rate, for ``eot_steps`` steps.

What this means for measurements: on the world model the EOT map's object focus is taught, not emergent, so the
foreground ratio bench_world reports says the capture reads the layers it was taught on, not that a model develops
it; docs/world.md says so.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from .scenes import SIZE, SPLITS, compose_caption, render_scene


class EotRecorder:
    """Attention processor for the cross-attention layers: computes attention as diffusers' ``AttnProcessor`` does
    and keeps each call's head-averaged probabilities (B, queries, tokens), with their gradient."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, None)
        batch = hidden_states.shape[0]
        self.store.append(probs.view(batch, attn.heads, *probs.shape[1:]).mean(dim=1))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


def foreground_on_grid(seeds: list[int], grid: int) -> torch.Tensor:
    """(len(seeds), grid, grid) fraction of each cell covered by the scene's objects."""
    out = np.empty((len(seeds), grid, grid), dtype=np.float32)
    cell = SIZE // grid
    for i, seed in enumerate(seeds):
        covered = render_scene(seed).masks.any(axis=0).astype(np.float32)
        out[i] = covered.reshape(grid, cell, grid, cell).mean(axis=(1, 3))
    return torch.from_numpy(out)


def eot_focus_loss(columns: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """(B, cells) EOT columns (any positive scale), (B, cells) foreground fractions -> the mean over the samples
    that have a foreground of -log(share of the column's mass on it)."""
    share = (columns / columns.sum(dim=1, keepdim=True)).mul(foreground).sum(dim=1)
    has = foreground.sum(dim=1) > 0
    if not bool(has.any()):
        return columns.sum() * 0.0
    return -share[has].clamp_min(1e-6).log().mean()


def _capture_grid(unet, store: list, latents: torch.Tensor, cond: torch.Tensor) -> tuple[int, int]:
    """The grid of the recorded cross-attention layers that the capture reads its EOT map from."""
    from ..attention import closest_grid

    store.clear()
    with torch.no_grad():
        unet(latents[:1], torch.zeros(1, dtype=torch.long), cond[:1])
    sides = {math.isqrt(p.shape[1]) for p in store}
    store.clear()
    return closest_grid([(side, side) for side in sides], tuple(latents.shape[-2:]), 4)


def stage_eot(out: Path, s, parts, latents: torch.Tensor, progress, save, load) -> dict | None:
    """Fine-tune ``parts["unet"]`` (the EMA weights) with the EOT-focus term, checkpointed in ``OUT/eot.pt``;
    returns what it did (steps, grid, scenes, seconds, per-step losses), or None when ``eot_steps`` is 0."""
    if s.eot_steps <= 0:
        return None
    unet, text_encoder, tokenizer, scheduler = (parts[k] for k in ("unet", "text_encoder", "tokenizer", "scheduler"))
    seeds = [SPLITS["train"][s.seed * s.scenes + i] for i in range(min(s.eot_scenes, len(latents)))]
    objects = json.loads((out / "data" / "objects.json").read_text())
    store: list = []
    original = dict(unet.attn_processors)
    processors = {
        name: EotRecorder(store) if name.endswith("attn2.processor") and not name.startswith("mid_block") else proc
        for name, proc in unet.attn_processors.items()
    }
    unet.set_attn_processor(processors)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=s.eot_lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(s.seed + 5)
    rng = np.random.default_rng(s.seed + 6)
    step, denoise_curve, focus_curve, seconds = 0, [], [], 0.0
    path = out / "eot.pt"
    state = load(path)
    if state is not None:
        unet.load_state_dict(state["unet"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        rng.bit_generator.state = state["rng"]
        step, denoise_curve, focus_curve, seconds = state["step"], state["denoise"], state["focus"], state["seconds"]
    started = time.time() - seconds
    eos = tokenizer.eos_token_id
    text_encoder.requires_grad_(False).eval()

    def encode(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids  # fmt: skip
        with torch.no_grad():
            return text_encoder(ids)[0], (ids == eos).int().argmax(dim=1)  # the first end-of-text token

    grid = _capture_grid(unet, store, latents, encode([""])[0])
    foreground = foreground_on_grid(seeds, grid[0]) if step < s.eot_steps else None
    alphas = scheduler.alphas_cumprod.float()
    snr = alphas / (1 - alphas)
    unet.requires_grad_(True).train()  # the EMA copy was frozen while it averaged
    bar = progress(total=s.eot_steps, initial=step, desc="teach the EOT focus")
    while step < s.eot_steps:
        idx = torch.randint(len(seeds), (s.eot_batch,), generator=generator)
        x0, fg = latents[idx], foreground[idx]
        flip = torch.rand(s.eot_batch, generator=generator) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        fg = torch.where(flip[:, None, None], fg.flip(-1), fg)
        cond, eot = encode([compose_caption(objects[int(i)], rng) for i in idx])
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (s.eot_batch,), generator=generator)
        store.clear()
        pred = unet(scheduler.add_noise(x0, noise, t), t, cond).sample
        weight = torch.clamp(snr[t], max=s.min_snr) / snr[t]
        denoise = (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        rows = torch.arange(s.eot_batch)
        columns = [p[rows, :, eot] for p in store if p.shape[1] == grid[0] * grid[1]]
        focus = eot_focus_loss(torch.stack(columns).mean(dim=0), fg.flatten(1))
        optimizer.zero_grad(set_to_none=True)
        (denoise + s.eot_weight * focus).backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        denoise_curve.append(float(denoise))
        focus_curve.append(float(focus))
        step += 1
        bar.update(1)
        bar.set_postfix(focus=f"{np.mean(focus_curve[-20:]):.3f}")
        if step % s.checkpoint_every == 0 or step == s.eot_steps:
            save(path, {"unet": unet.state_dict(), "optimizer": optimizer.state_dict(),
                        "generator": generator.get_state(), "rng": rng.bit_generator.state, "step": step,
                        "denoise": denoise_curve, "focus": focus_curve, "seconds": time.time() - started})  # fmt: skip
    bar.close()
    unet.set_attn_processor(original)
    unet.eval()
    return {"steps": step, "grid": list(grid), "scenes": len(seeds), "seconds": round(time.time() - started),
            "denoise": denoise_curve, "focus": focus_curve}  # fmt: skip
