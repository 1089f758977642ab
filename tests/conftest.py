import os

import torch

# Without a GPU the Triton kernels run under Triton's interpreter. It must be chosen before any module that
# defines @triton.jit kernels is imported. On a CUDA machine the real kernels run unless the caller set it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
