"""Precision policy of the diffusers backend, attention probabilities under autocast, the loss scale, and the
clipping norm's token taps."""

import pytest
import torch

from concept_express.uce_core.backends.base import Prompt, Slot, TokenTap
from concept_express.uce_core.backends.diffusers_backend import resolve_precision
from concept_express.uce_core.errors import ConceptExpressError
from concept_express.uce_core.optim import LossScale, clip_coefficient, table_grad_sq


@pytest.mark.parametrize(
    "policy,device,family,autocast,vae",
    [
        # the reference: accelerate --mixed_precision fp16: float32 UNet and text encoder under fp16 autocast, VAE fp16
        ("auto", "cuda", "sd2", torch.float16, torch.float16),
        ("auto", "cuda", "sd1", torch.float16, torch.float16),
        ("auto", "cuda", "sdxl", torch.float16, torch.float32),  # SDXL's VAE overflows in fp16
        ("auto", "cpu", "sd2", None, torch.float32),
        ("auto", "mps", "sd2", None, torch.float32),
        ("fp32", "cuda", "sd2", None, torch.float32),
        ("bf16", "cuda", "sdxl", torch.bfloat16, torch.bfloat16),
        ("fp16", "cpu", "sd1", torch.float16, torch.float16),
        (torch.bfloat16, "cpu", "sd1", torch.bfloat16, torch.bfloat16),
        ("float32", "cuda", "sd1", None, torch.float32),
    ],
)
def test_precision_policies(policy, device, family, autocast, vae):
    p = resolve_precision(policy, device, family)
    assert (p.autocast, p.vae) == (autocast, vae)


def test_an_unknown_precision_is_one_clear_error():
    with pytest.raises(ConceptExpressError, match="precision must be one of auto, fp32, fp16, bf16"):
        resolve_precision("fp8", "cpu")


def test_cpu_default_keeps_float32_weights_and_no_autocast(sd1_backend):
    assert sd1_backend.precision.autocast is None
    modules = [sd1_backend.unet, sd1_backend.vae, *sd1_backend.text_encoders]
    assert all(p.dtype == torch.float32 for m in modules for p in m.parameters())
    assert not sd1_backend.loss_scaling


@pytest.mark.parametrize("policy", ["fp16", "bf16"])
def test_half_precision_policies_train_on_the_cpu(concepts_for, policy):
    """fp16/bf16 run under CPU autocast here (the GPU's path, slower); the weights stay float32, fp16 scales the
    loss, and the tokens move as the fp32 run's do."""
    from concept_express.uce_core.backends.loading import load_backend
    from concept_express.uce_core.train import TrainSettings, _Run, train_concept_tokens

    reference_backend, concepts = concepts_for("tiny-sd1", 2)
    backend = load_backend("tiny-sd1", device="cpu", dtype=policy)
    assert backend.precision.autocast == {"fp16": torch.float16, "bf16": torch.bfloat16}[policy]
    assert backend.loss_scaling == (policy == "fp16")
    assert all(p.dtype == torch.float32 for p in backend.unet.parameters())
    settings = TrainSettings(steps=3, merge_step=2, split_tokens=2)
    start = _Run(reference_backend, concepts, settings).vectors[0].detach().view(2, 2, -1).mean(0)
    half = train_concept_tokens(backend, concepts, settings).vectors[0] - start
    full = train_concept_tokens(reference_backend, concepts, settings).vectors[0] - start
    assert torch.isfinite(half).all() and not torch.equal(half, full)  # autocast did compute in half precision
    assert (half - full).norm() < 0.1 * full.norm()  # measured 7e-4 (fp16) and 8e-3 (bf16)


def test_attention_probabilities_stay_float32_under_autocast():
    from concept_express.uce_core.attention import attention_with_probs

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 64, 4 * 16, generator=g) * 3 for _ in range(3))
    exact = torch.softmax(
        (q.double().view(1, 64, 4, 16).transpose(1, 2) @ k.double().view(1, 64, 4, 16).permute(0, 2, 3, 1)) * 0.25, -1
    ).mean(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, probs = attention_with_probs(q, k, v, heads=4, scale=0.25)
    assert probs.dtype == torch.float32
    assert (probs.double() - exact).abs().max() < 1e-6  # bfloat16 scores would be off by about 1e-2


def test_loss_scale_follows_gradscaler():
    """torch.amp.GradScaler's rule: a non-finite step halves the scale and resets the count; `interval` finite
    steps in a row double it."""
    scale = LossScale(True, init=1024.0, interval=3)
    seen = []
    for finite in [True, True, False, True, True, True, True, False]:
        scale.update(finite)
        seen.append(scale.scale)
    assert seen == [1024, 1024, 512, 512, 512, 1024, 1024, 512]
    off = LossScale(False)
    off.update(False)
    assert off.scale == 1.0


def test_clip_coefficient_is_torch_s():
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([12.0])]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, 2.0)
    factor = clip_coefficient(sum(float(g.pow(2).sum()) for g in grads), 2.0)
    assert torch.allclose(params[0].grad, grads[0] * factor) and factor == pytest.approx(2 / (13 + 1e-6))
    assert clip_coefficient(0.25, 1.0) == 1.0


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2", "tiny-sdxl"])
def test_token_taps_give_the_embedding_table_gradient(name, concepts_for):
    """The clipping norm's other-token part against autograd on the real embedding tables: same prompts, the
    tables made trainable, their gradient's squared norm (rows read at several positions, e.g. the padding, add up)."""
    backend, _ = concepts_for(name, 1)
    prompts = [Prompt(("a photo of", Slot(0))), Prompt(("a photo of", Slot(0), "and", Slot(1)))]
    vectors = [torch.randn(2, w, generator=torch.Generator().manual_seed(1)) * 0.02 for w in backend.info.widths]
    tables = [enc.get_input_embeddings().weight for enc in backend.text_encoders]
    try:
        for t in tables:
            t.requires_grad_(True)
            t.grad = None
        cond = backend.encode_prompts(prompts, vectors=vectors, tap=True)
        (cond.context.double().pow(2).mean() + cond.context[:, 3].sum()).backward()
        expected = sum(float(t.grad.double().pow(2).sum()) for t in tables)
    finally:
        for t in tables:
            t.requires_grad_(False)
            t.grad = None
    assert len(cond.taps) == 2 and all(len(per) == len(tables) for per in cond.taps)
    got = table_grad_sq([tap for per in cond.taps for tap in per])
    assert got == pytest.approx(expected, rel=1e-6)
    one = table_grad_sq(cond.taps[0])
    assert 0 < one < got  # one prompt's part


def test_table_grad_sq_adds_repeated_rows_first():
    tap = torch.zeros(4, 2, requires_grad=True)
    (tap * torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])).sum().backward()
    ids = torch.tensor([7, 7, 3, -1])  # two uses of row 7, one of row 3, one position that reads no row
    assert table_grad_sq([TokenTap(0, ids, tap)]) == pytest.approx(2.0**2 + 2.0**2)


def test_capture_runs_in_float32_and_training_under_the_policy_s_autocast(concepts_for):
    """The reference captures under fp16 autocast; here the capture's one forward is float32 under every policy,
    while training's forwards run under the policy's autocast."""
    from concept_express.uce_core.attention import capture_attention
    from concept_express.uce_core.backends.loading import load_backend
    from concept_express.uce_core.cli_options import EXAMPLE_IMAGE
    from concept_express.uce_core.train import TrainSettings, train_concept_tokens

    _, concepts = concepts_for("tiny-sd1", 1)
    backend = load_backend("tiny-sd1", device="cpu", dtype="bf16")
    seen = []
    handle = backend.unet.conv_out.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    try:
        capture_attention(backend, EXAMPLE_IMAGE)
        assert seen == [torch.float32]
        seen.clear()
        train_concept_tokens(backend, concepts, TrainSettings(steps=1, split_tokens=2, micro_batch=8))
    finally:
        handle.remove()
    assert seen[0] == torch.float32  # the probe for the alignment layers' grid, no gradient
    assert set(seen[1:]) == {torch.bfloat16}
