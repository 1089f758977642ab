"""What the nodes share: conversions between ComfyUI values and the core's, ComfyUI's folders, progress and
cancellation. ComfyUI modules are imported inside the functions, so declaring the nodes needs no ComfyUI."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CATEGORY = "ConceptExpress"
CHECKPOINT_FOLDER = "concept-express-checkpoints"


def image_from_comfy(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, C) float 0..1 -> the first image as (H, W, C) float (what the core's loader takes)."""
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        from ..uce_core.errors import ConceptExpressError

        raise ConceptExpressError(f"expected an IMAGE (batch, height, width, channels), got shape {tuple(image.shape)}")
    return image[0].detach().cpu().float().clone()


def image_to_comfy(picture: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
    """A PIL image or an (H, W, 3) uint8 array/tensor -> ComfyUI IMAGE (1, H, W, 3) float 0..1."""
    if isinstance(picture, Image.Image):
        picture = np.asarray(picture.convert("RGB"))
    array = torch.as_tensor(np.asarray(picture)).float()
    if array.max() > 1.0:
        array = array / 255.0
    return array[None].clamp(0, 1)


def embeddings_root() -> Path:
    """The folder new embeddings go to: the first of ComfyUI's embedding folders (models/embeddings by default)."""
    import folder_paths

    return Path(folder_paths.get_folder_paths("embeddings")[0])


def embedding_folders() -> list[Path]:
    import folder_paths

    return [Path(p) for p in folder_paths.get_folder_paths("embeddings")]


def checkpoint_path(prefix: str) -> Path:
    """Where a training run of ``prefix`` keeps its resumable checkpoint (ComfyUI's output folder)."""
    import folder_paths

    return Path(folder_paths.get_output_directory()) / CHECKPOINT_FOLDER / f"{prefix}.safetensors"


class Progress:
    """ComfyUI's progress bar for a long loop; its updates also raise ComfyUI's interrupt when Cancel was pressed."""

    def __init__(self, total: int):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(total)

    def __call__(self, step: int, total: int, losses: dict) -> None:
        if "note" in losses:  # e.g. the micro-batch chosen for the memory there is
            logging.info("[ConceptExpress] training: %s", losses["note"])
            return
        self.bar.update_absolute(step, total)


def interrupted() -> bool:
    import comfy.model_management

    return comfy.model_management.processing_interrupted()


def raise_interrupt() -> None:
    """Stop the way ComfyUI expects when Cancel was pressed (the run ends as 'interrupted', not as an error)."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()
    raise comfy.model_management.InterruptProcessingException()
