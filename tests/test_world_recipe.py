"""The world recipe without training a model: its resume rules (a run folder refuses other settings, except a
changed time budget), the learning rate's schedule (warm-up, then cosine to a tenth over the steps or the time,
whichever runs out first) and the attention-focus stage's two losses (mass and even) against their formulas, its
switch from one to the other (three steps on the untrained architecture), its recorder against diffusers' own
attention, and its region maps against the scenes' masks."""

import functools
import json
import math
from dataclasses import asdict

import pytest
import torch
from tqdm.auto import tqdm

from concept_express.uce_core.world import recipe


class Started(Exception):
    """Raised instead of rendering data: the run got past its settings check."""


@pytest.fixture
def no_stages(monkeypatch):
    def refuse(*args, **kwargs):
        raise Started

    monkeypatch.setattr(recipe, "stage_data", refuse)
    monkeypatch.setattr(recipe.torch, "set_num_threads", lambda n: None)  # the run's threads, not the test process's


def saved_run(tmp_path, **changes):
    settings = recipe.RecipeSettings(scenes=64, **changes)
    (tmp_path / "settings.json").write_text(json.dumps(asdict(settings)))
    return settings


def test_resume_refuses_other_settings(tmp_path, no_stages):
    saved_run(tmp_path)
    with pytest.raises(SystemExit, match="only --budget-hours may change"):
        recipe.run(tmp_path, recipe.RecipeSettings(scenes=64, unet_steps=10), 1, [], resume=True)
    assert json.loads((tmp_path / "settings.json").read_text())["unet_steps"] == recipe.RecipeSettings().unet_steps


def test_a_run_folder_needs_resume(tmp_path, no_stages):
    saved_run(tmp_path)
    with pytest.raises(SystemExit, match="--resume"):
        recipe.run(tmp_path, recipe.RecipeSettings(scenes=64), 1, [], resume=False)


def test_resume_may_change_the_budget(tmp_path, no_stages):
    saved_run(tmp_path, budget_hours=1.0)
    with pytest.raises(Started):
        recipe.run(tmp_path, recipe.RecipeSettings(scenes=64, budget_hours=3.0), 1, [], resume=True)
    assert json.loads((tmp_path / "settings.json").read_text())["budget_hours"] == 3.0  # the record says which


@pytest.mark.parametrize(
    ("step", "time_progress", "expected"),
    [
        (0, 0.0, 1e-3 / 100),  # warm-up: (step + 1) / warmup of the peak
        (49, 0.0, 1e-3 / 2),
        (100, 0.0, 1e-3),  # the end of the warm-up: the peak
        (550, 0.0, 1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))),  # half-way through the steps
        (100, 0.5, 1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))),  # half-way through the time
        (1000, 0.0, 1e-4),  # the end: a tenth
        (200, 2.0, 1e-4),  # past the time budget: stays at a tenth
    ],
)
def test_learning_rate_schedule(step, time_progress, expected):
    assert recipe._lr(step, 1000, 1e-3, 100, time_progress) == pytest.approx(expected, rel=1e-12)


def test_eot_focus_loss_against_its_formula():
    from concept_express.uce_core.world.attention_focus import eot_focus_loss

    columns = torch.tensor([[1.0, 3.0, 0.0, 4.0], [2.0, 2.0, 2.0, 2.0], [5.0, 1.0, 1.0, 1.0]])
    foreground = torch.tensor([[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    # sample 1: (1 + 0.5 * 3) / 8 on the objects; sample 2 has none (left out); sample 3: 2 / 8
    expected = -(math.log(2.5 / 8) + math.log(2 / 8)) / 2
    assert float(eot_focus_loss(columns, foreground)) == pytest.approx(expected, rel=1e-6)
    attention = columns.clone().requires_grad_(True)
    eot_focus_loss(attention, foreground).backward()
    assert float(attention.grad[0, 0]) < 0 < float(attention.grad[0, 3])  # more on the objects, less elsewhere
    assert float(attention.grad[1].abs().sum()) == 0.0


def test_group_loss_against_its_formula():
    """-log(share of each pure cell's row on its own region), averaged over the pure cells, by plain loops."""
    from concept_express.uce_core.world.attention_focus import PURE, group_loss

    gen = torch.Generator().manual_seed(3)
    rows = torch.rand(2, 6, 6, generator=gen, dtype=torch.float64) ** 3
    rows /= rows.sum(dim=-1, keepdim=True)
    regions = torch.zeros(2, 3, 6, dtype=torch.float64)  # background, object 1, object 2 over six cells
    regions[0, 0] = torch.tensor([1.0, 1.0, 0.45, 0.0, 0.0, 0.3])
    regions[0, 1] = torch.tensor([0.0, 0.0, 0.35, 1.0, 0.0, 0.0])
    regions[0, 2] = torch.tensor([0.0, 0.0, 0.2, 0.0, 1.0, 0.7])
    regions[1, 0] = torch.tensor([1.0, 0.4, 1.0, 1.0, 1.0, 1.0])
    regions[1, 1] = torch.tensor([0.0, 0.6, 0.0, 0.0, 0.0, 0.0])
    terms = []
    for b in range(2):
        for i in range(6):
            own = max(range(3), key=lambda r: float(regions[b, r, i]))
            if regions[b, own, i] >= PURE:
                terms.append(-math.log(sum(float(rows[b, i, j] * regions[b, own, j]) for j in range(6))))
    assert len(terms) == 11  # no region covers half of cell (0, 2): left out
    assert float(group_loss(rows, regions)) == pytest.approx(sum(terms) / len(terms), rel=1e-9)
    attention = rows.clone().requires_grad_(True)
    group_loss(attention, regions).backward()
    assert float(attention.grad[0, 3, 3]) < 0 == float(attention.grad[0, 3, 0])  # object 1's cell: more on itself


def test_even_eot_focus_loss_against_its_formula():
    """Cross-entropy from the foreground's uniform distribution to the normalised column, by plain loops."""
    from concept_express.uce_core.world.attention_focus import eot_focus_loss

    columns = torch.tensor([[1.0, 3.0, 0.5, 4.0], [2.0, 2.0, 2.0, 2.0], [5.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    foreground = torch.tensor([[1.0, 0.5, 0.0, 0.0], [0.0] * 4, [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    terms = []
    for b in (0, 2):  # sample 1 has no foreground: left out
        total, weight = float(columns[b].sum()), float(foreground[b].sum())
        terms.append(-sum(float(foreground[b, j]) / weight * math.log(float(columns[b, j]) / total) for j in range(4)))
    assert float(eot_focus_loss(columns, foreground, even=True)) == pytest.approx(sum(terms) / 2, rel=1e-9)
    # even differs from mass: all of sample 3's mass on one object cell is a perfect "mass" but a poor "even"
    lopsided = torch.tensor([[0.0, 0.0, 1.0, 1e-6]], dtype=torch.float64)
    spread = torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    fg = foreground[2:]
    assert float(eot_focus_loss(lopsided, fg)) < 1e-5
    assert float(eot_focus_loss(lopsided, fg, even=True)) > float(eot_focus_loss(spread, fg, even=True)) + 1.0
    assert float(eot_focus_loss(spread, fg, even=True)) == pytest.approx(math.log(2), rel=1e-9)  # its entropy


def test_even_group_loss_against_its_formula():
    """Cross-entropy from each pure cell's region, made a uniform distribution, to the cell's row, by plain loops."""
    from concept_express.uce_core.world.attention_focus import PURE, group_loss

    gen = torch.Generator().manual_seed(4)
    rows = torch.rand(2, 5, 5, generator=gen, dtype=torch.float64) + 0.05
    rows /= rows.sum(dim=-1, keepdim=True)
    regions = torch.zeros(2, 3, 5, dtype=torch.float64)
    regions[0, 0] = torch.tensor([1.0, 0.8, 0.4, 0.0, 0.0])
    regions[0, 1] = torch.tensor([0.0, 0.2, 0.3, 1.0, 0.0])
    regions[0, 2] = torch.tensor([0.0, 0.0, 0.3, 0.0, 1.0])
    regions[1, 0] = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0])
    regions[1, 1] = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0])
    terms = []
    for b in range(2):
        for i in range(5):
            own = max(range(3), key=lambda r: float(regions[b, r, i]))
            if regions[b, own, i] >= PURE:
                size = float(regions[b, own].sum())
                terms.append(-sum(float(regions[b, own, j]) / size * math.log(float(rows[b, i, j])) for j in range(5)))
    assert len(terms) == 9  # no region covers half of cell (0, 2)
    assert float(group_loss(rows, regions, even=True)) == pytest.approx(sum(terms) / len(terms), rel=1e-9)


def test_focus_recorder_is_diffusers_attention():
    """The stage's recorder computes what diffusers' own processor does, and keeps the head-mean probabilities."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    from concept_express.uce_core.world.attention_focus import FocusRecorder

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=4, dim_head=4)
    x, context = torch.randn(2, 9, 16), torch.randn(2, 5, 8)
    store = []
    ours = FocusRecorder(store, "cross")(attn, x, context)
    theirs = AttnProcessor()(attn, x, context)
    assert torch.allclose(ours, theirs, atol=1e-6)
    q = attn.to_q(x).view(2, 9, 4, 4).transpose(1, 2).double()
    k = attn.to_k(context).view(2, 5, 4, 4).transpose(1, 2).double()
    probs = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1).mean(dim=1)  # scale 1 / sqrt(dim_head)
    assert store[0][0] == "cross" and torch.allclose(store[0][1].double(), probs, atol=1e-6)
    ours = FocusRecorder(store, "self")(attn := Attention(query_dim=16, heads=4, dim_head=4), x)  # self-attention
    assert torch.allclose(ours, AttnProcessor()(attn, x), atol=1e-6)
    q = attn.to_q(x).view(2, 9, 4, 4).transpose(1, 2).double()
    k = attn.to_k(x).view(2, 9, 4, 4).transpose(1, 2).double()
    probs = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1).mean(dim=1)
    assert store[1][0] == "self" and torch.allclose(store[1][1].double(), probs, atol=1e-6)


def test_regions_on_grid_are_the_scene_masks_at_pixel_cells_and_cover_each_cell_once():
    from concept_express.uce_core.world.attention_focus import regions_on_grid
    from concept_express.uce_core.world.scenes import SIZE, SPLITS, render_scene

    seeds = [SPLITS["train"][i] for i in range(3)]
    pixels = regions_on_grid(seeds, SIZE)
    for i, seed in enumerate(seeds):
        masks = torch.from_numpy(render_scene(seed).masks).flatten(1).float()
        assert torch.equal(pixels[i, 1 : 1 + len(masks)], masks)  # one pixel per cell: the masks themselves
        assert torch.equal(pixels[i, 0], 1.0 - masks.amax(dim=0))
        assert float(pixels[i, 1 + len(masks) :].abs().sum()) == 0.0
    coarse = regions_on_grid(seeds, 8).double()
    assert torch.allclose(coarse.sum(dim=1), torch.ones(3, 64, dtype=torch.float64), atol=1e-6)
    block = pixels.double().view(3, 6, 8, SIZE // 8, 8, SIZE // 8).mean(dim=(3, 5)).flatten(2)
    assert torch.allclose(coarse, block, atol=1e-6)


def test_focus_stage_asks_for_mass_then_for_even_attention(tmp_path, monkeypatch):
    """Two steps of the stage on the world architecture (untrained): the losses are asked for mass before
    ``eot_even_from`` and for even attention from it on, the curves and the checkpoint record every step."""
    from concept_express.uce_core.world import attention_focus
    from concept_express.uce_core.world.model import build_parts
    from concept_express.uce_core.world.scenes import SPLITS, render_scene

    asked = {"eot": [], "group": []}
    for name, key in (("eot_focus_loss", "eot"), ("group_loss", "group")):
        real = getattr(attention_focus, name)

        def spy(values, targets, even=False, *, _real=real, _key=key):
            asked[_key].append(even)
            return _real(values, targets, even)

        monkeypatch.setattr(attention_focus, name, spy)
    settings = recipe.RecipeSettings(scenes=2, eot_steps=3, eot_even_from=1, eot_batch=2, eot_scenes=2)
    (tmp_path / "data").mkdir()
    objects = [[o.phrase() for o in render_scene(SPLITS["train"][i]).objects] for i in range(2)]
    (tmp_path / "data" / "objects.json").write_text(json.dumps(objects))
    vae, unet, text_encoder, tokenizer, scheduler = build_parts(0)
    parts = {"unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}
    latents = torch.randn(2, vae.config.latent_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    quiet = functools.partial(tqdm, disable=True)
    taught = attention_focus.stage_focus(tmp_path, settings, parts, latents, quiet)
    assert asked["eot"] == [False, True, True]
    assert len(asked["group"]) >= 3 and asked["group"][0] is False and set(asked["group"][-2:]) == {True}
    assert taught["steps"] == 3 and len(taught["focus"]) == 3 == len(taught["group"])
    assert torch.load(tmp_path / "focus.pt", weights_only=False)["step"] == 3
