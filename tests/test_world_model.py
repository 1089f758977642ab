"""End to end on the shipped scene-world model: the pipeline finds the objects of held-out scenes (checked against
the world's ground-truth masks) clearly better than the same architecture with random weights, whose localization
fails, and the empty prompt's end-of-text map favours objects only in the trained model. The judge that the token
benchmark relies on names rendered objects.

Measured on these 24 test scenes (benchmarks/README.md, "Scene world"): Hungarian IoU 0.188 trained, 0.095-0.121
random weights (seeds 0-2), 0.147 with a planted bug (the query grid transposed in the aggregation); end-of-text
foreground ratio 1.13 trained, 0.99-1.01 random. The thresholds sit between.
"""

import numpy as np
import pytest
import torch

from concept_express.uce_core.attention import capture_attention
from concept_express.uce_core.backends.diffusers_backend import DiffusersBackend, info_from_pipeline
from concept_express.uce_core.backends.loading import load_backend
from concept_express.uce_core.errors import ConceptExpressError
from concept_express.uce_core.localize import localize_concepts
from concept_express.uce_core.world.evaluation import eot_foreground_ratio, score, truth_on_grid
from concept_express.uce_core.world.judge import CLASSES, judge_accuracy, load_judge
from concept_express.uce_core.world.model import WEIGHTS, random_world_pipeline
from concept_express.uce_core.world.scenes import SPLITS, render_scene

SCENES = [render_scene(SPLITS["test"][i]) for i in range(24)]


@pytest.fixture(scope="module")
def world():
    return load_backend("world", device="cpu", dtype="fp32")


def _localization(backend):
    ious, ratios = [], []
    for scene in SCENES:
        maps = capture_attention(backend, scene.image)
        truth = truth_on_grid(scene, maps.grid)
        ratios.append(eot_foreground_ratio(maps.eot_on_grid(), truth))
        try:
            ious.append(score(localize_concepts(maps).masks, truth).iou)
        except ConceptExpressError:
            ious.append(0.0)
    return float(np.mean(ious)), float(np.nanmean(ratios))


def test_shipped_weights_are_small_float16_and_recorded():
    files = list(WEIGHTS.parent.rglob("*.safetensors"))
    assert sum(f.stat().st_size for f in files) <= 25 * 2**20
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), "pt") as handle:
            assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float16}, f
    assert (WEIGHTS / "record.json").is_file()


def test_world_loads_by_name_as_an_sd2_family_model(world):
    assert world.info.family == "sd2" and world.info.resolution == 128 and world.info.vae_scale_factor == 8


def test_world_model_localizes_objects_and_random_weights_do_not(world):
    trained_iou, trained_eot = _localization(world)
    pipe = random_world_pipeline(seed=0)
    control_iou, control_eot = _localization(DiffusersBackend(pipe, info_from_pipeline(pipe, "world-random")))
    assert control_iou < 0.13  # the control fails: random weights see no objects
    assert trained_iou > 0.165 and trained_iou > control_iou + 0.07  # a transposed query grid gives 0.147
    assert control_eot < 1.04 < 1.08 < trained_eot  # the empty prompt's end-of-text token looks at objects


def test_judge_names_rendered_objects():
    assert judge_accuracy(load_judge(), count=120) > 0.9
    assert len(CLASSES) == 30
