"""LocalizeConcepts: stage 2 (no model needed), optionally with the user's masks as concepts."""

from __future__ import annotations

from .comfy_io import CATEGORY, image_to_comfy

MASK_MODES = {"masks only": "replace", "masks + found": "add"}


class LocalizeConcepts:
    DESCRIPTION = (
        "Finds the concepts in captured attention: FINCH clustering under symmetric KL, end-of-text "
        "filtering of background, merging of touching regions. The number of concepts is found automatically. "
        "Optionally takes masks (any MASK: Load Image's mask editor, a segmentation node, ...) or a label image "
        "(one colour per concept, black = none) as concepts, instead of or in addition to the ones it finds."
    )
    CATEGORY = CATEGORY
    FUNCTION = "localize"
    RETURN_TYPES = ("UCE_CONCEPTS", "MASK", "IMAGE")
    RETURN_NAMES = ("concepts", "masks", "overlay")
    OUTPUT_TOOLTIPS = (
        "the concepts, for Edit Concepts or Train Concept Tokens",
        "one mask per concept, at the input image's resolution",
        "the concepts tinted and numbered over the image",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "attention": ("UCE_ATTENTION", {"tooltip": "from Capture Attention"}),
                "n_max": (
                    "INT",
                    {
                        "default": 10,
                        "min": 1,
                        "max": 64,
                        "tooltip": "upper limit N_max that picks the clustering level (the paper's 10)",
                    },
                ),
                "delta": (
                    ["reference", "paper"],
                    {
                        "default": "reference",
                        "tooltip": "merge threshold: the official code's definition or the paper's reading (more concepts)",
                    },
                ),
                "min_area": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 0.5,
                        "step": 0.005,
                        "tooltip": "drop concepts smaller than this fraction of the image (0 = off, as the official code)",
                    },
                ),
            },
            "optional": {
                "masks": (
                    "MASK",
                    {
                        "tooltip": "concepts given as masks, one per concept (a batch), of this image at any "
                        "resolution; a grid cell belongs to a mask when at least half of it is covered"
                    },
                ),
                "label_image": (
                    "IMAGE",
                    {"tooltip": "concepts given as a label image: each colour one concept, black for none"},
                ),
                "mode": (
                    list(MASK_MODES),
                    {
                        "default": "masks only",
                        "tooltip": "with masks or a label image: use only them, or add them to the concepts found "
                        "(a mask covering more than half of a found concept replaces it)",
                    },
                ),
            },
        }

    def localize(
        self, attention, n_max=10, delta="reference", min_area=0.0, masks=None, label_image=None, mode="masks only"
    ):
        import torch

        from ..uce_core.concept_edits import concepts_from_masks, label_image_masks
        from ..uce_core.errors import ConceptExpressError
        from ..uce_core.localize import LocalizeSettings, localize_concepts

        given = []
        if masks is not None:
            given += list((masks[None] if masks.dim() == 2 else masks).float().cpu())
        if label_image is not None:
            given += list(label_image_masks(label_image[0].float().cpu()))
        if given and len({tuple(m.shape) for m in given}) > 1:
            raise ConceptExpressError(
                "the masks and the label image have different sizes; give them at the same size (the image's)."
            )
        if mode not in MASK_MODES:
            raise ConceptExpressError(f"mode must be one of {list(MASK_MODES)}, got {mode!r}")
        settings = LocalizeSettings(n_max=n_max, delta=delta, min_area=min_area)
        if not given:
            concepts = localize_concepts(attention, settings)
        elif MASK_MODES[mode] == "replace":
            concepts = concepts_from_masks(attention, torch.stack(given))
        else:
            concepts = concepts_from_masks(attention, torch.stack(given), "add", localize_concepts(attention, settings))
        return (concepts, concepts.masks_on_source(), image_to_comfy(concepts.overlay()))
