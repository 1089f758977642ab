"""LoadConceptTokens: reuse a concept set trained earlier, without retraining."""

from __future__ import annotations

from .comfy_io import CATEGORY, embedding_folders


def concept_sets() -> dict[str, object]:
    """Saved concept sets: every embeddings subfolder with a ConceptExpress manifest, by relative name."""
    from ..uce_core.export import MANIFEST

    found = {}
    for root in embedding_folders():
        if root.is_dir():
            for manifest in sorted(root.glob(f"**/{MANIFEST}")):
                found.setdefault(manifest.parent.relative_to(root).as_posix(), manifest.parent)
    return found


class LoadConceptTokens:
    DESCRIPTION = "Loads a concept set saved by Train Concept Tokens (from the embeddings folder) to use it again."
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("UCE_TOKENS", "STRING")
    RETURN_NAMES = ("tokens", "embedding_names")
    OUTPUT_TOOLTIPS = ("the concept set, for Compose Concept Prompt", "its embedding names, one per line")

    @classmethod
    def INPUT_TYPES(cls):
        try:
            choices = sorted(concept_sets()) or ["(none saved yet)"]
        except Exception:  # declaring the node must never fail
            choices = ["(none saved yet)"]
        return {
            "required": {
                "concept_set": (
                    choices,
                    {"tooltip": "a folder under models/embeddings written by Train Concept Tokens"},
                )
            }
        }

    @classmethod
    def IS_CHANGED(cls, concept_set):
        from ..uce_core.export import MANIFEST

        folder = concept_sets().get(concept_set)
        return (folder / MANIFEST).stat().st_mtime_ns if folder is not None else "missing"

    def load(self, concept_set):
        from ..uce_core.errors import ConceptExpressError
        from ..uce_core.export import load_exported

        folder = concept_sets().get(concept_set)
        if folder is None:
            raise ConceptExpressError(
                f"no saved concept set {concept_set!r}; train one with Train Concept Tokens first."
            )
        tokens = load_exported(folder)
        names = [f"{concept_set}/{n}" for n in tokens.names]
        tokens.info["embedding_names"] = names
        return (tokens, "\n".join(names))
