"""Test support for the real-ComfyUI tests: the shipped workflows as API prompts with small settings, and checks
on what the server reports."""

from __future__ import annotations

import io
import time

import comfy_workflows as cw
from comfy_server import PACK_NAME

RUN_TIMEOUT = 3600  # one queue; the extract template at 512 px on a busy 2-core CPU took over 25 min
MISSING = "does not exist"  # ComfyUI's log line for an embedding it cannot find: "warning, embedding:X does not exist"
SHAPE_MISMATCH = "shape mismatch"  # ... and for one whose width does not fit the text encoder


# What the real-ComfyUI tests change in a template to run it on a CPU: the step counts and the latent size (and the
# checkpoint). Everything else (the example image, capture resolution, n_max, split tokens, prompts) is as shipped.
FIRST_RUN = {
    "TrainConceptTokens": {"steps": 2, "merge_step": 1},
    "KSampler": {"steps": 2},
    "EmptyLatentImage": {"width": 128, "height": 128},
}


def shipped(name, object_info, *, checkpoint, settings=None):
    """A shipped template in API format (converted with the server's /object_info, the way the frontend's Run
    button converts it) with ``checkpoint`` picked and ``settings`` ({class_type: {input: value}}) applied to every
    node of that type."""
    workflow = cw.load(name)
    types = {n["type"] for n in workflow["nodes"]} - cw.FRONTEND_ONLY
    prompt = cw.to_api(workflow, cw.declarations_from_object_info(object_info, types))
    cw.set_inputs(prompt, "CheckpointLoaderSimple", ckpt_name=checkpoint)
    for class_type, values in (settings or {}).items():
        assert cw.nodes_of(prompt, class_type), f"{name} has no {class_type}"
        cw.set_inputs(prompt, class_type, **values)
    return prompt


def run_logged(server, prompt, **kwargs):
    """Queue ``prompt``; returns the run and the server log written meanwhile."""
    start = len(server.log())
    run = server.run(prompt, timeout=RUN_TIMEOUT, **kwargs)
    time.sleep(0.5)  # let the log catch up with the websocket
    return run, server.log()[start:]


def describe(run) -> str:
    if run.status == "execution_error":
        e = run.error()
        return f"{e['node_type']}: {e['exception_type']}: {e['exception_message']}\n{''.join(e['traceback'][-4:])}"
    return run.status


def assert_clear_error(run, node_type, *phrases):
    """Our error, as ComfyUI reports it: raised by our node as ConceptExpressError, with a message a user can act
    on, from our own code (not from deep inside torch or ComfyUI)."""
    assert run.status == "execution_error", describe(run)
    error = run.error()
    assert error["node_type"] == node_type, describe(run)
    assert error["exception_type"].split(".")[-1] == "ConceptExpressError", describe(run)
    message = error["exception_message"]
    for phrase in phrases:
        assert phrase in message, message
    assert "Traceback" not in message and len(message) < 700, message
    assert PACK_NAME in error["traceback"][-1], error["traceback"][-1]  # raised by our code
    status = run.history["status"]
    assert status["status_str"] == "error" and not status["completed"]


def assert_embeddings_found(log):
    assert "Prompt executed" in log
    bad = [line for line in log.splitlines() if MISSING in line or SHAPE_MISMATCH in line]
    assert not bad, bad


def png_size(data: bytes):
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.size


def embedding_files(server, prefix):
    folder = server.embeddings / prefix
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} if folder.is_dir() else {}
