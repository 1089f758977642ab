"""The ComfyUI backend against ComfyUI's own code paths (needs a ComfyUI tree in COMFYUI_PATH and its environment):
learnable vectors encode exactly like an embedding file typed into a prompt, the prediction is the UNet's raw
output, and training leaves nothing patched."""

import os
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="needs a ComfyUI tree in COMFYUI_PATH"),
]


@pytest.fixture(scope="module")
def comfy_sd15():
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    from comfy.cli_args import args

    args.cpu = True
    import comfy.sd
    from comfy_server import ensure_checkpoint

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(ensure_checkpoint("sd15")), output_vae=True, output_clip=True
    )
    return model, clip, vae


def test_vectors_encode_like_an_embedding_file_in_a_prompt(comfy_sd15, tmp_path):
    from safetensors.torch import save_file

    from concept_express.uce_core.backends.base import Prompt, Slot
    from concept_express.uce_core.backends.comfy_backend import ComfyBackend

    model, clip, vae = comfy_sd15
    backend = ComfyBackend(model, clip, vae)
    g = torch.Generator().manual_seed(0)
    vectors = [torch.randn(2, 768, generator=g) * 0.3]
    for i in range(2):
        save_file({"emb_params": vectors[0][i : i + 1].contiguous()}, str(tmp_path / f"cx_{i}.safetensors"))
    clip_with_files = clip.clone()
    for tokenizer in (clip_with_files.tokenizer.clip_l,):
        tokenizer.embedding_directory = [str(tmp_path)]
    prompts = [Prompt(("a photo of", Slot(0))), Prompt(("a photo of", Slot(1), "and", Slot(0), "in the snow"))]
    texts = ["a photo of embedding:cx_0", "a photo of embedding:cx_1 and embedding:cx_0 in the snow"]
    with torch.no_grad():
        ours = backend.encode_prompts(prompts, vectors).context
        for b, text in enumerate(texts):
            expected = clip_with_files.encode_from_tokens(clip_with_files.tokenize(text))
            torch.testing.assert_close(ours[b : b + 1].float(), expected.float(), rtol=1e-3, atol=1e-3)


def test_prediction_is_the_raw_unet_output(comfy_sd15):
    from concept_express.uce_core.backends.base import Prompt
    from concept_express.uce_core.backends.comfy_backend import ComfyBackend

    model, clip, vae = comfy_sd15
    backend = ComfyBackend(model, clip, vae)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([20, 700])
    with torch.no_grad():
        cond = backend.encode_prompts([Prompt.text("a photo"), Prompt.text("")])
        noisy = backend.add_noise(x0, noise, t)
        ours = backend.predict(noisy, t, cond)
        unet = model.model.diffusion_model
        raw = unet(noisy.to(unet.dtype), t.float(), context=cond.context.to(unet.dtype)).float()
    torch.testing.assert_close(ours, raw, rtol=2e-3, atol=2e-3)


def test_training_through_comfyui_leaves_nothing_patched_and_only_vectors_learn(comfy_sd15):
    import comfy.clip_model
    from conftest import hand_made_concepts

    from concept_express.uce_core.attention import capture_attention
    from concept_express.uce_core.backends.comfy_backend import ComfyBackend
    from concept_express.uce_core.cli_options import EXAMPLE_IMAGE
    from concept_express.uce_core.train import TrainSettings, train_concept_tokens

    model, clip, vae = comfy_sd15
    backend = ComfyBackend(model, clip, vae)
    forward = comfy.clip_model.CLIPLayer.forward
    options = dict(model.model_options.get("transformer_options", {}))
    weights = {k: v.clone() for k, v in list(model.model.diffusion_model.state_dict().items())[:20]}
    maps = capture_attention(backend, EXAMPLE_IMAGE, resolution=128)
    concepts = hand_made_concepts(maps, [(0, 8, 0, 12), (8, 16, 12, 24)])
    tokens = train_concept_tokens(backend, concepts, TrainSettings(steps=2, merge_step=1, split_tokens=2))
    assert comfy.clip_model.CLIPLayer.forward is forward
    assert dict(model.model_options.get("transformer_options", {})) == options
    assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})
    for k, v in weights.items():
        assert torch.equal(model.model.diffusion_model.state_dict()[k], v)
    assert tokens.vectors[0].shape == (2, 768) and torch.isfinite(tokens.vectors[0]).all()


def test_token_taps_give_the_embedding_table_gradient(comfy_sd15):
    """The clipping norm's other-token part through ComfyUI's CLIP, against autograd on its real embedding table.
    The test checkpoint stores that table in float16, so autograd sums a row's gradient in float16 (the padding row
    collects about 70 uses): agreement to about 1e-3 per row, hence the tolerance."""
    from concept_express.uce_core.backends.base import Prompt, Slot
    from concept_express.uce_core.backends.comfy_backend import ComfyBackend
    from concept_express.uce_core.optim import table_grad_sq

    model, clip, vae = comfy_sd15
    backend = ComfyBackend(model, clip, vae)
    prompts = [Prompt(("a photo of", Slot(0))), Prompt(("a photo of", Slot(0), "and", Slot(1)))]
    vectors = [(torch.randn(2, 768, generator=torch.Generator().manual_seed(1)) * 0.02).requires_grad_()]
    table = backend.encoders[0].transformer.get_input_embeddings().weight
    try:
        table.requires_grad_(True)
        table.grad = None
        with torch.enable_grad():
            cond = backend.encode_prompts(prompts, vectors=vectors, tap=True)
            weights = torch.randn(cond.context.shape, generator=torch.Generator().manual_seed(2))
            (cond.context * weights).sum().backward()
        expected = float(table.grad.double().pow(2).sum())
    finally:
        table.requires_grad_(False)
        table.grad = None
    assert cond.taps is not None and len(cond.taps) == 2
    assert table_grad_sq([t for per in cond.taps for t in per]) == pytest.approx(expected, rel=1e-2)
