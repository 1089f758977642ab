"""EditConcepts: the user's corrections between localization and training (keep, drop, merge, split, names)."""

from __future__ import annotations

from .comfy_io import CATEGORY, image_to_comfy


class EditConcepts:
    DESCRIPTION = (
        "Corrects the concepts before training, in the numbering of Localize Concepts' overlay: keep or drop "
        "concepts, merge some into one, split a concept made of separate pieces (e.g. two dogs) into one per piece, "
        "and name them (the names become the embedding names). With every field empty the concepts pass through."
    )
    CATEGORY = CATEGORY
    FUNCTION = "edit"
    RETURN_TYPES = ("UCE_CONCEPTS", "MASK", "IMAGE")
    RETURN_NAMES = ("concepts", "masks", "overlay")
    OUTPUT_TOOLTIPS = (
        "the edited concepts, for Train Concept Tokens",
        "one mask per edited concept, at the input image's resolution",
        "the edited concepts tinted and numbered (the numbers Train Concept Tokens' names use)",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "concepts": ("UCE_CONCEPTS", {"tooltip": "from Localize Concepts"}),
                "keep": (
                    "STRING",
                    {"default": "", "tooltip": 'only these concepts, by overlay number, e.g. "1,3,4" (empty: all)'},
                ),
                "drop": ("STRING", {"default": "", "tooltip": 'leave these concepts out, e.g. "2"'}),
                "merge": (
                    "STRING",
                    {"default": "", "tooltip": 'make one concept of each group, e.g. "2+5, 3+4" (chains allowed)'},
                ),
                "split_instances": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "a concept made of separate pieces becomes one concept per piece (e.g. two dogs)",
                    },
                ),
                "split_min_area": (
                    "FLOAT",
                    {
                        "default": 0.01,
                        "min": 0.0,
                        "max": 0.5,
                        "step": 0.005,
                        "tooltip": "pieces smaller than this fraction of the image are not split off (and are left "
                        "out of a concept that is split)",
                    },
                ),
                "names": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": 'embedding names for the edited concepts in their new order, e.g. "dog, teapot, '
                        'lamp" (empty: prefix_1, prefix_2, ...)',
                    },
                ),
            }
        }

    def edit(self, concepts, keep="", drop="", merge="", split_instances=False, split_min_area=0.01, names=""):
        from ..uce_core.concept_edits import ConceptEdits, edit_concepts

        edits = ConceptEdits(keep, drop, merge, bool(split_instances), float(split_min_area), names)
        edited = edit_concepts(concepts, edits)
        return (edited, edited.masks_on_source(), image_to_comfy(edited.overlay()))
