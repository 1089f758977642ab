"""The SDXL path against a real ComfyUI server: a random-weight checkpoint that ComfyUI's stock loader detects as
SDXL runs the shipped extract template (CLIP-L and CLIP-G tokens), and an SDXL MODEL with the CLIP of another
checkpoint is refused with a clear message.

This is a model-family test, not a user's first run (test_comfyui.py queues the templates as shipped): at SDXL's
native 1024 px the CPU run would take hours. On CPU, ComfyUI keeps the text encoders in float16 and casts them per
layer, so every prompt of a training step holds its own float32 copy of CLIP-G (~3 GB) until the backward pass: the
settings keep it to a 256 px capture, at most two concepts and one split token."""

import comfy_workflows as cw
import pytest
from comfy_checks import assert_clear_error, assert_embeddings_found, describe, png_size, run_logged, shipped
from comfy_server import CHECKPOINTS, comfyui_marks

pytestmark = comfyui_marks(pytest.mark.slow)

SDXL, SD15 = CHECKPOINTS["sdxl"], CHECKPOINTS["sd15"]
PREFIX = "cx_sdxl"
LATENT = 128
SMALL = {
    "CaptureAttention": {"resolution": 256},
    "LocalizeConcepts": {"n_max": 2},
    "TrainConceptTokens": {"name_prefix": PREFIX, "steps": 2, "merge_step": 1, "split_tokens": 1},
    "KSampler": {"steps": 2},
    "EmptyLatentImage": {"width": LATENT, "height": LATENT},
}


@pytest.fixture(scope="module")
def server(comfy):
    comfy.post("/free", {"unload_models": True, "free_memory": True})  # the SD1.5 tests' models out of memory
    return comfy


def test_sdxl_model_with_another_checkpoints_clip_is_a_clear_error(server):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SDXL}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}},
        "3": {"class_type": "LoadImage", "inputs": {"image": cw.EXAMPLE_IMAGE}},
        "4": {
            "class_type": "CaptureAttention",
            "inputs": {
                "model": ["1", 0],
                "clip": ["2", 1],
                "vae": ["1", 2],
                "image": ["3", 0],
                "timestep": 0,
                "resize": "keep",
                "resolution": 256,
            },
        },
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 1]}},
    }
    run, _ = run_logged(server, prompt)
    assert_clear_error(run, "CaptureAttention", "does not match the sdxl MODEL", "CLIP of the same checkpoint")


def test_sdxl_extract_writes_and_uses_embeddings(server):
    object_info = server.object_info()
    prompt = shipped(cw.EXTRACT, object_info, checkpoint=SDXL, settings=SMALL)
    run, log = run_logged(server, prompt)
    assert run.status == "execution_success", describe(run)
    (train,) = cw.nodes_of(prompt, "TrainConceptTokens")
    names = run.history["outputs"][train]["text"][0].splitlines()
    assert names == [f"{PREFIX}/{PREFIX}_{i + 1}" for i in range(len(names))] and names
    for name in names:
        assert (server.embeddings / f"{name}.safetensors").is_file()
    assert set(names) <= set(server.get("/embeddings"))
    assert_embeddings_found(log)  # both text encoders took the vectors (no "does not exist", no "shape mismatch")
    (renders,) = [
        n for n in cw.nodes_of(prompt, "SaveImage") if prompt[n]["inputs"]["filename_prefix"].endswith("concept")
    ]
    images = run.images(renders)
    assert len(images) == len(names) + 1  # every concept, then all of them
    for image in images:
        assert png_size(server.view(image)) == (LATENT, LATENT)
