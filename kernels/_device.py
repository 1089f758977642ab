"""Device-dependent knobs of the torch paths: how much elementwise work per step, and the accumulation dtype."""

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
