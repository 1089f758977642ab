"""Pure tensor maths for the localization step: symmetric-KL first neighbours and FINCH merging.

Each op is a Triton kernel for CUDA tensors, an exact torch path for CPU tensors, and one dispatch function.
Nothing here knows about diffusion models. Importing this package does not import triton (see ``_dispatch``).
See docs/kernels.md for the floor, the modes and the numerics.
"""

import os

import torch

# Without a GPU the Triton kernels run under Triton's interpreter. It must be chosen before any module that
# defines @triton.jit kernels is imported. On a CUDA machine the real kernels run unless the caller set it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .distributions import FLOOR, prepare_distributions  # noqa: E402
from .finch_ops import cluster_means, connected_components, first_neighbour_clusters  # noqa: E402
from .sym_kl import sym_kl_distances, sym_kl_first_neighbours, sym_kl_pair_distances  # noqa: E402

__all__ = [
    "FLOOR",
    "prepare_distributions",
    "sym_kl_first_neighbours",
    "sym_kl_pair_distances",
    "sym_kl_distances",
    "connected_components",
    "first_neighbour_clusters",
    "cluster_means",
]
