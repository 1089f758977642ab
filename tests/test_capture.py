"""Attention capture on tiny SD1, SD2 and SDXL models.

The independent oracle: run the same UNet with diffusers' classic ``AttnProcessor`` (which computes the
probabilities with ``Attention.get_attention_scores``), collect every layer's probabilities, and aggregate them in
float64 with the test's own implementation of the reference's recipe."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor
from oracles import aggregate_oracle

from concept_express.uce_core.attention import AttentionMaps, capture_attention
from concept_express.uce_core.backends.base import Prompt
from concept_express.uce_core.errors import ConceptExpressError
from concept_express.uce_core.images import fit_to_model, load_image, to_tensor


def _diffusers_probabilities(backend, image_path, monkeypatch, prompt="", timestep=0, noise_seed=0):
    """Every attention layer's probabilities (head mean, float64) from a plain diffusers forward pass. At t > 0 the
    latent is noised as DDPM's forward process: sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, eps from ``noise_seed``."""
    picture = fit_to_model(load_image(image_path), backend.info.resolution)
    with torch.no_grad():
        latents = backend.vae.encode(to_tensor(picture)).latent_dist.mean * backend.vae.config.scaling_factor
        if timestep > 0:
            abar = backend.pipe.scheduler.alphas_cumprod[timestep].double()
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(noise_seed))
            latents = (abar.sqrt() * latents.double() + (1 - abar).sqrt() * noise.double()).float()
        cond = backend.encode_prompts([Prompt.text(prompt)])
    seen = []
    original = Attention.get_attention_scores
    part = {id(m): name.split(".")[0] for name, m in backend.unet.named_modules()}

    def spy(self, query, key, attention_mask=None):
        probs = original(self, query, key, attention_mask)
        seen.append((part[id(self)], probs.double().view(-1, self.heads, *probs.shape[1:]).mean(1)[0]))
        return probs

    monkeypatch.setattr(Attention, "get_attention_scores", spy)
    saved = backend.unet.attn_processors
    backend.unet.set_attn_processor(AttnProcessor())
    try:
        with torch.no_grad():
            kwargs = {}
            if backend.info.family == "sdxl":
                h, w = picture.height, picture.width
                kwargs["added_cond_kwargs"] = {
                    "text_embeds": cond.extras["text_embeds"],
                    "time_ids": torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32),
                }
            backend.unet(latents, torch.tensor([timestep]), encoder_hidden_states=cond.context, **kwargs)
    finally:
        backend.unet.set_attn_processor(saved)
    return tuple(latents.shape[-2:]), seen, cond.eot_positions[0]


def test_capture_matches_independent_float64_aggregation(tiny_backend, example_image, monkeypatch):
    maps = capture_attention(tiny_backend, example_image)
    latent_hw, probs, eot_position = _diffusers_probabilities(tiny_backend, example_image, monkeypatch)

    def grid(n):
        f = int(round((latent_hw[0] * latent_hw[1] / n) ** 0.5))
        return latent_hw[0] // f, latent_hw[1] // f

    self_layers = [(p.numpy(), grid(p.shape[0])) for _, p in probs if p.shape[0] == p.shape[1]]
    cross = [p for where, p in probs if p.shape[0] != p.shape[1] and where != "mid_block"]  # reference: (up, down)
    assert len(self_layers) == len(maps.info["self_layers"]) > 0
    expected = aggregate_oracle(self_layers, latent_hw)
    np.testing.assert_allclose(maps.self_attention.double().numpy(), expected, rtol=1e-4, atol=1e-8)

    quarter = (latent_hw[0] // 4, latent_hw[1] // 4)
    eot_layers = [p[:, eot_position] for p in cross if grid(p.shape[0]) == quarter]
    assert maps.info["eot_layers"] == len(eot_layers) > 0
    expected_eot = torch.stack(eot_layers).mean(0).view(quarter)
    torch.testing.assert_close(maps.eot.double(), expected_eot, rtol=1e-4, atol=1e-7)


def test_recorded_maps_are_distributions(tiny_backend, example_image):
    maps = capture_attention(tiny_backend, example_image)
    a = maps.self_attention
    assert a.dtype == torch.float32 and a.shape == (maps.n, maps.n)
    assert torch.isfinite(a).all() and (a >= 0).all()
    torch.testing.assert_close(a.sum(1), torch.ones(maps.n), atol=1e-5, rtol=0)
    assert maps.grid == tuple(maps.info["latent_grid"])
    assert (maps.eot >= 0).all() and (maps.eot <= 1).all()
    assert maps.info["eot_position"] == 1  # the empty prompt is [BOS, EOT, pad...] for every family
    assert maps.image.shape[:2] == (maps.grid[0] * 8, maps.grid[1] * 8) and maps.image.dtype == torch.uint8


def test_capture_is_deterministic_and_leaves_the_model_as_it_was(sd1_backend, example_image):
    unet = sd1_backend.unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500])
    cond = sd1_backend.encode_prompts([Prompt.text("a photo of a dog")])
    with torch.no_grad():
        out_before = sd1_backend.predict(x, t, cond)
        first = capture_attention(sd1_backend, example_image)
        second = capture_attention(sd1_backend, example_image)
        out_after = sd1_backend.predict(x, t, cond)
    assert torch.equal(first.self_attention, second.self_attention) and torch.equal(first.eot, second.eot)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    assert torch.equal(out_before, out_after)


def test_recording_does_not_change_the_denoiser_output(tiny_backend):
    class RecordAll:
        def __init__(self):
            self.calls = 0

        def wants(self, layer):
            return True

        def record(self, layer, probs):
            self.calls += 1

    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700])
    cond = tiny_backend.encode_prompts([Prompt.text("a photo"), Prompt.text("")])
    recorder = RecordAll()
    with torch.no_grad():
        plain = tiny_backend.predict(x, t, cond)
        recorded = tiny_backend.predict(x, t, cond, recorder)
    assert recorder.calls > 0
    torch.testing.assert_close(recorded, plain, rtol=1e-4, atol=1e-5)


def test_capturing_a_unet_with_query_key_norms_is_one_clear_error(sd1_backend, example_image, monkeypatch):
    # SD1.x/SD2.x/SDXL attention has no query/key norm; a UNet that has one is another architecture
    layer = next(m for m in sd1_backend.unet.modules() if isinstance(m, Attention))
    monkeypatch.setattr(layer, "norm_q", torch.nn.Identity())
    with pytest.raises(ConceptExpressError, match="query/key norm, which SD1.x, SD2.x and SDXL do not have"):
        capture_attention(sd1_backend, example_image)


def test_non_square_image_keeps_its_aspect(sd1_backend):
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8))
    maps = capture_attention(sd1_backend, image)
    assert maps.grid == (16, 24)  # 192x128 px working size for a 3:2 image at the tiny model's 128 px
    torch.testing.assert_close(maps.self_attention.sum(1), torch.ones(16 * 24), atol=1e-5, rtol=0)
    stretched = capture_attention(sd1_backend, image, resize="stretch")
    assert stretched.grid == (16, 16)


def test_capture_at_a_later_timestep_is_seeded(sd1_backend, example_image):
    a = capture_attention(sd1_backend, example_image, timestep=300, noise_seed=3)
    b = capture_attention(sd1_backend, example_image, timestep=300, noise_seed=3)
    c = capture_attention(sd1_backend, example_image, timestep=300, noise_seed=4)
    assert torch.equal(a.self_attention, b.self_attention)
    assert not torch.equal(a.self_attention, c.self_attention)


def test_attention_maps_save_and_load_round_trip(sd1_backend, example_image, tmp_path):
    maps = capture_attention(sd1_backend, example_image)
    path = maps.save(tmp_path / "maps.safetensors")
    loaded = AttentionMaps.load(path)
    assert torch.equal(loaded.self_attention, maps.self_attention) and torch.equal(loaded.eot, maps.eot)
    assert torch.equal(loaded.image, maps.image)
    assert loaded.grid == maps.grid and loaded.info == maps.info


def test_loading_a_foreign_file_as_attention_maps_fails_clearly(tmp_path):
    from safetensors.torch import save_file

    from concept_express.uce_core.errors import ConceptExpressError

    save_file({"emb_params": torch.zeros(1, 8)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ConceptExpressError, match="expected a concept-express/attention-maps/1 file"):
        AttentionMaps.load(tmp_path / "x.safetensors")
    (tmp_path / "y.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConceptExpressError, match="not a readable safetensors file"):
        AttentionMaps.load(tmp_path / "y.safetensors")
