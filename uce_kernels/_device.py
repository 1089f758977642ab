"""Device-dependent knobs of the torch paths: how much elementwise work per step, the accumulation dtype, and full
float32 matrix products whatever the process's TF32 setting."""

import contextlib

import torch

CPU_CHUNK_ELEMENTS = 1 << 20  # 4 MiB of float32 per temporary: stays in cache, keeps peak memory flat
CUDA_CHUNK_ELEMENTS = 1 << 24  # 64 MiB: few kernel launches (each costs microseconds on a GPU)


def chunk_elements(device: torch.device) -> int:
    return CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CPU_CHUNK_ELEMENTS


def row_chunks(rows: int, width: int, device: torch.device):
    """Slices over ``rows`` so that a chunk of rows x width holds about chunk_elements(device) entries."""
    step = max(1, chunk_elements(device) // max(width, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64 for sums that must stay accurate; Apple's MPS has no float64, so float32 there."""
    return torch.float32 if device.type == "mps" else torch.float64


@contextlib.contextmanager
def cuda_matmul_precision(tf32: bool):
    """CUDA float32 matmuls in TF32 (tf32=True) or full float32 inside the block, the process's setting restored after.

    The torch path of the first-neighbour search is exact only with full float32 products, and a host program
    (ComfyUI, a custom node) may have allowed TF32 for the whole process. torch >= 2.9 has a new precision API and
    raises when a process mixes it with the legacy ``allow_tf32`` flag, so this uses the new one where it exists and
    the legacy flag only on older torch. Another thread's CUDA matmuls during the block run at the same precision.
    """
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        name, value = "fp32_precision", ("tf32" if tf32 else "ieee")
    else:
        name, value = "allow_tf32", tf32
    previous = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, previous)
