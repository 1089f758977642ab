"""Pure tensor maths for the localization step: symmetric-KL first neighbours and FINCH merging.

Each op is a Triton kernel for CUDA tensors, an exact torch path for CPU tensors, and one dispatch function.
Nothing here knows about diffusion models.
"""
