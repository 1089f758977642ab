"""Against a real ComfyUI server (COMFYUI_PATH, run with ComfyUI's own Python) with the pack loaded through
--extra-model-paths-config and a random-weight checkpoint that ComfyUI's stock loader detects as SD1.5.

The shipped workflows are converted to API format with the server's /object_info and queued over HTTP with small
settings (256 px capture, 2 training steps, 2 sampling steps at 128 px); everything else is as shipped.
"""

import time

import comfy_workflows as cw
import pytest
from comfy_checks import assert_clear_error, assert_embeddings_found, describe, embedding_files, png_size, run_logged
from comfy_checks import shipped as shipped_workflow
from comfy_server import PACK_NAME, comfyui_path, ensure_instruct_pix2pix_unet, running_server

from concept_express.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.slow,
    pytest.mark.skipif(
        comfyui_path() is None, reason="needs COMFYUI_PATH (a ComfyUI tree; run pytest with ComfyUI's Python)"
    ),
]

CHECKPOINT = "concept-express-test-sd15.safetensors"
PREFIX = "cx_test"
RESOLUTION = 256
LATENT = 128
SMALL = {
    "CaptureAttention": {"resolution": RESOLUTION},
    "TrainConceptTokens": {"name_prefix": PREFIX, "steps": 2, "merge_step": 1, "split_tokens": 2},
    "KSampler": {"steps": 2},
    "EmptyLatentImage": {"width": LATENT, "height": LATENT},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory, "sd15") as server:
        yield server


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


def shipped(name, object_info, *, prefix=PREFIX, enable_templates=()):
    settings = {**SMALL, "TrainConceptTokens": {**SMALL["TrainConceptTokens"], "name_prefix": prefix}}
    return shipped_workflow(
        name, object_info, checkpoint=CHECKPOINT, settings=settings, enable_templates=enable_templates
    )


@pytest.fixture(scope="module")
def extract(server, object_info):
    prompt = shipped("extract", object_info)
    run, log = run_logged(server, prompt)
    assert run.status == "execution_success", describe(run)
    (train,) = cw.nodes_of(prompt, "TrainConceptTokens")
    names = run.history["outputs"][train]["text"][0].splitlines()
    return {"prompt": prompt, "run": run, "log": log, "train": train, "names": names}


# -- registration and templates -------------------------------------------------------------------------------------


def test_our_nodes_are_registered_as_declared(object_info):
    for name, cls in NODE_CLASS_MAPPINGS.items():
        info = object_info[name]
        assert info["category"] == "ConceptExpress"
        assert info["display_name"] == NODE_DISPLAY_NAME_MAPPINGS[name]
        assert PACK_NAME in info["python_module"]
        declared = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            assert info["input_order"].get(section, []) == list(declared.get(section, {})), (name, section)
        assert info["output"] == list(cls.RETURN_TYPES) and info["output_name"] == list(cls.RETURN_NAMES)
        assert info["output_node"] == bool(getattr(cls, "OUTPUT_NODE", False))
        assert info["description"] == cls.DESCRIPTION


def test_stock_nodes_are_as_listed_for_the_ci_tests(object_info):
    """comfy_workflows.STOCK_NODES (what the CI tests check the workflows against) matches this ComfyUI."""
    real = cw.declarations_from_object_info(object_info, cw.STOCK_NODES)
    for name, listed in cw.STOCK_NODES.items():
        server_inputs, listed_inputs = cw.declared_inputs(real[name]), cw.declared_inputs(listed)
        assert [n for n, _ in server_inputs] == [n for n, _ in listed_inputs], name
        for (input_name, spec), (_, ours) in zip(server_inputs, listed_inputs):
            if ours[0] == cw.ANY_FILE:
                assert cw.input_kind(spec) == "COMBO", (name, input_name)
            elif isinstance(ours[0], list):
                assert set(ours[0]) <= set(spec[0]), (name, input_name)
            else:
                assert spec[0] == ours[0], (name, input_name)
                for key in ("min", "max"):
                    assert spec[1].get(key) == ours[1].get(key), (name, input_name, key)
        assert real[name]["output"] == listed["output"], name
        assert [(s.input, s.kind) for s in cw.widget_slots(real[name])] == [
            (s.input, s.kind) for s in cw.widget_slots(listed)
        ], name


def test_workflows_are_served_as_templates(server):
    assert sorted(server.get("/workflow_templates")[PACK_NAME]) == sorted(cw.WORKFLOW_NAMES)
    for name in cw.WORKFLOW_NAMES:
        assert server.get(f"/api/workflow_templates/{PACK_NAME}/{name}.json") == cw.load(name)
        assert (
            server.get(f"/api/workflow_templates/{PACK_NAME}/{name}.jpg") == (cw.WORKFLOWS / f"{name}.jpg").read_bytes()
        )


# -- the extract workflow ---------------------------------------------------------------------------------------------


def test_extract_writes_one_embedding_per_concept(extract, server):
    names = extract["names"]
    assert names and names == [f"{PREFIX}/{PREFIX}_{i + 1}" for i in range(len(names))]
    for name in names:
        assert (server.embeddings / f"{name}.safetensors").is_file(), name
    assert (server.embeddings / PREFIX / "manifest.json").is_file()
    assert set(names) <= set(server.get("/embeddings"))
    # one mask per concept in the masks preview
    prompt, run = extract["prompt"], extract["run"]
    (to_image,) = cw.nodes_of(prompt, "MaskToImage")
    (masks_preview,) = [i for i in cw.nodes_of(prompt, "PreviewImage") if prompt[i]["inputs"]["images"][0] == to_image]
    assert len(run.images(masks_preview)) == len(names)


def test_extract_uses_the_embeddings_with_no_missing_warning(extract):
    assert_embeddings_found(extract["log"])


def test_a_missing_embedding_does_show_in_the_log(server, object_info):
    """Control for the test above: the same log gets ComfyUI's warning when a name is wrong."""
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {
            "class_type": "ComposeConceptPrompt",
            "inputs": {"template": "a photo of {1}", "embedding_names": "nowhere/nowhere_1", "clip": ["1", 1]},
        },
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
    }
    run, log = run_logged(server, prompt)
    assert run.status == "execution_success", describe(run)
    assert "embedding:nowhere/nowhere_1 does not exist" in log


def test_extract_images_come_out(extract, server):
    prompt, run = extract["prompt"], extract["run"]
    saves = cw.nodes_of(prompt, "SaveImage")
    assert len(saves) == 2  # composition and concept 1 (concepts 2 and 3 are muted as shipped)
    for node in saves:
        (image,) = run.images(node)
        assert image["type"] == "output" and image["subfolder"] == "ConceptExpress"
        assert png_size(server.view(image)) == (LATENT, LATENT)
        assert (server.output / image["subfolder"] / image["filename"]).is_file()
    for node in cw.nodes_of(prompt, "PreviewImage"):  # EOT map, overlay, masks, loss curve
        images = run.images(node)
        assert images, prompt[node]
        width, height = png_size(server.view(images[0]))
        assert width > 16 and height > 16


def test_second_queue_reuses_the_saved_set(extract, server):
    """With ComfyUI's cache dropped (as after a restart), the same graph runs Train Concept Tokens again, which
    finds the finished set and loads it instead of training."""
    before = embedding_files(server, PREFIX)
    server.post("/free", {"free_memory": True})
    time.sleep(2)  # the flag is applied by the prompt worker before it takes the next prompt
    run, log = run_logged(server, extract["prompt"])
    assert run.status == "execution_success", describe(run)
    train = extract["train"]
    assert train in run.executed_nodes() and train not in run.cached_nodes()
    assert run.progress(train) == []  # no training step
    assert run.node_seconds(train) < extract["run"].node_seconds(train) / 2
    assert run.history["outputs"][train]["text"][0].splitlines() == extract["names"]
    assert embedding_files(server, PREFIX) == before  # nothing rewritten
    assert_embeddings_found(log)


def test_enabling_the_branch_of_each_further_concept(extract, server, object_info):
    count = len(extract["names"])
    if count < 2:
        pytest.skip(f"the test image gave {count} concept at {RESOLUTION} px; no second branch to enable")
    enabled = [f"a photo of {{{k}}}" for k in range(2, min(count, 3) + 1)]
    prompt = shipped("extract", object_info, enable_templates=enabled)
    run, log = run_logged(server, prompt)
    assert run.status == "execution_success", describe(run)
    assert extract["train"] in run.cached_nodes()  # training is not repeated
    new = [n for n in cw.nodes_of(prompt, "SaveImage") if n in run.executed_nodes()]
    assert sorted(prompt[n]["inputs"]["filename_prefix"] for n in new) == [
        f"ConceptExpress/concept_{k}" for k in range(2, min(count, 3) + 1)
    ]
    for node in new:
        (image,) = run.images(node)
        assert png_size(server.view(image)) == (LATENT, LATENT)
    assert_embeddings_found(log)


# -- the reuse workflow -----------------------------------------------------------------------------------------------


def test_reuse_samples_with_the_saved_set(extract, server, object_info):
    prompt = shipped("reuse", object_info)
    cw.set_inputs(prompt, "LoadConceptTokens", concept_set=PREFIX)
    run, log = run_logged(server, prompt)
    assert run.status == "execution_success", describe(run)
    (save,) = cw.nodes_of(prompt, "SaveImage")
    (image,) = run.images(save)
    assert png_size(server.view(image)) == (LATENT, LATENT)
    assert_embeddings_found(log)


# -- bad inputs: clear errors -----------------------------------------------------------------------------------------


def _capture_prompt(image="example.png", model=None):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "LoadImage", "inputs": {"image": image}},
        "3": {
            "class_type": "CaptureAttention",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "vae": ["1", 2],
                "image": ["2", 0],
                "timestep": 0,
                "resize": "keep",
                "resolution": RESOLUTION,
            },
        },
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}},
    }
    if model is not None:
        prompt["5"] = model
        prompt["3"]["inputs"]["model"] = ["5", 0]
    return prompt


def test_too_small_an_image_is_a_clear_error(server):
    from PIL import Image

    Image.new("RGB", (32, 40), (200, 30, 30)).save(server.input / "tiny.png")
    run, _ = run_logged(server, _capture_prompt("tiny.png"))
    assert_clear_error(run, "CaptureAttention", "32x40", "at least 64 pixels", "larger image")


def test_an_unsupported_model_is_a_clear_error(server):
    """An SD1.5 InstructPix2Pix UNet (ComfyUI detects it from its 8 input channels) with the SD1.5 CLIP and VAE."""
    name = server.add_checkpoint(ensure_instruct_pix2pix_unet(), folder="diffusion_models")
    loader = {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}
    run, _ = run_logged(server, _capture_prompt(model=loader))
    assert_clear_error(run, "CaptureAttention", "SD15_instructpix2pix", "SD1.x, SD2.x and SDXL", "Load Checkpoint")


def test_a_branch_for_a_concept_that_does_not_exist_is_a_clear_error(extract, server, object_info):
    count = len(extract["names"])
    prompt = shipped("extract", object_info)
    (compose,) = [
        n for n in cw.nodes_of(prompt, "ComposeConceptPrompt") if prompt[n]["inputs"]["template"] == "a photo of {1}"
    ]
    prompt[compose]["inputs"]["template"] = f"a photo of {{{count + 1}}}"
    run, _ = run_logged(server, prompt)
    assert_clear_error(run, "ComposeConceptPrompt", f"{{{count + 1}}}", f"only {count} concept")


def test_retraining_into_an_existing_set_is_refused(extract, server, object_info):
    before = embedding_files(server, PREFIX)
    prompt = shipped("extract", object_info)
    cw.set_inputs(prompt, "TrainConceptTokens", steps=SMALL["TrainConceptTokens"]["steps"] + 1)
    run, _ = run_logged(server, prompt)
    assert_clear_error(run, "TrainConceptTokens", "already exist", "nothing was written")
    assert embedding_files(server, PREFIX) == before


# -- Cancel -----------------------------------------------------------------------------------------------------------


def test_cancel_stops_training_within_a_step_and_the_next_run_resumes(server, object_info):
    prefix, steps = "cx_cancel", 4
    prompt = shipped("extract", object_info, prefix=prefix)
    cw.set_inputs(prompt, "TrainConceptTokens", steps=steps)
    (train,) = cw.nodes_of(prompt, "TrainConceptTokens")
    checkpoint = server.output / "concept-express-checkpoints" / f"{prefix}.safetensors"
    seen = {}

    async def interrupt_after_first_step(run, message, session):
        data = message["data"]
        if message["type"] == "progress" and data.get("node") == train and "at" not in seen:
            seen["at"] = data["value"]
            seen["index"] = len(run.messages)
            async with session.post(f"{server.url}/interrupt", json={}) as response:
                assert response.status == 200

    run, _ = run_logged(server, prompt, on_message=interrupt_after_first_step)
    assert run.status == "execution_interrupted", describe(run)
    (stopped,) = run.of_type("execution_interrupted")
    assert stopped["node_id"] == train and stopped["node_type"] == "TrainConceptTokens"
    later = [
        m["data"]["value"]
        for m in run.messages[seen["index"] :]
        if m["type"] == "progress" and m["data"].get("node") == train
    ]
    assert seen["at"] >= 1 and len(later) <= 1 and max([seen["at"], *later]) < steps  # at most the step in flight
    assert embedding_files(server, prefix) == {}  # nothing in the embeddings folder
    assert checkpoint.is_file()
    assert prefix not in " ".join(server.get("/embeddings"))

    run, log = run_logged(server, prompt)
    assert run.status == "execution_success", describe(run)
    progress = run.progress(train)
    assert progress[0] >= seen["at"], progress  # resumed where it stopped, not from step 0
    assert progress[-1] == steps and len(progress) <= steps - seen["at"] + 1
    assert not checkpoint.exists()
    assert sorted(embedding_files(server, prefix))
    assert_embeddings_found(log)
