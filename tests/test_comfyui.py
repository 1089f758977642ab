"""Against a real ComfyUI server (COMFYUI_PATH, run with ComfyUI's own Python) with the pack loaded through
--extra-model-paths-config and a random-weight checkpoint that ComfyUI's stock loader detects as SD1.5.

Each template is queued as a user's first run queues it: converted to API format with the server's /object_info,
its own example image and widget values, only the checkpoint, the step counts and the latent size made small
(comfy_checks.FIRST_RUN). Tests of other behaviour (errors, cancel) build on that run or say what they change.
"""

import time

import comfy_workflows as cw
import numpy as np
import pytest
from comfy_checks import (
    FIRST_RUN,
    assert_clear_error,
    assert_embeddings_found,
    describe,
    embedding_files,
    png_size,
    run_logged,
    shipped,
)
from comfy_server import CHECKPOINTS, PACK_NAME, artifacts_dir, comfyui_marks, ensure_instruct_pix2pix_unet

from concept_express.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

pytestmark = comfyui_marks(pytest.mark.slow)

CHECKPOINT = CHECKPOINTS["sd15"]
PREFIX = "concept"  # the template's name_prefix, as shipped
LATENT = FIRST_RUN["EmptyLatentImage"]["width"]
TILE = 256  # Concept Contact Sheet's tile, as shipped


@pytest.fixture(scope="module")
def server(comfy):
    return comfy


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


@pytest.fixture(scope="module")
def extract(server, object_info, tmp_path_factory):
    """The extract template, queued once as shipped (FIRST_RUN: small step counts and latent)."""
    prompt = shipped(cw.EXTRACT, object_info, checkpoint=CHECKPOINT, settings=FIRST_RUN)
    run, log = run_logged(server, prompt)
    peak = server.peak_memory_gib()
    print(f"extract as shipped: {describe(run)}; server peak memory {peak:.1f} GiB")
    assert run.status == "execution_success", describe(run) + "\n" + log[-3000:]
    (train,) = cw.nodes_of(prompt, "TrainConceptTokens")
    names = run.history["outputs"][train]["text"][0].splitlines()
    return {"prompt": prompt, "run": run, "log": log, "train": train, "names": names, "peak": peak}


def node_of(prompt, class_type, **inputs):
    """The one node of ``class_type`` whose inputs include ``inputs``."""
    (node,) = [
        n for n in cw.nodes_of(prompt, class_type) if all(prompt[n]["inputs"].get(k) == v for k, v in inputs.items())
    ]
    return node


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
        # list outputs and list inputs: what makes one queue render every concept
        assert info["output_is_list"] == list(getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES)))
        assert info["is_input_list"] == bool(getattr(cls, "INPUT_IS_LIST", False))
    assert object_info["ComposeConceptPrompt"]["output_is_list"] == [True, True, True]
    assert object_info["ConceptContactSheet"]["is_input_list"] is True


def test_stock_nodes_are_as_listed_for_the_ci_tests(object_info):
    """comfy_workflows.STOCK_NODES (what the CI tests check the workflows against) matches this ComfyUI, up to the
    outputs newer versions added (ADDED_OUTPUTS)."""
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
        assert real[name]["output"] in (listed["output"], listed["output"] + cw.ADDED_OUTPUTS.get(name, ())), name
        assert [(s.input, s.kind) for s in cw.widget_slots(real[name])] == [
            (s.input, s.kind) for s in cw.widget_slots(listed)
        ], name


def test_templates_are_served_under_their_titles(server):
    import urllib.parse

    assert sorted(server.get("/workflow_templates")[PACK_NAME]) == sorted(cw.WORKFLOW_NAMES)
    for name in cw.WORKFLOW_NAMES:
        path = f"/api/workflow_templates/{PACK_NAME}/{urllib.parse.quote(name)}"
        assert server.get(path + ".json") == cw.load(name)
        assert server.get(path + ".jpg") == (cw.WORKFLOWS / f"{name}.jpg").read_bytes()


# -- the extract template, as shipped -------------------------------------------------------------------------------


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


def test_a_missing_embedding_does_show_in_the_log(server):
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


def test_extract_renders_every_concept_and_all_of_them_from_one_queue(extract, server, tmp_path_factory):
    """One queue, one sampler in the graph: a render per concept and one of all of them, saved; the contact sheet
    has each render in its tile (in order) beside the overlay. The sheet is kept in the artifacts."""
    from PIL import Image

    prompt, run, count = extract["prompt"], extract["run"], len(extract["names"])
    assert len(cw.nodes_of(prompt, "KSampler")) == 1
    renders = run.images(node_of(prompt, "SaveImage", filename_prefix="ConceptExpress/concept"))
    assert len(renders) == count + 1
    pictures = []
    for image in renders:
        assert image["type"] == "output" and image["subfolder"] == "ConceptExpress"
        assert (server.output / image["subfolder"] / image["filename"]).is_file()
        pictures.append(np.asarray(Image.open(server.output / image["subfolder"] / image["filename"]).convert("RGB")))
        assert pictures[-1].shape == (LATENT, LATENT, 3)
    (sheet_image,) = run.images(node_of(prompt, "SaveImage", filename_prefix="ConceptExpress/contact_sheet"))
    sheet_path = server.output / sheet_image["subfolder"] / sheet_image["filename"]
    sheet = np.asarray(Image.open(sheet_path).convert("RGB")).astype(int)
    (localize,) = cw.nodes_of(prompt, "LocalizeConcepts")
    overlay = next(i for i in cw.nodes_of(prompt, "PreviewImage") if prompt[i]["inputs"]["images"] == [localize, 2])
    (overlay_image,) = run.images(overlay)
    overlay_w, overlay_h = png_size(server.view(overlay_image))
    # the layout: overlay at the left, then the tiles, at most 4 a row, gaps of max(4, tile / 32)
    gap, columns = max(4, TILE // 32), min(4, count + 1)
    rows = (count + 1 + columns - 1) // columns
    grid_w, grid_h = columns * TILE + (columns - 1) * gap, rows * TILE + (rows - 1) * gap
    scale = min(grid_h / overlay_h, 2 * TILE / overlay_w)
    left = round(overlay_w * scale) + 2 * gap
    assert sheet.shape[:2] == (grid_h + 2 * gap, left + grid_w + 2 * gap)
    for k, picture in enumerate(pictures):  # tile k shows render k (bottom-right quarter: clear of the label)
        x0, y0 = left + gap + (k % columns) * (TILE + gap), gap + (k // columns) * (TILE + gap)
        tile = Image.fromarray(sheet[y0 : y0 + TILE, x0 : x0 + TILE].astype(np.uint8)).resize((LATENT, LATENT))
        quarter = slice(LATENT // 2, LATENT)
        difference = np.abs(np.asarray(tile).astype(int)[quarter, quarter] - picture[quarter, quarter].astype(int))
        others = [np.abs(np.asarray(tile).astype(int)[quarter, quarter] - p[quarter, quarter]).mean() for p in pictures]
        assert difference.mean() < 12 and difference.mean() == min(others), (k, difference.mean(), others)
    kept = artifacts_dir(tmp_path_factory) / "extract-contact-sheet.png"
    kept.write_bytes(sheet_path.read_bytes())
    print(f"contact sheet: {kept}")


def test_extract_previews_come_out(extract, server):
    prompt, run = extract["prompt"], extract["run"]
    for node in cw.nodes_of(prompt, "PreviewImage"):  # EOT map, overlay, masks, loss curve
        images = run.images(node)
        assert images, prompt[node]
        width, height = png_size(server.view(images[0]))
        assert width > 16 and height > 16


def test_second_queue_reuses_the_saved_set(extract, server):
    """With ComfyUI's cache dropped (as after a restart), the same graph runs Train Concept Tokens again, which
    finds the finished set and loads it instead of training. (Another prefix and a 256 px capture: dropping the
    cache re-runs everything before training, and this tests the reuse, not a first run.)"""
    prefix = "cx_again"
    prompt = {k: {**v, "inputs": dict(v["inputs"])} for k, v in extract["prompt"].items()}
    train = extract["train"]
    prompt[train]["inputs"]["name_prefix"] = prefix
    prompt[node_of(prompt, "CaptureAttention")]["inputs"]["resolution"] = 256
    first, _ = run_logged(server, prompt)
    assert first.status == "execution_success", describe(first)
    names = first.history["outputs"][train]["text"][0].splitlines()
    before = embedding_files(server, prefix)
    server.post("/free", {"free_memory": True})
    time.sleep(2)  # the flag is applied by the prompt worker before it takes the next prompt
    run, log = run_logged(server, prompt)
    assert run.status == "execution_success", describe(run)
    assert train in run.executed_nodes() and train not in run.cached_nodes()
    assert run.progress(train) == []  # no training step
    assert run.node_seconds(train) < first.node_seconds(train) / 2
    assert run.history["outputs"][train]["text"][0].splitlines() == names
    assert embedding_files(server, prefix) == before  # nothing rewritten
    assert_embeddings_found(log)


# -- the reuse template, as shipped ---------------------------------------------------------------------------------


def test_reuse_samples_with_the_set_the_extract_template_saved(extract, server, object_info, tmp_path_factory):
    settings = {k: FIRST_RUN[k] for k in ("KSampler", "EmptyLatentImage")}
    prompt = shipped(cw.REUSE, object_info, checkpoint=CHECKPOINT, settings=settings)
    assert prompt[node_of(prompt, "LoadConceptTokens")]["inputs"]["concept_set"] == PREFIX  # as shipped
    run, log = run_logged(server, prompt)
    assert run.status == "execution_success", describe(run)
    (save,) = cw.nodes_of(prompt, "SaveImage")
    (image,) = run.images(save)
    assert png_size(server.view(image)) == (LATENT, LATENT)
    assert_embeddings_found(log)
    # for the thumbnails (assets/make_thumbnails.py): the render and the set's numbered concepts
    artifacts = artifacts_dir(tmp_path_factory)
    (artifacts / "reuse-render.png").write_bytes(server.view(image))
    (artifacts / "reuse-concepts.png").write_bytes((server.embeddings / PREFIX / "concepts.png").read_bytes())


# -- bad inputs: clear errors -----------------------------------------------------------------------------------------


def _capture_prompt(image=cw.EXAMPLE_IMAGE, model=None):
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
                "resolution": 256,
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


def test_a_prompt_for_a_concept_that_does_not_exist_is_a_clear_error(extract, server):
    count = len(extract["names"])
    prompt = {k: {**v, "inputs": dict(v["inputs"])} for k, v in extract["prompt"].items()}
    compose = node_of(prompt, "ComposeConceptPrompt")
    prompt[compose]["inputs"].update(template=f"a photo of {{{count + 1}}}", mode="single")
    run, _ = run_logged(server, prompt)
    assert_clear_error(run, "ComposeConceptPrompt", f"{{{count + 1}}}", f"only {count} concept")


def test_retraining_into_an_existing_set_is_refused(extract, server):
    before = embedding_files(server, PREFIX)
    prompt = {k: {**v, "inputs": dict(v["inputs"])} for k, v in extract["prompt"].items()}
    prompt[extract["train"]]["inputs"]["steps"] += 1
    run, _ = run_logged(server, prompt)
    assert_clear_error(run, "TrainConceptTokens", "already exist", "nothing was written")
    assert embedding_files(server, PREFIX) == before


# -- Cancel -----------------------------------------------------------------------------------------------------------


def test_cancel_stops_training_within_a_step_and_the_next_run_resumes(extract, server):
    """The extract template as queued above with another name prefix, 3 steps and, to keep the CPU run short, a
    256 px capture (this tests stopping and resuming training, not a first run)."""
    prefix, steps = "cx_cancel", 3
    prompt = {k: {**v, "inputs": dict(v["inputs"])} for k, v in extract["prompt"].items()}
    train = extract["train"]
    prompt[train]["inputs"].update(name_prefix=prefix, steps=steps)
    prompt[node_of(prompt, "CaptureAttention")]["inputs"]["resolution"] = 256
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
