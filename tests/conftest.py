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


@functools.lru_cache(maxsize=None)
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
    from concept_express.uce_core.cli import EXAMPLE_IMAGE

    return EXAMPLE_IMAGE
