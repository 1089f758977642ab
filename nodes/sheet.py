"""ConceptContactSheet: the renders of a per-concept sampling branch on one labelled image."""

from __future__ import annotations

from .comfy_io import CATEGORY, image_to_comfy


class ConceptContactSheet:
    DESCRIPTION = (
        "Puts every render of a branch that runs once per concept (Compose Concept Prompt in mode 'each "
        "concept') on one image: each render under its concept's number, in the colour Localize Concepts gives "
        "that concept, with the concepts' overlay beside them."
    )
    CATEGORY = CATEGORY
    FUNCTION = "sheet"
    INPUT_IS_LIST = True  # all renders of the branch at once (ComfyUI collects the list)
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("sheet",)
    OUTPUT_TOOLTIPS = ("the labelled contact sheet",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "the renders (one per prompt of Compose Concept Prompt)"}),
            },
            "optional": {
                "labels": (
                    "STRING",
                    {"forceInput": True, "tooltip": "the labels output of Compose Concept Prompt (1, 2, ..., all)"},
                ),
                "overlay": ("IMAGE", {"tooltip": "the overlay output of Localize Concepts"}),
                "tile": (
                    "INT",
                    {"default": 256, "min": 64, "max": 1024, "step": 32, "tooltip": "size of each render, pixels"},
                ),
            },
        }

    def sheet(self, images, labels=None, overlay=None, tile=None):
        from ..uce_core.errors import ConceptExpressError
        from ..uce_core.previews import contact_sheet

        tiles, names = sheet_tiles(images, labels)
        if len(tiles) > 256:
            raise ConceptExpressError(f"{len(tiles)} renders: a contact sheet takes at most 256.")
        picture = overlay[0][0] if overlay else None
        result = contact_sheet(
            [_to_pil(t) for t in tiles],
            names,
            overlay=_to_pil(picture) if picture is not None else None,
            tile=(tile or [256])[0],
        )
        return (image_to_comfy(result),)


def sheet_tiles(images: list, labels: list[str] | None) -> tuple[list, list[str]]:
    """One tile per image: the list items (each an IMAGE batch) flattened, each labelled with its item's label (a
    batch of several gets "label.1", "label.2", ...); without labels the tiles are numbered 1, 2, ..."""
    from ..uce_core.errors import ConceptExpressError

    if labels is not None and len(labels) != len(images):
        raise ConceptExpressError(
            f"{len(labels)} labels for {len(images)} renders: connect the labels of the Compose Concept Prompt "
            "that feeds these renders."
        )
    tiles, names = [], []
    for k, batch in enumerate(images):
        label = str(labels[k]) if labels is not None else str(k + 1)
        if batch.ndim != 4:
            raise ConceptExpressError(
                f"expected IMAGE batches (batch, height, width, channels), got {tuple(batch.shape)}"
            )
        for j in range(batch.shape[0]):
            tiles.append(batch[j])
            names.append(label if batch.shape[0] == 1 else f"{label}.{j + 1}")
    return tiles, names


def _to_pil(image):
    import numpy as np
    from PIL import Image

    array = (image.detach().cpu().float().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    if array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array[..., :3] if array.ndim == 3 else array)
