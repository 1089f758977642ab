"""Training: what each loss term and each setting does to the first update, against independent computations.

* Gradient reach: the gradient the optimizer receives for the token vectors is, per term, the derivative of that term
  alone, checked against finite differences in float64 (a float64 copy of the tiny model; the terms written here
  from the paper and the reference spec). A term that is computed but never backpropagated, backpropagated with the
  wrong weight, temperature or target, or read from the wrong layers fails here, whatever the loss curve does.
* Flip: with the flip forced and an asymmetric mask, the step's loss is the masked loss on the flipped image's latent
  with the flipped mask.
* The training recorder reads exactly the paper's layers (cross-attention of the down and up blocks at 1/4 of the
  latent grid; the mid block is left out even where it runs at that grid, SDXL) in every family.
* Settings reach their use: temperature and contrastive weight (value and gradient), attention weight, the OT
  settings, the AdamW settings, the prompt template and joiner, the composite prompt, the VAE sample.
"""

import copy

import numpy as np
import ot
import pytest
import torch
from test_losses import reference_sinkhorn

from concept_express.uce_core.backends.base import Prompt, Slot
from concept_express.uce_core.images import to_tensor
from concept_express.uce_core.losses import grid_cost, nearest_downsample
from concept_express.uce_core.train import TrainSettings, _Run, train_concept_tokens

# one step, nothing clipped, every term off unless a test turns it on
FIRST = dict(steps=1, merge_step=1, split_tokens=2, attention_weight=0.0, contrastive_weight=0.0, max_grad_norm=1e9)


def _first_update(monkeypatch, backend, concepts, settings, flip=None):
    """Train; return the tokens and what the first step saw: its draws, the starting vectors, and every gradient
    handed to the optimizer (before clipping), in order."""
    seen = {"grads": [], "draws": None, "prompts": []}
    draw, apply, encode = _Run.draw, _Run._apply, backend.encode_prompts

    def spy_draw(self, count):
        out = draw(self, count)
        if flip is not None:
            out.flip = flip
        if seen["draws"] is None:
            seen["draws"], seen["start"] = out, [v.detach().clone() for v in self.vectors]
        return out

    def spy_apply(self, grads, other):
        seen["grads"].append([g.detach().clone() for g in grads])
        return apply(self, grads, other)

    def spy_encode(prompts, *args, **kwargs):
        seen["prompts"].extend(prompts)
        return encode(prompts, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(_Run, "draw", spy_draw)
        m.setattr(_Run, "_apply", spy_apply)
        m.setattr(backend, "encode_prompts", spy_encode)
        tokens = train_concept_tokens(backend, concepts, settings)
    return tokens, seen


def _float64(backend):
    """A float64 copy of a tiny backend's text encoders and UNet (the VAE, which only gives the fixed latent, stays;
    the recorder still computes attention probabilities in float32)."""
    copied = copy.deepcopy(backend)
    copied.dtype = torch.float64
    for module in (copied.unet, *copied.text_encoders):
        module.double()
    return copied


def _supcon(rows, labels, tau):
    """Eq. 10 as the reference spec writes it (SupCon, cosine similarity / tau, log of a softmax over k != i)."""
    z = rows / rows.norm(dim=-1, keepdim=True)
    logits = z @ z.T / tau
    off = ~torch.eye(len(rows), dtype=torch.bool)
    log_prob = logits - torch.log((torch.exp(logits) * off).sum(1, keepdim=True))
    positive = (labels[:, None] == labels[None, :]) & off
    return -((log_prob * positive).sum(1) / positive.sum(1)).mean()


def _directions(shape, count, rows=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        d = torch.randn(shape, generator=g, dtype=torch.float64)
        if rows is not None:
            keep = torch.zeros(shape[0], dtype=torch.bool)
            keep[list(rows)] = True
            d[~keep] = 0
        out.append(d / d.norm())
    return out


def _finite_difference(f, x, d, eps):
    return (f(x + eps * d) - f(x - eps * d)) / (2 * eps)


def _posterior(backend, concepts, flip):
    pixels = to_tensor(__import__("PIL.Image").Image.fromarray(concepts.image.numpy()))
    with torch.no_grad():
        mean, std = backend.latent_distribution(pixels.flip(-1) if flip else pixels)
    return mean.double(), std.double()


def _noisy(backend, concepts, draws, p, flip=False):
    """x_t and the target of prompt p of a step, in float64, from the recorded draws."""
    mean, std = _posterior(backend, concepts, flip)
    x0 = mean[0] + std[0] * draws.vae_noise[p].double()
    noise, t = draws.noise[p].double()[None], draws.timesteps[p : p + 1]
    return backend.add_noise(x0[None], noise, t), backend.target(x0[None], noise, t), t


class _Columns:
    """Test-side recorder: the paper's layers (cross-attention, down and up blocks, at ``grid``), mean over them."""

    def __init__(self, grid):
        self.grid, self.maps = grid, []

    def wants(self, layer):
        return layer.kind == "cross" and tuple(layer.grid) == self.grid and layer.place in ("down", "up")

    def record(self, layer, probs):
        self.maps.append(probs)


def _quarter(concepts):
    h, w = concepts.grid
    return (h // 4, w // 4)


# -- gradient reach ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("update", ["sequential", "reference", "averaged"])
def test_contrastive_gradient_and_value_at_a_non_default_temperature(concepts_for, monkeypatch, update):
    """alpha * d(eq. 10)/dv at the starting vectors is exactly what the contrastive term adds to the first update
    (the difference between a run with alpha and one without), at the configured temperature."""
    backend, concepts = concepts_for("tiny-sd1", 2)
    tau, alpha = 0.3, 0.5
    on = TrainSettings(**{**FIRST, "contrastive_weight": alpha, "temperature": tau}, update=update)
    tokens, seen = _first_update(monkeypatch, backend, concepts, on)
    _, off = _first_update(monkeypatch, backend, concepts, TrainSettings(**FIRST, update=update))
    added = (seen["grads"][0][0] - off["grads"][0][0]).double()

    start = seen["start"][0].double()
    labels = torch.arange(len(start)) % 2
    leaf = start.clone().requires_grad_()
    (expected,) = torch.autograd.grad(alpha * _supcon(leaf, labels, tau), leaf)
    for d in _directions(start.shape, 3):  # the oracle's gradient is the derivative of the term alone
        fd = _finite_difference(lambda v: alpha * _supcon(v, labels, tau), start, d, 1e-6)
        assert float((expected * d).sum()) == pytest.approx(float(fd), rel=1e-6, abs=1e-12)
    torch.testing.assert_close(added, expected, rtol=2e-4, atol=1e-7 * expected.abs().max().item())
    if update == "averaged":  # one update per step: the recorded value is eq. 10 at the starting vectors
        assert tokens.history["contrastive"][0] == pytest.approx(float(_supcon(start, labels, tau)), rel=1e-5)
        assert abs(float(_supcon(start, labels, 0.07)) - float(_supcon(start, labels, tau))) > 0.1


def test_denoising_gradient_matches_finite_differences_of_eq8(concepts_for, monkeypatch):
    """The first update's gradient (prompt "a photo of [V_0]", concept 0) against float64 finite differences of
    the masked denoising loss of that prompt alone; the other split token gets nothing from it. Measured directional
    errors 2e-6 to 6e-6 relative (float32 against float64)."""
    backend, concepts = concepts_for("tiny-sd1", 2)
    _, seen = _first_update(monkeypatch, backend, concepts, TrainSettings(**FIRST), flip=False)
    grad = seen["grads"][0][0].double()
    start, draws = seen["start"][0].double(), seen["draws"]
    assert grad[1:].abs().max() == 0 and grad[0].abs().max() > 0

    b64 = _float64(backend)
    noisy, target, t = _noisy(b64, concepts, draws, 0)
    mask = concepts.masks[0].double()

    def loss(v):
        with torch.no_grad():
            cond = b64.encode_prompts([Prompt(("a photo of ", Slot(0)))], vectors=[v])
            pred = b64.predict(noisy, t, cond)
        return ((pred * mask - target * mask) ** 2).mean()

    for d in _directions(start.shape, 3, rows=[0]):
        fd = _finite_difference(loss, start, d, 1e-4 * start[0].norm())
        assert float((grad * d).sum()) == pytest.approx(float(fd), rel=2e-3)


@pytest.mark.parametrize(
    "emd,flip,reg,iterations",
    [("sinkhorn", False, 1e-3, 200), ("sinkhorn", True, 0.05, 60), ("exact", True, 1e-3, 200)],
)
def test_attention_gradient_matches_finite_differences_of_eq11(concepts_for, monkeypatch, emd, flip, reg, iterations):
    """The attention-alignment term's share of the first update (a run with beta = 2 minus one with beta = 1)
    against float64 finite differences of that term alone, for prompt 0 and concept 0's target f_0 on the
    cross-attention grid. "exact": the exact EMD itself. "sinkhorn" (the reference's 200 iterations at reg 1e-3, far
    from converged): the value is not differentiated, its gradient is the attention-side potential (the reference's
    custom backward), so the term differentiated is <phi, a / sum(a)> with phi from a float64 re-implementation of
    the reference's Sinkhorn at the starting vectors (at the official and at other reg / iterations settings). A
    flipped step aligns with the flipped f_0. Measured directional errors: up to 5e-3 relative (the recorder's
    attention probabilities are float32 even in the float64 copy); the planted bugs of the catalogue give O(1)."""
    backend, concepts = concepts_for("tiny-sd1", 2)
    runs = [
        _first_update(
            monkeypatch,
            backend,
            concepts,
            TrainSettings(
                **{**FIRST, "attention_weight": b}, emd=emd, sinkhorn_reg=reg, sinkhorn_iterations=iterations
            ),
            flip=flip,
        )[1]
        for b in (1.0, 2.0)
    ]
    share = (runs[1]["grads"][0][0] - runs[0]["grads"][0][0]).double()
    start, draws = runs[0]["start"][0].double(), runs[0]["draws"]
    assert share[1:].abs().max() == 0 and share[0].abs().max() > 0

    b64 = _float64(backend)
    grid = _quarter(concepts)
    side = draws.flip
    f0 = concepts.features[0].double().view(concepts.grid)
    target = nearest_downsample((f0.flip(-1) if side else f0)[None], grid)[0].flatten()
    noisy, _, t = _noisy(b64, concepts, draws, 0, flip=side)
    cost = grid_cost(*grid).double()

    def column(v):
        recorder = _Columns(grid)
        with torch.no_grad():
            cond = b64.encode_prompts([Prompt(("a photo of ", Slot(0)))], vectors=[v])
            b64.predict(noisy, t, cond, recorder)
        a = torch.stack(recorder.maps).mean(0)[0, :, cond.slot_positions[0][0]].double()
        return a / a.sum()

    b = target / target.sum()
    if emd == "exact":
        term = lambda v: float(ot.emd2(column(v), b, cost))
    else:
        _, phi = reference_sinkhorn(b, column(start), cost, reg, iterations)
        term = lambda v: float((phi * column(v)).sum())
    for d in _directions(start.shape, 2, rows=[0], seed=1):
        fd = _finite_difference(term, start, d, 1e-3 * start[0].norm())
        assert float((share * d).sum()) == pytest.approx(float(fd), rel=2e-2, abs=1e-3 * share.norm().item())


# -- flip -------------------------------------------------------------------------------------------------------------


def test_a_flipped_step_uses_the_flipped_latent_and_the_flipped_mask(concepts_for, monkeypatch):
    backend, concepts = concepts_for("tiny-sd1", 1)
    mask = concepts.masks[0]
    assert not torch.equal(mask, mask.flip(-1))  # asymmetric: a mask left unflipped covers other cells
    settings = TrainSettings(steps=1, merge_step=0, attention_weight=0.0)  # merged: "a photo of [V_0]" twice
    tokens, seen = _first_update(monkeypatch, backend, concepts, settings, flip=True)
    draws, start = seen["draws"], seen["start"]
    assert draws.flip

    def loss(p, m):
        noisy, target, t = _noisy(backend, concepts, draws, p, flip=True)
        with torch.no_grad():
            cond = backend.encode_prompts([Prompt(("a photo of ", Slot(0)))], vectors=[start[0][:1]])
            pred = backend.predict(noisy.float(), t, cond).double()
        return float(((pred * m - target * m) ** 2).mean())

    right = np.mean([loss(p, mask.flip(-1).double()) for p in (0, 1)])
    wrong = np.mean([loss(p, mask.double()) for p in (0, 1)])
    assert tokens.history["denoise"][0] == pytest.approx(right, rel=1e-4)
    assert abs(right - wrong) > 0.05 * right  # the check can tell the two apart


# -- the training recorder ------------------------------------------------------------------------------------------


def _paper_layers(unet, latent_hw):
    """The cross-attention layers the paper reads, from the UNet's structure: every down block i runs at
    latent / 2^i, up block j at latent / 2^(blocks - 1 - j); the reference keeps the down and up layers at 1/4
    of the latent grid (res 16 for a 64 latent). Returns (count per forward, how many the mid block has there)."""
    down = len(unet.down_blocks)
    wanted = (latent_hw[0] // 4, latent_hw[1] // 4)

    def grid(level):
        return (latent_hw[0] // 2**level, latent_hw[1] // 2**level)

    def crosses(block):
        return sum(1 for name, _ in block.named_modules() if name.endswith("attn2"))

    count = sum(crosses(b) for i, b in enumerate(unet.down_blocks) if grid(i) == wanted)
    count += sum(crosses(b) for j, b in enumerate(unet.up_blocks) if grid(down - 1 - j) == wanted)
    mid = crosses(unet.mid_block) if grid(down - 1) == wanted else 0
    return count, mid


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2", "tiny-sdxl"])
def test_the_training_recorder_reads_the_papers_layers(concepts_for, monkeypatch, name):
    from concept_express.uce_core import train as train_module

    backend, concepts = concepts_for(name, 1)
    seen = []
    record = train_module._CrossAttention.record

    def spy(self, layer, probs):
        seen.append(layer)
        return record(self, layer, probs)

    monkeypatch.setattr(train_module._CrossAttention, "record", spy)
    train_concept_tokens(backend, concepts, TrainSettings(steps=1, merge_step=0, micro_batch=64))
    count, mid = _paper_layers(backend.unet, concepts.grid)
    quarter = _quarter(concepts)
    assert count > 0 and len(seen) == count  # one forward (the merged step's two prompts in one micro-batch)
    assert {(layer.kind, tuple(layer.grid)) for layer in seen} == {("cross", quarter)}
    assert {layer.place for layer in seen} == {"down", "up"}
    if name == "tiny-sdxl":
        assert mid > 0  # SDXL's mid block runs at that grid too: leaving it out is a choice this test sees


# -- settings ---------------------------------------------------------------------------------------------------------


def test_adamw_settings_shape_the_first_two_updates(concepts_for, monkeypatch):
    """learning_rate, weight_decay, adam_betas and adam_eps, non-default, against AdamW written out in float64 from
    the gradients the optimizer received."""
    backend, concepts = concepts_for("tiny-sd1", 2)
    settings = TrainSettings(
        **{**FIRST, "steps": 2, "merge_step": 5},
        learning_rate=3e-3,
        weight_decay=0.2,
        adam_betas=(0.5, 0.9),
        adam_eps=1e-3,
        update="averaged",
    )
    tokens, seen = _first_update(monkeypatch, backend, concepts, settings)
    v = seen["start"][0].double()
    m, s = torch.zeros_like(v), torch.zeros_like(v)
    (b1, b2), lr, wd, eps = settings.adam_betas, settings.learning_rate, settings.weight_decay, settings.adam_eps
    assert len(seen["grads"]) == 2
    for k, (g,) in enumerate(seen["grads"], start=1):
        g = g.double()
        v = v * (1 - lr * wd)
        m, s = b1 * m + (1 - b1) * g, b2 * s + (1 - b2) * g * g
        v = v - lr * (m / (1 - b1**k)) / ((s / (1 - b2**k)).sqrt() + eps)
    merged = v.view(2, 2, -1).mean(0)  # the run ends before the merge step: the tokens are the merged split tokens
    torch.testing.assert_close(tokens.vectors[0].double(), merged, rtol=1e-5, atol=1e-7)


def test_template_joiner_and_composite_reach_the_prompts(concepts_for, monkeypatch):
    backend, concepts = concepts_for("tiny-sd1", 2)
    settings = TrainSettings(steps=1, merge_step=0, template="art of {} in paint", joiner=" with ", micro_batch=64)
    _, seen = _first_update(monkeypatch, backend, concepts, settings)
    prompts = [p for p in seen["prompts"] if p.slots]
    expected = [
        Prompt(("art of ", Slot(0), " in paint")),
        Prompt(("art of ", Slot(1), " in paint")),
        Prompt(("art of ", Slot(0), " with ", Slot(1), " in paint")),
    ]
    assert prompts == expected
    _, seen = _first_update(monkeypatch, backend, concepts, TrainSettings(**{**vars(settings), "composite": False}))
    assert [p for p in seen["prompts"] if p.slots] == expected[:2]


def test_without_vae_sampling_the_latent_is_the_posterior_mean(concepts_for, monkeypatch):
    backend, concepts = concepts_for("tiny-sd1", 1)
    settings = TrainSettings(steps=1, merge_step=0, attention_weight=0.0, vae_sample=False)
    tokens, seen = _first_update(monkeypatch, backend, concepts, settings, flip=False)
    draws = seen["draws"]
    assert torch.count_nonzero(draws.vae_noise) == 0
    mean, _ = _posterior(backend, concepts, False)
    mask = concepts.masks[0].double()
    losses = []
    for p in (0, 1):
        noise, t = draws.noise[p : p + 1].double(), draws.timesteps[p : p + 1]
        noisy, target = backend.add_noise(mean, noise, t), backend.target(mean, noise, t)
        with torch.no_grad():
            cond = backend.encode_prompts([Prompt(("a photo of ", Slot(0)))], vectors=[seen["start"][0][:1]])
            pred = backend.predict(noisy.float(), t, cond).double()
        losses.append(float(((pred * mask - target * mask) ** 2).mean()))
    assert tokens.history["denoise"][0] == pytest.approx(np.mean(losses), rel=1e-4)


def test_the_recorded_attention_term_is_the_exact_emd_of_each_prompt(concepts_for, monkeypatch):
    """The history's attention value (docs/deviations.md 3.6): per prompt the exact EMD, by a linear programme here,
    between the token's cross-attention (the paper's layers, at the starting vectors) and its concept's f_i on that
    grid, flipped with the image; the step records the mean over prompts. The Sinkhorn plan's <P, C> would be 0.0."""
    from test_losses import _linprog_emd

    backend, concepts = concepts_for("tiny-sd1", 2)
    settings = TrainSettings(steps=1, merge_step=1, split_tokens=2, contrastive_weight=0.0)
    tokens, seen = _first_update(monkeypatch, backend, concepts, settings)
    draws, start = seen["draws"], seen["start"][0]
    grid = _quarter(concepts)
    cost = grid_cost(*grid).double().numpy()
    values = []
    for p in range(4):  # split token p, concept p mod 2
        noisy, _, t = _noisy(backend, concepts, draws, p, flip=draws.flip)
        recorder = _Columns(grid)
        with torch.no_grad():
            cond = backend.encode_prompts([Prompt(("a photo of ", Slot(p)))], vectors=[start])
            backend.predict(noisy.float(), t, cond, recorder)
        a = torch.stack(recorder.maps).mean(0)[0, :, cond.slot_positions[0][p]].double().numpy()
        f = concepts.features[p % 2].double().view(concepts.grid)
        b = nearest_downsample((f.flip(-1) if draws.flip else f)[None], grid)[0].flatten().numpy()
        values.append(_linprog_emd(a / a.sum(), b / b.sum(), cost))
    assert min(values) > 0.05
    assert tokens.history["attention"][0] == pytest.approx(np.mean(values), rel=1e-4)
