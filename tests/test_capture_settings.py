"""Every capture setting changes exactly what it should, against the independent float64 aggregation of diffusers'
own attention probabilities (test_capture._diffusers_probabilities): the prompt (whose end-of-text column is read),
the timestep and noise seed (the latent the UNet sees), the EOT grid factor, and the target grid."""

import numpy as np
import torch
from oracles import aggregate_oracle
from test_capture import _diffusers_probabilities

from concept_express.uce_core.attention import capture_attention


def _grid(latent_hw, n):
    f = int(round((latent_hw[0] * latent_hw[1] / n) ** 0.5))
    return latent_hw[0] // f, latent_hw[1] // f


def _expected(backend, image, monkeypatch, target=None, eot_grid=None, **kwargs):
    latent_hw, probs, eot_position = _diffusers_probabilities(backend, image, monkeypatch, **kwargs)
    layers = [(p.numpy(), _grid(latent_hw, p.shape[0])) for _, p in probs if p.shape[0] == p.shape[1]]
    eot_grid = eot_grid or (latent_hw[0] // 4, latent_hw[1] // 4)
    columns = [
        p[:, eot_position]
        for where, p in probs
        if p.shape[0] != p.shape[1] and where != "mid_block" and _grid(latent_hw, p.shape[0]) == eot_grid
    ]
    return aggregate_oracle(layers, target or latent_hw), torch.stack(columns).mean(0).view(eot_grid), eot_position


def _check(maps, expected_self, expected_eot):
    np.testing.assert_allclose(maps.self_attention.double().numpy(), expected_self, rtol=1e-4, atol=1e-8)
    assert tuple(maps.eot.shape) == tuple(expected_eot.shape)
    torch.testing.assert_close(maps.eot.double(), expected_eot, rtol=1e-4, atol=1e-7)


def test_the_prompt_decides_which_end_of_text_column_is_read(sd1_backend, example_image, monkeypatch):
    prompt = "a photo of a cat"
    maps = capture_attention(sd1_backend, example_image, prompt=prompt)
    expected_self, expected_eot, position = _expected(sd1_backend, example_image, monkeypatch, prompt=prompt)
    tokenizer = sd1_backend.pipe.tokenizer
    assert position == len(tokenizer(prompt).input_ids) - 1 > 1  # [BOS, words..., EOS]
    assert maps.info["eot_position"] == position and maps.info["prompt"] == prompt
    _check(maps, expected_self, expected_eot)
    empty = capture_attention(sd1_backend, example_image)
    assert (maps.eot - empty.eot).abs().max() > 1e-3


def test_timestep_and_noise_seed_noise_the_latent_as_ddpm(sd1_backend, example_image, monkeypatch):
    maps = capture_attention(sd1_backend, example_image, timestep=400, noise_seed=7)
    _check(maps, *_expected(sd1_backend, example_image, monkeypatch, timestep=400, noise_seed=7)[:2])
    assert maps.info["timestep"] == 400


def test_eot_factor_chooses_the_cross_attention_grid(sd1_backend, example_image, monkeypatch):
    maps = capture_attention(sd1_backend, example_image, eot_factor=2)
    latent_hw = tuple(maps.info["latent_grid"])
    half = (latent_hw[0] // 2, latent_hw[1] // 2)
    assert tuple(maps.info["eot_grid"]) == half
    _check(maps, *_expected(sd1_backend, example_image, monkeypatch, eot_grid=half)[:2])


def test_a_coarser_target_grid_aggregates_there(sd1_backend, example_image, monkeypatch):
    latent_hw = tuple(capture_attention(sd1_backend, example_image).grid)
    half = (latent_hw[0] // 2, latent_hw[1] // 2)
    maps = capture_attention(sd1_backend, example_image, grid=half)
    assert maps.grid == half and maps.self_attention.shape == (half[0] * half[1],) * 2
    _check(maps, *_expected(sd1_backend, example_image, monkeypatch, target=half)[:2])
