"""Stage 3: learn one textual-inversion token per concept (paper sec. 3.3-3.4; reference spec 1.9-1.11).

Token lookup table (eq. 7/9): split token k of the g*N belongs to concept k mod N (the reference's layout), with its
mask m_i and mean attention f_i. Steps 0..merge_step-1 train the g*N split tokens on the prompts
"a photo of [V_k]" (masked denoising eq. 8 + beta * EMD alignment eq. 11) plus alpha * the contrastive loss eq. 10;
at merge_step each concept's token becomes the mean of its g split tokens, and the remaining steps train the N
merged tokens on "a photo of [V_i]" and the composite "a photo of [V_1] and ... [V_N]" (union mask). Only the new
vectors are parameters; the models are frozen and never written.

Three update orders (``update``):

* ``sequential`` (default): the reference's sequence of optimizer updates at about the cost of one batched pass.
  All prompts of a step go through the text encoder and the UNet together (in micro-batches, see ``memory.py``),
  each prompt with its own copy of the vectors, so that one backward pass yields every prompt's gradient apart;
  then the reference's updates are applied in the reference's order, one AdamW step per prompt (g*N per step in the
  split phase, N + 1 after the merge), each with the reference's clipping (``optim.py``), and in the split phase
  with alpha * the contrastive term's gradient taken at the vectors of that moment. The one approximation: a
  prompt's denoising and alignment gradients are taken at the step's starting vectors instead of after the earlier
  prompts' updates (measured against ``reference``: tests/test_train.py, benchmarks/README.md).
* ``reference``: the official loop: every prompt does its own forward, backward and optimizer step.
* ``averaged``: one AdamW step per training step on the mean over prompts of (eq. 8 + beta * eq. 11), plus
  alpha * eq. 10 in the split phase. Not the reference's trajectory: it makes g*N (or N + 1) times fewer updates,
  so at the same learning rate the tokens travel much less far (docs/deviations.md 3.2).

The history records per step the mean over prompts of eq. 8, of eq. 11 (as the exact EMD between the token's
attention and f_i, for display: the official Sinkhorn's own value is 0.0, see losses.py; the gradient is the
Sinkhorn potential), and the contrastive value of each update; "loss" combines them with alpha and beta.

All randomness of a step (flip, timesteps, noise, VAE posterior samples) is drawn up front from one seeded
generator, so a step's result does not depend on how it is micro-batched, and a resumed run continues the same
trajectory. Checkpoints (safetensors: vectors, AdamW state, loss scale, generator state, history) are written every
``checkpoint_every`` steps, on cancellation, and before stopping on a non-finite loss.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .attention import closest_grid
from .backends.base import AttentionLayer, Prompt, Slot
from .concepts import Concepts
from .errors import ConceptExpressError
from .losses import contrastive_loss, emd_alignment_loss, grid_cost, masked_denoising_loss, nearest_downsample
from .memory import MicroBatchPlan, is_out_of_memory, plan_micro_batch, release_cached_memory, resident_storages
from .optim import LossScale, clip_coefficient, table_grad_sq
from .tokens import INITIALISATIONS, ConceptTokens, initial_vectors

UPDATES = ("sequential", "reference", "averaged")

CHECKPOINT_FORMAT = "concept-express/training-checkpoint/1"


class TrainingCancelled(ConceptExpressError):
    """Training was stopped on request; a resumable checkpoint was written when a checkpoint path was given."""


@dataclass(frozen=True)
class TrainSettings:
    """Defaults are the official run's (scripts/train.sh), except ``init`` (see tokens.py)."""

    steps: int = 500
    merge_step: int = 100
    split_tokens: int = 5
    learning_rate: float = 5e-4
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    contrastive_weight: float = 1e-3  # alpha
    temperature: float = 0.07  # tau
    attention_weight: float = 1e-5  # beta
    emd: str = "sinkhorn"  # or "exact"
    sinkhorn_reg: float = 1e-3
    sinkhorn_iterations: int = 200
    template: str = "a photo of {}"
    joiner: str = " and "
    composite: bool = True
    update: str = "sequential"  # or "reference", "averaged" (see the module docstring)
    init: str = "random"  # or "reference"
    flip: bool = True
    vae_sample: bool = True  # a fresh VAE posterior sample per prompt, as the reference
    seed: int = 20
    micro_batch: int = 0  # prompts per UNet call; 0 = chosen from the memory available (memory.py); halved on OOM
    memory_budget: float = 0.0  # GiB a step may use above the loaded models; 0 = what the device has free
    gradient_checkpointing: bool = False
    checkpoint_every: int = 100

    def validate(self) -> None:
        problems = []
        if self.steps < 1:
            problems.append("steps must be at least 1")
        if self.merge_step < 0:
            problems.append("merge_step must be >= 0")
        if self.split_tokens < 1:
            problems.append("split_tokens must be >= 1")
        if not self.learning_rate > 0:
            problems.append("learning_rate must be > 0")
        if min(self.contrastive_weight, self.attention_weight, self.weight_decay) < 0:
            problems.append("loss weights and weight decay must be >= 0")
        if self.emd not in ("sinkhorn", "exact"):
            problems.append("emd must be 'sinkhorn' or 'exact'")
        if self.update not in UPDATES:
            problems.append(f"update must be one of {', '.join(UPDATES)}")
        if self.init not in INITIALISATIONS:
            problems.append(f"init must be one of {INITIALISATIONS}")
        if self.template.count("{}") != 1:
            problems.append("the prompt template needs exactly one {} where the token goes")
        if self.micro_batch < 0 or self.checkpoint_every < 0 or self.memory_budget < 0:
            problems.append("micro_batch, memory_budget and checkpoint_every must be >= 0")
        if problems:
            raise ConceptExpressError("invalid training settings: " + "; ".join(problems) + ".")

    def trajectory_key(self) -> str:
        """What a resumed run must share with the run that wrote the checkpoint."""
        fields = asdict(self)
        for name in ("checkpoint_every", "micro_batch", "memory_budget", "gradient_checkpointing"):
            fields.pop(name)
        return json.dumps(fields, sort_keys=True)


@dataclass
class _Item:
    """One prompt of a step: its text with slots, the concept whose mask applies, and (slot, concept) pairs
    whose attention is aligned."""

    prompt: Prompt
    concepts: tuple[int, ...]
    slots: tuple[int, ...]


@dataclass
class _Draws:
    flip: bool
    timesteps: torch.Tensor
    noise: torch.Tensor
    vae_noise: torch.Tensor


class _CrossAttention:
    """Recorder: mean head-averaged cross-attention over the down/up layers at one grid."""

    def __init__(self, grid):
        self.grid, self.total, self.count = tuple(grid), None, 0

    def wants(self, layer: AttentionLayer) -> bool:
        return layer.kind == "cross" and tuple(layer.grid) == self.grid and layer.place != "mid"

    def record(self, layer: AttentionLayer, probs: torch.Tensor) -> None:
        self.total = probs if self.total is None else self.total + probs
        self.count += 1

    def mean(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError(f"no cross-attention layer at grid {self.grid} ran")
        return self.total / self.count


class _GridLister:
    def __init__(self):
        self.grids = set()

    def wants(self, layer: AttentionLayer) -> bool:
        if layer.kind == "cross" and layer.place != "mid":
            self.grids.add(tuple(layer.grid))
        return False

    def record(self, layer, probs):  # never called
        pass


def _autocast(backend):
    """The backend's training precision (a backend without a policy runs as it is)."""
    autocast = getattr(backend, "autocast", None)
    return autocast() if autocast is not None else contextlib.nullcontext()


def _prompt(template: str, slots: list[int], joiner: str) -> Prompt:
    before, after = template.split("{}")
    parts: list = [before] if before.strip() else []
    for k, slot in enumerate(slots):
        if k:
            parts.append(joiner)
        parts.append(Slot(slot))
    if after.strip():
        parts.append(after)
    return Prompt(tuple(parts))


class _Run:
    """The mutable state of one training run."""

    def __init__(self, backend, concepts: Concepts, settings: TrainSettings):
        self.backend, self.concepts, self.s = backend, concepts, settings
        self.n = len(concepts)
        self.g = settings.split_tokens
        self.device = backend.device
        self.generator = torch.Generator(device="cpu").manual_seed(settings.seed)
        self._prepare_image()
        self._prepare_targets()
        self.vectors = [
            torch.nn.Parameter(
                initial_vectors(backend.token_embeddings(e), self.g * self.n, settings.init, self.generator).to(
                    self.device
                )
            )
            for e in range(len(backend.info.text_encoders))
        ]
        self.optimizer = torch.optim.AdamW(
            self.vectors,
            lr=settings.learning_rate,
            betas=settings.adam_betas,
            eps=settings.adam_eps,
            weight_decay=settings.weight_decay,
        )
        self.loss_scale = LossScale(bool(getattr(backend, "loss_scaling", False)))
        self.step = 0
        self.merged = self.g == 1 or settings.merge_step == 0
        self.history: dict[str, list[float]] = {"loss": [], "denoise": [], "attention": [], "contrastive": []}
        self.micro_batch = settings.micro_batch
        self.resumed_micro_batch = 0  # the micro-batch of the checkpoint resumed from
        self.notes: list[str] = []  # what the progress text should say (micro-batch chosen, halved)

    # -- setup ------------------------------------------------------------------------------------------------
    def _prepare_image(self):
        from PIL import Image

        from .images import to_tensor

        pixels = to_tensor(Image.fromarray(self.concepts.image.numpy())).to(self.device)
        with torch.no_grad():
            mean, std = self.backend.latent_distribution(torch.cat([pixels, pixels.flip(-1)]))
        self.latent_mean, self.latent_std = mean.float(), std.float()
        self.latent_hw = tuple(mean.shape[-2:])

    def _prepare_targets(self):
        masks = self.concepts.masks.float()
        if tuple(masks.shape[-2:]) != self.latent_hw:
            masks = torch.nn.functional.interpolate(masks[:, None], size=self.latent_hw, mode="nearest")[:, 0]
        self.masks = masks.to(self.device)
        self.cross_grid = None
        if self.s.attention_weight > 0:
            lister = _GridLister()
            with torch.no_grad():
                cond = self.backend.encode_prompts([Prompt.text("")])
                self.backend.predict(
                    self.latent_mean[:1], torch.zeros(1, dtype=torch.long, device=self.device), cond, lister
                )
            if not lister.grids:
                raise ConceptExpressError("the model has no cross-attention layers to align the tokens with")
            self.cross_grid = closest_grid(lister.grids, self.latent_hw, 4)
            maps = self.concepts.features.float().view(self.n, *self.concepts.grid)
            self.feature_targets = nearest_downsample(maps, self.cross_grid).flatten(1).to(self.device)
            self.feature_targets_flipped = nearest_downsample(maps.flip(-1), self.cross_grid).flatten(1).to(self.device)
            self.cost = grid_cost(*self.cross_grid, device=self.device)

    # -- the schedule -------------------------------------------------------------------------------------------
    def items(self) -> list[_Item]:
        """The reference's prompts of a step, in its order: split token k ("a photo of [V_k]", concept k mod N),
        or after the merge each concept's token, then the composite (always, also for N = 1, as the reference)."""
        s = self.s
        if not self.merged:
            return [_Item(_prompt(s.template, [k], s.joiner), (k % self.n,), (k,)) for k in range(self.g * self.n)]
        items = [_Item(_prompt(s.template, [i], s.joiner), (i,), (i,)) for i in range(self.n)]
        if s.composite:
            items.append(
                _Item(_prompt(s.template, list(range(self.n)), s.joiner), tuple(range(self.n)), tuple(range(self.n)))
            )
        return items

    def draw(self, count: int) -> _Draws:
        g, shape = self.generator, (count, *self.latent_mean.shape[1:])
        flip = bool(self.s.flip and torch.rand(1, generator=g).item() < 0.5)
        timesteps = torch.randint(0, self.backend.info.num_train_timesteps, (count,), generator=g)
        noise = torch.randn(shape, generator=g)
        vae_noise = torch.randn(shape, generator=g) if self.s.vae_sample else torch.zeros(shape)
        return _Draws(flip, timesteps, noise, vae_noise)

    def merge(self) -> None:
        with torch.no_grad():
            for v in self.vectors:
                v[: self.n] = v.view(self.g, self.n, -1).mean(dim=0)
        self.merged = True

    # -- one forward over some prompts ----------------------------------------------------------------------------
    def forward(self, items: list[_Item], draws: _Draws, index: slice, vectors, tap: bool = True):
        """Per-prompt (denoise, attention) losses of ``items`` (draws ``index`` of the step) with ``vectors`` (shared
        parameters, or one copy per prompt), and the conditioning (its token taps)."""
        backend, s = self.backend, self.s
        side = 1 if draws.flip else 0
        x0 = self.latent_mean[side] + self.latent_std[side] * draws.vae_noise[index].to(self.device)
        noise = draws.noise[index].to(self.device)
        t = draws.timesteps[index].to(self.device)
        noisy = backend.add_noise(x0, noise, t)
        target = backend.target(x0, noise, t)
        recorder = _CrossAttention(self.cross_grid) if self.cross_grid is not None else None
        with _autocast(backend):
            cond = backend.encode_prompts([it.prompt for it in items], vectors=vectors, tap=tap)
            pred = backend.predict(noisy, t, cond, recorder)
        masks = torch.stack([self.masks[list(it.concepts)].amax(dim=0) for it in items])
        if draws.flip:
            masks = masks.flip(-1)
        denoise = masked_denoising_loss(pred, target, masks)
        attention = torch.zeros_like(denoise)
        if recorder is not None:
            probs = recorder.mean()
            rows, columns, targets = [], [], []
            for b, it in enumerate(items):
                for slot, concept in zip(it.slots, it.concepts):
                    rows.append(b)
                    columns.append(probs[b, :, cond.slot_positions[b][slot]])
                    targets.append(concept)
            feats = self.feature_targets_flipped if draws.flip else self.feature_targets
            per_pair = emd_alignment_loss(
                torch.stack(columns),
                feats[targets],
                self.cost,
                method=s.emd,
                reg=s.sinkhorn_reg,
                iterations=s.sinkhorn_iterations,
                value="exact",  # recorded: the exact EMD (the Sinkhorn <P, C> is 0.0 at reg 1e-3); same gradient
            )
            attention = attention.index_add(0, torch.tensor(rows, device=per_pair.device), per_pair)
        return denoise, attention, cond

    def contrastive(self, vectors=None) -> torch.Tensor:
        labels = torch.arange(self.g * self.n, device=self.device) % self.n
        vectors = self.vectors if vectors is None else vectors
        return torch.stack([contrastive_loss(v, labels, self.s.temperature) for v in vectors]).mean()

    def _with_contrastive(self) -> bool:
        return not self.merged and self.g > 1 and self.s.contrastive_weight > 0

    # -- the optimizer step ---------------------------------------------------------------------------------------
    def _apply(self, grads: list[torch.Tensor], other_sq: float) -> None:
        """One reference optimizer step with the (unscaled) gradients of the vectors: clip by the norm of the whole
        embedding table's gradient (the vectors' plus ``other_sq``, the prompt's other token rows), AdamW, and the
        loss scale's bookkeeping (a non-finite gradient skips the step when the loss is scaled)."""
        finite = math.isfinite(other_sq) and all(bool(torch.isfinite(g).all()) for g in grads)
        if not finite:
            if not self.loss_scale.enabled:
                raise FloatingPointError
            self.loss_scale.update(False)
            return
        squared = sum(float(g.double().pow(2).sum()) for g in grads) + other_sq
        factor = clip_coefficient(squared, self.s.max_grad_norm)
        for v, g in zip(self.vectors, grads):
            v.grad = (g * factor).to(v.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss_scale.update(True)

    def _contrastive_grads(self) -> tuple[list[torch.Tensor], float]:
        """alpha * the contrastive term's gradient at the current vectors, and the term's value."""
        with torch.enable_grad():
            leaves = [v.detach().clone().requires_grad_() for v in self.vectors]
            con = self.contrastive(leaves)
            grads = torch.autograd.grad(self.s.contrastive_weight * con, leaves)
        return list(grads), float(con.detach())

    def _in_micro_batches(self, count: int, run_chunk, reset=lambda: None) -> None:
        """``run_chunk(slice)`` over ``count`` prompts, ``self.micro_batch`` at a time (0: all); on an out-of-memory
        error the micro-batch is halved, ``reset()`` called and the step started again."""
        while True:
            size = min(self.micro_batch or count, count)
            try:
                for start in range(0, count, size):
                    run_chunk(slice(start, min(count, start + size)))
                return
            except Exception as err:
                if not is_out_of_memory(err) or size == 1:
                    raise
            self.micro_batch = max(1, size // 2)
            self.notes.append(f"out of memory at {size} prompts per UNet call; now {self.micro_batch}")
            reset()
            release_cached_memory(self.device)

    def _check(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError

    def sequential_step(self, items, draws) -> dict[str, float]:
        s, p = self.s, len(items)
        scale = self.loss_scale.scale
        grads = [torch.zeros(p, *v.shape, dtype=torch.float32, device=v.device) for v in self.vectors]
        other = [0.0] * p
        denoise_of, attention_of = [0.0] * p, [0.0] * p

        def run_chunk(chunk):
            n = chunk.stop - chunk.start
            copies = [v.detach().unsqueeze(0).repeat(n, 1, 1).requires_grad_() for v in self.vectors]
            denoise, attention, cond = self.forward(items[chunk], draws, chunk, copies)
            loss = (denoise + s.attention_weight * attention).sum()
            self._check(loss)
            (loss * scale).backward()
            for e, copy in enumerate(copies):
                grads[e][chunk] = copy.grad.float() / scale
            for b in range(n):
                other[chunk.start + b] = table_grad_sq(cond.taps[b]) / scale**2 if cond.taps else 0.0
                denoise_of[chunk.start + b] = float(denoise[b].detach())
                attention_of[chunk.start + b] = float(attention[b].detach())

        self._in_micro_batches(p, run_chunk)
        con_sum = 0.0
        for k in range(p):  # the reference's updates, in its order
            g = [grad[k] for grad in grads]
            if self._with_contrastive():
                con_grads, con = self._contrastive_grads()
                g = [a + b for a, b in zip(g, con_grads)]
                con_sum += con
            self._apply(g, other[k])
        return self._summary(sum(denoise_of) / p, sum(attention_of) / p, con_sum / p)

    def reference_step(self, items, draws) -> dict[str, float]:
        s = self.s
        denoise_sum = attention_sum = con_sum = 0.0
        for k, item in enumerate(items):
            scale = self.loss_scale.scale
            denoise, attention, cond = self.forward([item], draws, slice(k, k + 1), self.vectors)
            loss = denoise.sum() + s.attention_weight * attention.sum()
            if self._with_contrastive():
                con = self.contrastive()
                loss = loss + s.contrastive_weight * con
                con_sum += float(con.detach())
            self._check(loss)
            (loss * scale).backward()
            grads = [(v.grad if v.grad is not None else torch.zeros_like(v)).float() / scale for v in self.vectors]
            self.optimizer.zero_grad(set_to_none=True)
            self._apply(grads, table_grad_sq(cond.taps[0]) / scale**2 if cond.taps else 0.0)
            denoise_sum += float(denoise.detach().sum())
            attention_sum += float(attention.detach().sum())
        p = len(items)
        return self._summary(denoise_sum / p, attention_sum / p, con_sum / p)

    def averaged_step(self, items, draws) -> dict[str, float]:
        s, p = self.s, len(items)
        scale = self.loss_scale.scale
        taps, denoise_of, attention_of = [], [0.0] * p, [0.0] * p

        def run_chunk(chunk):
            denoise, attention, cond = self.forward(items[chunk], draws, chunk, self.vectors)
            loss = (denoise + s.attention_weight * attention).sum() / p
            self._check(loss)
            (loss * scale).backward()
            taps.extend(t for prompt in (cond.taps or []) for t in prompt)
            for b in range(chunk.stop - chunk.start):
                denoise_of[chunk.start + b] = float(denoise[b].detach())
                attention_of[chunk.start + b] = float(attention[b].detach())

        def reset():
            self.optimizer.zero_grad(set_to_none=True)
            taps.clear()

        self.optimizer.zero_grad(set_to_none=True)
        self._in_micro_batches(p, run_chunk, reset)
        grads = [(v.grad if v.grad is not None else torch.zeros_like(v)).float() / scale for v in self.vectors]
        self.optimizer.zero_grad(set_to_none=True)
        con = 0.0
        if self._with_contrastive():
            con_grads, con = self._contrastive_grads()
            grads = [a + b for a, b in zip(grads, con_grads)]
        self._apply(grads, table_grad_sq(taps) / scale**2)
        return self._summary(sum(denoise_of) / p, sum(attention_of) / p, con)

    def _summary(self, denoise, attention, con) -> dict[str, float]:
        s = self.s
        loss = (
            denoise + s.attention_weight * attention + (s.contrastive_weight * con if self._with_contrastive() else 0.0)
        )
        return {"loss": loss, "denoise": denoise, "attention": attention, "contrastive": con}

    # -- memory ---------------------------------------------------------------------------------------------------
    def plan_memory(self) -> MicroBatchPlan | None:
        """Choose the micro-batch before the first step (``memory.plan_micro_batch``), unless the settings fix it or
        the update order runs one prompt at a time."""
        if self.micro_batch or self.s.update == "reference":
            return None
        items = self.items()  # the split phase's g*N prompts (or N + 1 after the merge): the largest steps left
        prompts = len(items)

        def probe(count: int):  # count prompts of the largest step, at t = 0, with copies of the vectors
            chosen = (items * count)[:count]
            draws = _Draws(
                False, torch.zeros(count, dtype=torch.long), *(torch.zeros(count, *self.latent_mean.shape[1:]),) * 2
            )
            copies = [v.detach().unsqueeze(0).repeat(count, 1, 1).requires_grad_() for v in self.vectors]
            return self.forward(chosen, draws, slice(0, count), copies)

        def saved_by(count: int) -> None:
            probe(count)

        def step_of(count: int) -> None:  # forward and backward, as a step does, nothing kept
            denoise, attention, _ = probe(count)
            (denoise + self.s.attention_weight * attention).sum().backward()

        modules = getattr(self.backend, "modules", None)
        resident = resident_storages(modules()) if modules is not None else set()
        plan = plan_micro_batch(
            self.device, prompts, saved_by, budget_gib=self.s.memory_budget, resident=resident, step=step_of
        )
        self.micro_batch = plan.micro_batch
        self.notes.append(plan.describe())
        if self.resumed_micro_batch and self.resumed_micro_batch < self.micro_batch:
            # the run being resumed used a smaller one: keep it, so that the trajectory stays the same bit for bit
            self.micro_batch = self.resumed_micro_batch
            self.notes.append(f"{self.micro_batch} prompts per UNet call, as in the run being resumed")
        return plan

    # -- checkpoints ----------------------------------------------------------------------------------------------
    @functools.cached_property
    def fingerprint(self) -> str:
        """Hashes the masks and features once: they do not change during a run, and state() runs at every step."""
        return run_fingerprint(self.backend.info, self.concepts, self.s)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """A copy of everything a resumed run needs (vectors, AdamW state, generator, history): small, taken at every
        step boundary so that a run stopped in the middle of a step can still be checkpointed consistently."""
        tensors = {f"vector.{e}": v.detach().clone() for e, v in enumerate(self.vectors)}
        tensors["generator"] = self.generator.get_state()
        steps = {}
        for e, v in enumerate(self.vectors):
            state = self.optimizer.state.get(v, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    tensors[f"adam.{e}.{key}"] = state[key].detach().clone()
            if "step" in state:
                steps[e] = float(state["step"])
        meta = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "merged": self.merged,
            "adam_steps": steps,
            "history": {k: list(v) for k, v in self.history.items()},
            "fingerprint": self.fingerprint,
            "micro_batch": self.micro_batch,
            "loss_scale": self.loss_scale.state(),
        }
        return tensors, meta

    def save_checkpoint(self, path: Path, state: tuple[dict, dict] | None = None) -> None:
        from .fileio import save_tensors

        save_tensors(path, *(state or self.state()))

    def load_checkpoint(self, path: Path) -> bool:
        from .fileio import load_tensors

        tensors, meta = load_tensors(path, expected_format=CHECKPOINT_FORMAT)
        if meta.get("fingerprint") != self.fingerprint:
            return False
        with torch.no_grad():
            for e, v in enumerate(self.vectors):
                v.copy_(tensors[f"vector.{e}"].to(v))
        for e, v in enumerate(self.vectors):
            if f"adam.{e}.exp_avg" in tensors:
                self.optimizer.state[v] = {
                    "step": torch.tensor(meta["adam_steps"][str(e)]),
                    "exp_avg": tensors[f"adam.{e}.exp_avg"].to(v),
                    "exp_avg_sq": tensors[f"adam.{e}.exp_avg_sq"].to(v),
                }
        self.loss_scale.load(meta.get("loss_scale"))
        self.resumed_micro_batch = int(meta.get("micro_batch") or 0)
        self.generator.set_state(tensors["generator"])
        self.step, self.merged, self.history = meta["step"], meta["merged"], meta["history"]
        return True


def _tell(progress, run: _Run, total: int) -> None:
    """Pass the run's notes (micro-batch chosen or halved) to the progress callback as ``{"note": text}``."""
    while run.notes:
        progress(run.step, total, {"note": run.notes.pop(0)})


def run_fingerprint(info, concepts: Concepts, settings: TrainSettings) -> str:
    """What identifies a training run: its trajectory settings, its concepts and the model family it runs on."""
    h = hashlib.sha256()
    h.update(settings.trajectory_key().encode())
    h.update(concepts.masks.cpu().numpy().tobytes())
    h.update(concepts.features.float().cpu().numpy().tobytes())
    h.update(json.dumps([info.family, list(info.widths), info.prediction_type]).encode())
    if concepts.info.get("names"):  # names given by the user (Edit Concepts) are part of the saved set
        h.update(json.dumps(concepts.info["names"]).encode())
    return h.hexdigest()


def checkpoint_fingerprint(path: str | os.PathLike) -> str | None:
    """The run fingerprint a training checkpoint was written for (None if the file is not a readable checkpoint)."""
    from .fileio import load_tensors

    try:
        return load_tensors(path, expected_format=CHECKPOINT_FORMAT)[1].get("fingerprint")
    except ConceptExpressError:
        return None


ProgressCallback = Callable[[int, int, dict], None]


def train_concept_tokens(
    backend,
    concepts: Concepts,
    settings: TrainSettings | None = None,
    *,
    names: list[str] | None = None,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = True,
) -> ConceptTokens:
    """Learn one token per concept. See the module docstring.

    ``progress(step, total, losses)`` is called after every step, and with ``{"note": text}`` when there is something
    to say (the micro-batch chosen before the first step, or halved after an out-of-memory error); ``should_stop()`` is polled before every step and
    raises ``TrainingCancelled``. With ``checkpoint`` a file path, a matching checkpoint there is resumed (when
    ``resume``) and progress is saved every ``checkpoint_every`` steps and whenever the run stops early (cancelled,
    diverged, or interrupted by any exception, even in the middle of a step: the state after the last completed
    step is kept for that).
    """
    settings = settings or TrainSettings()
    settings.validate()
    if len(concepts) == 0:
        raise ConceptExpressError("there are no concepts to learn; localization found none")
    started = time.perf_counter()
    run = _Run(backend, concepts, settings)
    if settings.gradient_checkpointing and hasattr(backend, "unet"):
        backend.unet.enable_gradient_checkpointing()
    path = Path(checkpoint) if checkpoint else None
    if path is not None and resume and path.is_file() and run.load_checkpoint(path) and progress is not None:
        progress(run.step, settings.steps, {"resumed": run.step})
    boundary = run.state() if path is not None else None  # the last consistent state, for a checkpoint
    try:
        with torch.enable_grad():
            if run.step < settings.steps:
                run.plan_memory()
                if progress is not None:
                    _tell(progress, run, settings.steps)
            while run.step < settings.steps:
                if should_stop is not None and should_stop():
                    raise TrainingCancelled(f"training cancelled before step {run.step + 1} of {settings.steps}")
                if not run.merged and run.step >= settings.merge_step:
                    run.merge()
                items = run.items()
                draws = run.draw(len(items))
                try:
                    losses = getattr(run, f"{settings.update}_step")(items, draws)
                except FloatingPointError:
                    raise ConceptExpressError(
                        f"training diverged at step {run.step + 1}: the loss is not a finite number. "
                        # Resuming cannot help: the same settings diverge again, and other weights (another dtype)
                        # capture other attention, hence another run. So the advice is to start again.
                        + (
                            "Start again (--overwrite: the checkpoint of the last finite state is kept until then) "
                            if path is not None and run.step > 0  # a checkpoint is written only after a finite step
                            else "Start again "
                        )
                        + "in float32 (--dtype fp32), with a lower learning rate, or with another seed."
                    ) from None
                for key in run.history:
                    run.history[key].append(losses[key])
                run.step += 1
                if path is not None:
                    boundary = run.state()
                    if settings.checkpoint_every and run.step % settings.checkpoint_every == 0:
                        run.save_checkpoint(path, boundary)
                if progress is not None:
                    _tell(progress, run, settings.steps)
                    progress(run.step, settings.steps, losses)  # may raise the host's interrupt (ComfyUI's Cancel)
    except BaseException:
        if path is not None and boundary[1]["step"] > 0:
            run.save_checkpoint(path, boundary)  # stopped anywhere, even mid-step: resumable from the last step
        raise
    finally:
        if settings.gradient_checkpointing and hasattr(backend, "unet"):
            backend.unet.disable_gradient_checkpointing()
    if not run.merged:
        run.merge()
    meta = {
        "settings": asdict(settings),
        "steps": run.step,
        "seconds": round(time.perf_counter() - started, 2),
        "fingerprint": run.fingerprint,
        "model": asdict(backend.info),
        "localization": concepts.info,
        "cross_grid": list(run.cross_grid or []),
    }
    names = names or [f"concept_{i + 1}" for i in range(run.n)]
    if len(names) != run.n:
        raise ConceptExpressError(f"{len(names)} names for {run.n} concepts")
    return ConceptTokens(
        vectors=[v.detach()[: run.n].float().cpu().clone() for v in run.vectors],
        encoder_keys=[e.key for e in backend.info.text_encoders],
        family=backend.info.family,
        names=names,
        masks=concepts.masks.clone(),
        image=concepts.image.clone(),
        history=run.history,
        info=meta,
    )
