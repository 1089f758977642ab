"""The ConceptExpress method: attention capture and aggregation, concept localization, token learning,
export and evaluation, over a small model-backend protocol (diffusers or ComfyUI)."""

from .errors import ConceptExpressError

__all__ = ["ConceptExpressError"]
