"""LocalizeConcepts: stage 2 (no model needed)."""

from __future__ import annotations

from .comfy_io import CATEGORY, image_to_comfy


class LocalizeConcepts:
    DESCRIPTION = (
        "Finds the concepts in captured attention: FINCH clustering under symmetric KL, end-of-text "
        "filtering of background, merging of touching regions. The number of concepts is found automatically."
    )
    CATEGORY = CATEGORY
    FUNCTION = "localize"
    RETURN_TYPES = ("UCE_CONCEPTS", "MASK", "IMAGE")
    RETURN_NAMES = ("concepts", "masks", "overlay")
    OUTPUT_TOOLTIPS = (
        "the concepts, for Train Concept Tokens",
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
            }
        }

    def localize(self, attention, n_max=10, delta="reference", min_area=0.0):
        from ..uce_core.localize import LocalizeSettings, localize_concepts

        concepts = localize_concepts(attention, LocalizeSettings(n_max=n_max, delta=delta, min_area=min_area))
        return (concepts, concepts.masks_on_source(), image_to_comfy(concepts.overlay()))
