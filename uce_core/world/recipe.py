"""The world model's training recipe: one seeded, resumable command with a progress bar and a time budget.

    python -m concept_express.uce_core.world.recipe --out world-run            # about 2.5 h on a 2-core CPU
    python -m concept_express.uce_core.world.recipe --out world-run --resume   # continue an interrupted run

Stages, each checkpointed in ``OUT/`` so that ``--resume`` continues where the run stopped:

1. ``data``: render ``--scenes`` training scenes (seeds from ``SPLITS["train"]``) into ``data/images.npy`` with each
   scene's object phrases in ``data/objects.json``;
2. ``vae``: train the ``AutoencoderKL`` on random 64 px crops (L1 + MSE reconstruction, a small KL term);
3. ``encode``: encode every scene to its posterior-mean latent; the latents' standard deviation sets the VAE's
   ``scaling_factor`` (as SD's 0.18215 was set);
4. ``clip``: contrastive pre-training of the text encoder against a small image encoder (as CLIP trained SD's text
   encoder): the caption's end-of-text state must pick its scene out of the batch; the text encoder is then frozen;
5. ``unet``: train the UNet on (latent, caption) pairs with the frozen text encoder (captions drawn afresh each time
   by ``scenes.compose_caption``: about 10 % empty), epsilon prediction, min-SNR-5 loss weights, random horizontal
   flips, AdamW with warm-up and a cosine decay over the step count or the time budget, an exponential moving
   average of the UNet;
6. ``focus``: a short fine-tuning of the EMA UNet that teaches the two attention properties the method reads from
   a real Stable Diffusion model (``attention_focus``): end-of-text cross-attention on the objects (on this small
   model it fades as the UNet trains) and self-attention rows that stay on their own object (here they group
   mostly by colour), asking first for mass on the target and then (``--eot-even-from``) for even attention over
   it; then one more probe;
7. ``export``: the EMA weights in float16 as a diffusers folder in ``OUT/model`` and ``OUT/model/record.json``
   (command, settings, steps, loss curves, probes, wall time, machine).

Every ``--probe-every`` UNet steps the EMA model is measured on validation scenes with the project's own capture and
localization (``evaluation``): localization IoU / recall / precision and the end-of-text map's foreground ratio.
When the time budget runs out the UNet stage stops early and the run goes on with what it has (the focus stage,
then the export; the record says so); ``--resume --finish`` does the same at the last checkpoint, by hand.
``--resume`` may change ``--budget-hours`` (and nothing else): the UNet stage then gets the seconds it has run plus
what the new budget leaves, and its cosine decay stretches to the new end.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .attention_focus import stage_focus
from .checkpoints import load, restore, save, snapshot
from .scenes import SIZE, SPLITS, compose_caption, render_scene


@dataclass
class RecipeSettings:
    seed: int = 0
    scenes: int = 60_000
    vae_steps: int = 2_500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    unet_steps: int = 6_000
    unet_batch: int = 64
    unet_lr: float = 4e-4
    clip_steps: int = 800
    clip_batch: int = 256
    clip_lr: float = 1e-3
    warmup: int = 300
    ema: float = 0.999
    min_snr: float = 5.0
    budget_hours: float = 2.5
    probe_every: int = 500
    probe_scenes: int = 24
    checkpoint_every: int = 200
    eot_steps: int = 1_200  # the attention-focus stage (attention_focus.py; the eot_* settings are its); 0 skips it
    eot_even_from: int = 900  # its steps from here on ask for even attention on the target, not mass on it
    eot_weight: float = 0.1
    group_weight: float = 0.2
    eot_lr: float = 1e-4
    eot_batch: int = 32
    eot_scenes: int = 2_000


# ---------------------------------------------------------------------------------------------------------- data


def _render_chunk(args):
    start, count = args
    images, objects = np.empty((count, SIZE, SIZE, 3), np.uint8), []
    for i in range(count):
        scene = render_scene(SPLITS["train"][start + i])
        images[i] = scene.image
        objects.append([o.phrase() for o in scene.objects])
    return images, objects


def stage_data(out: Path, s: RecipeSettings, threads: int, progress) -> None:
    data = out / "data"
    if (data / "objects.json").is_file():
        return
    data.mkdir(parents=True, exist_ok=True)
    images = np.lib.format.open_memmap(
        data / "images.tmp.npy", mode="w+", dtype=np.uint8, shape=(s.scenes, SIZE, SIZE, 3)
    )
    chunk = 500
    jobs = [(s.seed * s.scenes + i, min(chunk, s.scenes - i)) for i in range(0, s.scenes, chunk)]
    objects: list[list[str]] = []
    bar = progress(total=s.scenes, desc="render scenes")
    if threads > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(threads) as pool:
            results = pool.imap(_render_chunk, jobs)
            for (start, count), (imgs, objs) in zip(jobs, results):
                images[start - s.seed * s.scenes : start - s.seed * s.scenes + count] = imgs
                objects.extend(objs)
                bar.update(count)
    else:
        for start, count in jobs:
            imgs, objs = _render_chunk((start, count))
            images[start - s.seed * s.scenes : start - s.seed * s.scenes + count] = imgs
            objects.extend(objs)
            bar.update(count)
    bar.close()
    images.flush()
    del images
    os.replace(data / "images.tmp.npy", data / "images.npy")
    (data / "objects.tmp.json").write_text(json.dumps(objects))
    os.replace(data / "objects.tmp.json", data / "objects.json")


def _to_unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


# ------------------------------------------------------------------------------------------------ checkpoints


def _lr(step: int, total: int, peak: float, warmup: int, time_progress: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to a tenth of ``peak``, over the steps or over the time left, whichever
    runs out first (so a run cut short by its budget still ends at a low rate)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = max((step - warmup) / max(1, total - warmup), time_progress)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# -------------------------------------------------------------------------------------------------------- vae


def stage_vae(out: Path, s: RecipeSettings, parts, progress, deadline: float, record: dict) -> None:
    vae = parts["vae"]
    path = out / "vae.pt"
    state = load(path)
    if state is not None:
        vae.load_state_dict(state["vae"])
        if state["step"] >= s.vae_steps:
            return
    images = np.load(out / "data" / "images.npy", mmap_mode="r")
    optimizer = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(s.seed + 1)
    step, losses = 0, []
    if state is not None:
        restore(state, generator, optimizer=optimizer)
        step, losses = state["step"], state["losses"]
    vae.train()
    bar = progress(total=s.vae_steps, initial=step, desc="train VAE")
    while step < s.vae_steps:
        idx = torch.randint(len(images), (s.vae_batch,), generator=generator).sort().values.numpy()
        oy, ox = torch.randint(SIZE - 64 + 1, (2,), generator=generator).tolist()
        x = _to_unit(images[idx, oy : oy + 64, ox : ox + 64])
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, s.vae_steps, s.vae_lr, 100)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        rec = (recon - x).abs().mean() + F.mse_loss(recon, x)
        loss = rec + 1e-6 * posterior.kl().mean() / posterior.mean[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        losses.append(float(rec.detach()))
        step += 1
        bar.update(1)
        bar.set_postfix(rec=f"{np.mean(losses[-50:]):.4f}")
        if step % s.checkpoint_every == 0 or step == s.vae_steps or time.time() > deadline:
            save(path, {**snapshot(generator, vae=vae, optimizer=optimizer), "step": step, "losses": losses})
            if time.time() > deadline:
                break
    bar.close()
    vae.eval()
    record["vae"] = {"steps": step, "loss_curve": _curve(losses)}


# ----------------------------------------------------------------------------------------------------- encode


@torch.no_grad()
def stage_encode(out: Path, parts, progress) -> torch.Tensor:
    path = out / "data" / "latents.pt"
    vae = parts["vae"].eval()
    state = load(path)
    if state is None:
        images = np.load(out / "data" / "images.npy", mmap_mode="r")
        latents = torch.empty(len(images), 4, SIZE // 8, SIZE // 8, dtype=torch.float16)
        bar = progress(total=len(images), desc="encode scenes")
        for start in range(0, len(images), 128):
            batch = _to_unit(images[start : start + 128])
            latents[start : start + len(batch)] = vae.encode(batch).latent_dist.mean.half()
            bar.update(len(batch))
        bar.close()
        scale = 1.0 / float(latents.float().std())
        state = {"latents": latents, "scale": scale}
        save(path, state)
    vae.register_to_config(scaling_factor=state["scale"])
    return state["latents"].float() * state["scale"]


# ------------------------------------------------------------------------------------------------------- clip


class ImageEncoder(torch.nn.Module):
    """The CLIP stage's image tower: four stride-2 conv stages on the scene at 64 px, global mean pooling."""

    def __init__(self, width: int, out: int):
        super().__init__()
        layers, c = [], 3
        for w in (width, 2 * width, 4 * width, 4 * width):
            layers += [torch.nn.Conv2d(c, w, 3, stride=2, padding=1), torch.nn.GroupNorm(8, w), torch.nn.SiLU(),
                       torch.nn.Conv2d(w, w, 3, padding=1), torch.nn.GroupNorm(8, w), torch.nn.SiLU()]  # fmt: skip
            c = w
        self.features = torch.nn.Sequential(*layers)
        self.project = torch.nn.Linear(c, out)

    def forward(self, x):
        return self.project(self.features(x).mean(dim=(2, 3)))


def stage_clip(out: Path, s: RecipeSettings, parts, progress, deadline: float, record: dict) -> None:
    """Contrastive pre-training of the text encoder against a small image encoder, as CLIP trained SD's: the
    caption's end-of-text hidden state (the pooled output), projected, must pick its scene's picture out of the
    batch and the other way round. Afterwards the text encoder is frozen; the image tower is discarded."""
    text_encoder, tokenizer = parts["text_encoder"], parts["tokenizer"]
    width = text_encoder.config.hidden_size
    images = np.load(out / "data" / "images.npy", mmap_mode="r")
    objects = json.loads((out / "data" / "objects.json").read_text())
    tower = ImageEncoder(32, width)
    text_projection = torch.nn.Linear(width, width, bias=False)
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = (
        list(text_encoder.parameters()) + list(tower.parameters()) + list(text_projection.parameters()) + [logit_scale]
    )
    optimizer = torch.optim.AdamW(params, lr=s.clip_lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(s.seed + 4)
    rng = np.random.default_rng(s.seed + 5)
    step, losses, accuracy = 0, [], []
    path = out / "clip.pt"
    state = load(path)
    if state is not None:
        text_encoder.load_state_dict(state["text_encoder"])
        if state["step"] >= s.clip_steps:
            return
        restore(state, generator, rng, tower=tower, text_projection=text_projection, optimizer=optimizer)
        logit_scale.data.copy_(state["logit_scale"])
        step, losses, accuracy = state["step"], state["losses"], state["accuracy"]
    text_encoder.train()
    bar = progress(total=s.clip_steps, initial=step, desc="CLIP-train the text encoder")
    while step < s.clip_steps:
        idx = torch.randint(len(images), (s.clip_batch,), generator=generator).sort().values.numpy()
        x = F.interpolate(_to_unit(images[idx]), size=(64, 64), mode="bilinear", antialias=True)
        x = torch.where(torch.rand(len(idx), 1, 1, 1, generator=generator) < 0.5, x.flip(-1), x)
        captions = []
        for i in idx:
            caption = ""
            while not caption:
                caption = compose_caption(objects[int(i)], rng)
            captions.append(caption)
        ids = tokenizer(captions, padding="longest", return_tensors="pt").input_ids  # causal: the pads after the
        # end-of-text token do not change its hidden state
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, s.clip_steps, s.clip_lr, 100)
        text = F.normalize(text_projection(text_encoder(ids).pooler_output), dim=-1)
        image = F.normalize(tower(x), dim=-1)
        logits = logit_scale.exp().clamp(max=100) * text @ image.T
        target = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        accuracy.append(float((logits.argmax(1) == target).float().mean()))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", acc=f"{np.mean(accuracy[-50:]):.2f}")
        if step % s.checkpoint_every == 0 or step == s.clip_steps:
            parts_state = snapshot(generator, rng, text_encoder=text_encoder, tower=tower,
                                   text_projection=text_projection, optimizer=optimizer)  # fmt: skip
            save(path, {**parts_state, "logit_scale": logit_scale.detach(), "step": step, "losses": losses,
                        "accuracy": accuracy})  # fmt: skip
    bar.close()
    text_encoder.eval()
    record["clip"] = {"steps": step, "loss_curve": _curve(losses), "batch_accuracy_curve": _curve(accuracy)}


# ------------------------------------------------------------------------------------------------------- unet


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - decay)


def _encode_text(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids  # fmt: skip
    return text_encoder(ids)[0]


def stage_unet(out: Path, s: RecipeSettings, parts, latents: torch.Tensor, progress, deadline: float,
               record: dict, probe, finish: bool = False) -> None:  # fmt: skip
    unet, text_encoder, tokenizer, scheduler = (
        parts["unet"],
        parts["text_encoder"],
        parts["tokenizer"],
        parts["scheduler"],
    )
    text_encoder.requires_grad_(False).eval()  # frozen, as SD's CLIP encoder
    objects = json.loads((out / "data" / "objects.json").read_text())
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=s.unet_lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(s.seed + 2)
    rng = np.random.default_rng(s.seed + 3)
    step, losses, probes = 0, [], []
    spent, budget = 0.0, max(1.0, deadline - time.time())  # this stage's seconds: used so far, available at its start
    path = out / "unet.pt"
    state = load(path)
    if state is not None:
        restore(state, generator, rng, unet=unet, ema_unet=ema_unet, optimizer=optimizer)
        step, losses, probes = state["step"], state["losses"], state["probes"]
        # the stage's budget: the seconds it has run plus what the run has left (a changed --budget-hours counts)
        spent = state["seconds"]
        budget = spent + max(1.0, deadline - time.time())
    resumed_at = time.time() - spent

    def checkpoint():
        save(path, {**snapshot(generator, rng, unet=unet, ema_unet=ema_unet, optimizer=optimizer), "step": step,
                    "losses": losses, "probes": probes, "seconds": time.time() - resumed_at, "budget": budget})  # fmt: skip

    alphas = scheduler.alphas_cumprod.float()
    snr = alphas / (1 - alphas)
    stopped_early = False
    unet.train()
    bar = progress(total=s.unet_steps, initial=step, desc="train UNet")
    while step < s.unet_steps and not finish:
        if time.time() - resumed_at > budget:
            stopped_early = True
            break
        idx = torch.randint(len(latents), (s.unet_batch,), generator=generator)
        x0 = latents[idx]
        flip = torch.rand(s.unet_batch, generator=generator) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        captions = [compose_caption(objects[int(i)], rng) for i in idx]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (s.unet_batch,), generator=generator)
        noisy = scheduler.add_noise(x0, noise, t)
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, s.unet_steps, s.unet_lr, s.warmup, (time.time() - resumed_at) / budget)
        with torch.no_grad():
            cond = _encode_text(tokenizer, text_encoder, captions)
        pred = unet(noisy, t, cond).sample
        weight = torch.clamp(snr[t], max=s.min_snr) / snr[t]  # min-SNR-gamma for epsilon prediction
        loss = (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        _ema_update(ema_unet, unet, min(s.ema, (1 + step) / (10 + step)))
        losses.append(float(F.mse_loss(pred.detach(), noise)))
        step += 1
        bar.update(1)
        bar.set_postfix(mse=f"{np.mean(losses[-100:]):.4f}")
        if step % s.probe_every == 0 or step == s.unet_steps:
            probes.append({"step": step, **probe(ema_unet, text_encoder)})
            bar.write(f"probe at step {step}: {json.dumps(probes[-1])}")
        if step % s.checkpoint_every == 0 or step == s.unet_steps:
            checkpoint()
    bar.close()
    if finish and step < s.unet_steps and (not probes or probes[-1]["step"] != step):
        probes.append({"step": step, **probe(ema_unet, text_encoder)})  # the model that is exported
    if stopped_early:
        checkpoint()
    parts["unet"] = ema_unet.eval()
    record["unet"] = {"steps": step, "planned_steps": s.unet_steps, "stopped_by_budget": stopped_early,
                      "stopped_by_hand": finish and step < s.unet_steps,
                      "seconds": round(time.time() - resumed_at), "loss_curve": _curve(losses), "probes": probes}  # fmt: skip


def _curve(losses: list[float], points: int = 40) -> list[list[float]]:
    """(step, mean loss) at up to ``points`` evenly spaced windows."""
    if not losses:
        return []
    edges = np.linspace(0, len(losses), min(points, len(losses)) + 1).astype(int)
    return [[int(b), float(np.mean(losses[a:b]))] for a, b in zip(edges[:-1], edges[1:]) if b > a]


# ------------------------------------------------------------------------------------------------------ probes


def make_probe(parts, scenes: int):
    from ..attention import capture_attention
    from ..backends.diffusers_backend import DiffusersBackend, info_from_pipeline
    from ..errors import ConceptExpressError
    from ..localize import localize_concepts
    from .evaluation import eot_foreground_ratio, score, truth_on_grid
    from .model import assemble_pipeline

    validation = [render_scene(SPLITS["validation"][i]) for i in range(scenes)]

    def probe(unet, text_encoder) -> dict:
        pipe = assemble_pipeline(parts["vae"], unet, text_encoder, parts["tokenizer"])
        backend = DiffusersBackend(pipe, info_from_pipeline(pipe, "world"))
        ious, recalls, precisions, ratios = [], [], [], []
        with torch.no_grad():
            for scene in validation:
                maps = capture_attention(backend, scene.image)
                truth = truth_on_grid(scene, maps.grid)
                ratios.append(eot_foreground_ratio(maps.eot_on_grid(), truth))
                try:
                    result = score(localize_concepts(maps).masks, truth)
                    ious.append(result.iou), recalls.append(result.recall), precisions.append(result.precision)
                except ConceptExpressError:
                    ious.append(0.0), recalls.append(0.0), precisions.append(0.0)
        return {"iou": round(float(np.mean(ious)), 4), "recall": round(float(np.mean(recalls)), 4),
                "precision": round(float(np.mean(precisions)), 4), "eot_ratio": round(float(np.nanmean(ratios)), 4)}  # fmt: skip

    return probe


# ------------------------------------------------------------------------------------------------------ export


def stage_export(out: Path, parts, record: dict) -> Path:
    from .model import assemble_pipeline

    model = out / "model"
    tmp = out / "model.tmp"
    pipe = assemble_pipeline(
        *(copy.deepcopy(parts[k]).half() for k in ("vae", "unet", "text_encoder")), parts["tokenizer"]
    )
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "record.json").write_text(json.dumps(record, indent=1))
    if model.exists():
        import shutil

        shutil.rmtree(model)
    os.replace(tmp, model)
    return model


# -------------------------------------------------------------------------------------------------------- main


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__}, Python {platform.python_version()}"


def run(out: Path, settings: RecipeSettings, threads: int, argv: list[str], resume: bool, finish: bool = False) -> Path:
    from tqdm.auto import tqdm

    from .model import build_parts

    out.mkdir(parents=True, exist_ok=True)
    settings_file = out / "settings.json"
    if settings_file.is_file():
        if not resume:
            raise SystemExit(f"{out} holds a run already; add --resume to continue it, or choose another --out.")
        # a run folder from before a setting existed has that setting's default; only the budget may change
        saved = {**asdict(RecipeSettings()), **json.loads(settings_file.read_text())}
        if {**saved, "budget_hours": settings.budget_hours} != asdict(settings):
            raise SystemExit(f"{out} was started with other settings ({saved}); continue it with those settings "
                             "(only --budget-hours may change when resuming).")  # fmt: skip
    settings_file.write_text(json.dumps(asdict(settings), indent=1))
    torch.set_num_threads(threads)
    torch.manual_seed(settings.seed)
    started = time.time()
    clock_file = out / "clock.json"
    spent = json.loads(clock_file.read_text())["seconds"] if clock_file.is_file() else 0.0
    deadline = started + settings.budget_hours * 3600 - spent
    vae, unet, text_encoder, tokenizer, scheduler = build_parts(settings.seed)
    parts = {"vae": vae, "unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}
    record_file = out / "record.partial.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}

    def save_clock():
        clock_file.write_text(json.dumps({"seconds": spent + time.time() - started}))
        record_file.write_text(json.dumps(record))

    stage_data(out, settings, threads, tqdm)
    save_clock()
    stage_vae(out, settings, parts, tqdm, deadline, record)
    save_clock()
    latents = stage_encode(out, parts, tqdm)
    save_clock()
    stage_clip(out, settings, parts, tqdm, deadline, record)
    save_clock()
    probe = make_probe(parts, settings.probe_scenes)
    stage_unet(out, settings, parts, latents, tqdm, deadline, record, probe, finish)
    save_clock()
    taught = stage_focus(out, settings, parts, latents, tqdm)
    if taught is not None:
        record["focus"] = {**taught, "eot_weight": settings.eot_weight, "group_weight": settings.group_weight,
                           "learning_rate": settings.eot_lr, "even_from": settings.eot_even_from,
                           **{k: _curve(taught[k]) for k in ("denoise", "focus", "group")},
                           "probe": {"step": taught["steps"], **probe(parts["unet"], parts["text_encoder"])}}  # fmt: skip
        save_clock()
    record.update(
        # the run folder by its name only: a record in the repository names no machine's paths
        command="python -m concept_express.uce_core.world.recipe "
        + " ".join(shlex.quote(out.name if a == str(out) else a) for a in argv),
        settings=asdict(settings), threads=threads, machine=_machine(),
        wall_seconds=round(spent + time.time() - started), latent_scale=float(parts["vae"].config.scaling_factor),
        finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )  # fmt: skip
    return stage_export(out, parts, record)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m concept_express.uce_core.world.recipe", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", required=True, type=Path, help="run folder (checkpoints, data, the exported model)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument(
        "--finish",
        action="store_true",
        help="with --resume: end the UNet stage at its last checkpoint and export it (the record says so)",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    for name, value in asdict(RecipeSettings()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = parser.parse_args(argv)
    settings = RecipeSettings(**{k: getattr(args, k) for k in asdict(RecipeSettings())})
    if args.finish and not args.resume:
        parser.error("--finish ends a run: give it with --resume")
    model = run(args.out, settings, args.threads, argv, args.resume, args.finish)
    print(f"model written to {model}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
