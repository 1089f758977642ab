"""Concepts the user gives or corrects, against a real ComfyUI server (see test_comfyui.py for the setup): the masks
template with a mask painted into Load Image's picture (an RGBA image whose transparent part is the mask, as the
mask editor saves it), the extract template with Edit Concepts filled in, and the bad inputs, each one clear error
naming the node with nothing written to the embeddings folder."""

import json

import comfy_workflows as cw
import numpy as np
import pytest
from comfy_checks import FIRST_RUN, assert_clear_error, describe, embedding_files, run_logged, shipped
from comfy_server import CHECKPOINTS, artifacts_dir, comfyui_marks

pytestmark = comfyui_marks(pytest.mark.slow)

CHECKPOINT = CHECKPOINTS["sd15"]
BOX = (128, 256, 64, 192)  # painted pixels y0, y1, x0, x1 of a 512 x 512 picture: latent cells 16..31 x 8..23


@pytest.fixture(scope="module")
def server(comfy):
    return comfy


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


def painted_picture(server, name="painted.png", box=BOX, size=(512, 512)):
    """An RGBA picture whose alpha is 0 inside ``box``: Load Image's MASK is 1 - alpha, i.e. the painted box."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rgba = np.concatenate([rng.integers(0, 256, (*size[::-1], 3)), np.full((*size[::-1], 1), 255)], 2)
    y0, y1, x0, x1 = box
    rgba[y0:y1, x0:x1, 3] = 0
    Image.fromarray(rgba.astype(np.uint8), "RGBA").save(server.input / name)
    return name


def masks_template(object_info, image, prefix):
    prompt = shipped(cw.MASKS, object_info, checkpoint=CHECKPOINT, settings=FIRST_RUN)
    cw.set_inputs(prompt, "LoadImage", image=image)
    cw.set_inputs(prompt, "TrainConceptTokens", name_prefix=prefix)
    return prompt


def test_the_masks_template_trains_the_painted_region(server, object_info, tmp_path_factory):
    prompt = masks_template(object_info, painted_picture(server), "painted-set")
    run, log = run_logged(server, prompt)
    assert run.status == "execution_success", describe(run) + "\n" + log[-3000:]
    (train,) = cw.nodes_of(prompt, "TrainConceptTokens")
    assert run.history["outputs"][train]["text"][0].splitlines() == ["painted-set/painted"]
    folder = server.embeddings / "painted-set"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [(c["number"], c["name"]) for c in manifest["concepts"]] == [(1, "painted")]
    assert manifest["grid"] == [64, 64]
    from PIL import Image

    with Image.open(folder / "painted_mask.png") as im:
        mask = np.asarray(im.convert("L")) > 127
    expected = np.zeros((512, 512), bool)
    y0, y1, x0, x1 = BOX
    expected[y0:y1, x0:x1] = True
    np.testing.assert_array_equal(mask, expected)
    # the render and the painted concept, for the template's thumbnail (assets/make_thumbnails.py)
    (save,) = cw.nodes_of(prompt, "SaveImage")
    (image,) = run.images(save)
    artifacts = artifacts_dir(tmp_path_factory)
    (artifacts / "masks-render.png").write_bytes(server.view(image))
    (artifacts / "masks-concepts.png").write_bytes((folder / "concepts.png").read_bytes())


def test_the_masks_template_unpainted_is_a_clear_error(server, object_info):
    prompt = masks_template(object_info, cw.EXAMPLE_IMAGE, "unpainted-set")
    run, _ = run_logged(server, prompt)
    assert_clear_error(run, "LocalizeConcepts", "mask 1 of 1 is empty", "MaskEditor")
    assert embedding_files(server, "unpainted-set") == {}


def test_a_mask_of_another_aspect_ratio_is_a_clear_error(server, object_info):
    prompt = masks_template(object_info, painted_picture(server), "aspect-set")
    other = painted_picture(server, "other.png", (0, 64, 0, 64), size=(300, 500))
    (localize,) = cw.nodes_of(prompt, "LocalizeConcepts")
    prompt["900"] = {"class_type": "LoadImage", "inputs": {"image": other}}
    prompt[localize]["inputs"]["masks"] = ["900", 1]
    run, _ = run_logged(server, prompt)
    assert_clear_error(run, "LocalizeConcepts", "aspect ratio differs")
    assert embedding_files(server, "aspect-set") == {}


def test_a_label_image_of_300_colours_is_a_clear_error(server, object_info):
    from PIL import Image

    label = np.zeros((512, 512, 3), np.uint8)
    label[:15, :20] = np.stack([np.arange(300) % 256, np.arange(300) // 256 + 1, np.zeros(300)], 1).reshape(15, 20, 3)
    Image.fromarray(label).save(server.input / "labels.png")
    prompt = masks_template(object_info, painted_picture(server), "label-set")
    (localize,) = cw.nodes_of(prompt, "LocalizeConcepts")
    prompt["901"] = {"class_type": "LoadImage", "inputs": {"image": "labels.png"}}
    prompt[localize]["inputs"]["label_image"] = ["901", 0]
    run, _ = run_logged(server, prompt)
    assert_clear_error(run, "LocalizeConcepts", "300 colours", "PNG")
    assert embedding_files(server, "label-set") == {}


def test_the_edited_extract_template_trains_exactly_the_kept_concepts(server, object_info):
    prompt = shipped(cw.EXTRACT, object_info, checkpoint=CHECKPOINT, settings=FIRST_RUN)
    cw.set_inputs(prompt, "TrainConceptTokens", name_prefix="edited")
    cw.set_inputs(prompt, "EditConcepts", keep="1", names="first")
    run, log = run_logged(server, prompt)
    assert run.status == "execution_success", describe(run) + "\n" + log[-3000:]
    (train,) = cw.nodes_of(prompt, "TrainConceptTokens")
    assert run.history["outputs"][train]["text"][0].splitlines() == ["edited/first"]
    files = embedding_files(server, "edited")
    assert sorted(f for f in files if f.endswith(".safetensors")) == ["first.safetensors"]
    manifest = json.loads((server.embeddings / "edited" / "manifest.json").read_text())
    assert [(c["number"], c["name"]) for c in manifest["concepts"]] == [(1, "first")]
    # the renders: the kept concept, then "all" (which is the same one concept)
    (sheet,) = cw.nodes_of(prompt, "ConceptContactSheet")
    assert sheet in run.executed_nodes()


def test_an_edit_that_keeps_nothing_is_a_clear_error(server, object_info):
    prompt = shipped(cw.EXTRACT, object_info, checkpoint=CHECKPOINT, settings=FIRST_RUN)
    cw.set_inputs(prompt, "TrainConceptTokens", name_prefix="nothing-kept")
    cw.set_inputs(prompt, "EditConcepts", keep="1", drop="1")
    run, _ = run_logged(server, prompt)
    assert_clear_error(run, "EditConcepts", "leaves no concept")
    assert embedding_files(server, "nothing-kept") == {}
