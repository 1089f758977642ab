import os
import sys

import torch

# Without a GPU the Triton kernels run under Triton's interpreter. It must be chosen before any module that
# defines @triton.jit kernels is imported. On a CUDA machine the real kernels run unless the caller set it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test helper modules (oracles, checkpoint writers) live next to the tests.
sys.path.insert(0, os.path.dirname(__file__))


import functools  # noqa: E402

import pytest  # noqa: E402


@functools.cache
def _tiny_backend(name: str):
    from concept_express.uce_core.backends.loading import load_backend

    return load_backend(name, device="cpu", dtype=torch.float32)


@pytest.fixture(params=["tiny-sd1", "tiny-sd2", "tiny-sdxl"])
def tiny_backend(request):
    """A random-weight backend of each family (built once per test session)."""
    return _tiny_backend(request.param)


@pytest.fixture
def sd1_backend():
    return _tiny_backend("tiny-sd1")


@pytest.fixture
def example_image():
    from concept_express.uce_core.cli_options import EXAMPLE_IMAGE

    return EXAMPLE_IMAGE


def hand_made_concepts(maps, boxes):
    """Concepts with rectangular masks (y0, y1, x0, x1 on the latent grid) and f_i computed as eq. 6 prescribes:
    the mean self-attention row over the mask (independent of the localization code)."""
    from concept_express.uce_core.concepts import Concepts

    h, w = maps.grid
    masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for m, (y0, y1, x0, x1) in zip(masks, boxes):
        m[y0:y1, x0:x1] = True
    features = torch.stack([maps.self_attention[m.flatten()].double().mean(0).float() for m in masks])
    return Concepts(masks, features, torch.ones(len(boxes)), maps.grid, maps.image, {"source": "hand-made"})


@functools.cache
def _maps(name):
    from concept_express.uce_core.attention import capture_attention
    from concept_express.uce_core.cli_options import EXAMPLE_IMAGE

    return capture_attention(_tiny_backend(name), EXAMPLE_IMAGE)


@pytest.fixture
def concepts_for():
    """concepts_for(model_name, count) -> (backend, Concepts) with `count` hand-made concepts on the example image."""
    boxes = [(8, 14, 1, 6), (6, 14, 8, 12), (2, 14, 14, 22), (0, 4, 0, 8), (12, 16, 0, 24), (0, 3, 10, 24)]

    def make(name="tiny-sd1", count=3):
        maps = _maps(name)
        chosen = [boxes[i % len(boxes)] for i in range(count)]
        chosen = [
            (y0, y1, (x0 + 3 * (i // len(boxes))) % 20, (x0 + 3 * (i // len(boxes))) % 20 + 4)
            if i >= len(boxes)
            else (y0, y1, x0, x1)
            for i, (y0, y1, x0, x1) in enumerate(chosen)
        ]
        return _tiny_backend(name), hand_made_concepts(maps, chosen)

    return make


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """One real ComfyUI server (COMFYUI_PATH) for all real-ComfyUI test modules: this pack, the random-weight SD1.5
    and SDXL test checkpoints, its own temporary folders. Started on first use, stopped at the end of the session."""
    from comfy_server import running_server

    with running_server(tmp_path_factory, "comfyui", checkpoints=("sd15", "sdxl")) as server:
        yield server


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With CONCEPT_EXPRESS_REQUIRE_ALL=1 (.ci/run's real-ComfyUI step) a skipped test is a failure: every test of
    that run must have what it needs (ComfyUI, chromium, comfy-cli)."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CONCEPT_EXPRESS_REQUIRE_ALL") == "1" and report.skipped:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, but this run must run every test: {reason}"


def pytest_collection_modifyitems(config, items):
    """The SDXL ComfyUI tests run first on the shared server. Known problem, not yet solved: inside a ComfyUI server
    that has already run the SD1.5 tests (about 12 GB resident, 9.8 GB left on a 24 GB machine), the SDXL extract's
    training grew the process by about 12 GB against an estimate near 8 GB, and the kernel killed the server (the
    same run in a fresh server peaks at 15.8 GB and passes). See docs/comfyui-tests.md."""
    items.sort(
        key=lambda item: 0 if item.path.name == "test_comfyui_sdxl.py" else 1
    )  # stable: the rest keep their order
