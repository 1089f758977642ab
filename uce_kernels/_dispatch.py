"""Which implementation runs: Triton for CUDA tensors when triton imports, torch otherwise.

triton is imported lazily, the first time a caller could use it, so that importing ``concept_express.uce_kernels`` works
where there is no triton (Windows, macOS) and costs nothing where there is.
"""

import functools
import importlib

import torch

BACKENDS = ("auto", "triton", "torch")
PRECISIONS = ("ieee", "tf32x3", "tf32")  # tl.dot input_precision values the Triton kernels accept


@functools.cache
def triton_available() -> bool:
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:  # ImportError, or a broken install raising something else at import
        return False
    return True


def auto_backend(tensor: torch.Tensor) -> str:
    """What "auto" picks: Triton for a CUDA tensor when triton imports, torch otherwise. (The op then runs Triton only
    once it has passed its self-check on the device: ``_guard``.) Tests replace this to force the Triton choice."""
    return "triton" if tensor.is_cuda and triton_available() else "torch"


def choose_backend(backend: str, tensor: torch.Tensor) -> str:
    """Resolve ``backend`` ("auto" | "triton" | "torch") for an op whose data lives on ``tensor.device``.

    "auto": ``auto_backend``. "triton" on CPU tensors only works under the Triton interpreter (TRITON_INTERPRET=1,
    which ``concept_express.uce_kernels`` sets when there is no CUDA).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' was requested but triton cannot be imported")
        return "triton"
    return auto_backend(tensor)
