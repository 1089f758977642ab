"""ComfyUI nodes (category "ConceptExpress").

Thin adapters between ComfyUI types and ``uce_core``. Declaring the classes imports nothing from ComfyUI; their
functions import it lazily when a ComfyUI server runs them. Node names, input names and defaults are the pack's
public interface (docs/nodes.md): keep them stable.
"""

from .capture import CaptureAttention
from .compose import ComposeConceptPrompt
from .edit import EditConcepts
from .load import LoadConceptTokens
from .localize import LocalizeConcepts
from .sheet import ConceptContactSheet
from .train import TrainConceptTokens

NODE_CLASS_MAPPINGS = {
    "CaptureAttention": CaptureAttention,
    "LocalizeConcepts": LocalizeConcepts,
    "EditConcepts": EditConcepts,
    "TrainConceptTokens": TrainConceptTokens,
    "ComposeConceptPrompt": ComposeConceptPrompt,
    "LoadConceptTokens": LoadConceptTokens,
    "ConceptContactSheet": ConceptContactSheet,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "CaptureAttention": "Capture Attention (ConceptExpress)",
    "LocalizeConcepts": "Localize Concepts (ConceptExpress)",
    "EditConcepts": "Edit Concepts (ConceptExpress)",
    "TrainConceptTokens": "Train Concept Tokens (ConceptExpress)",
    "ComposeConceptPrompt": "Compose Concept Prompt (ConceptExpress)",
    "LoadConceptTokens": "Load Concept Tokens (ConceptExpress)",
    "ConceptContactSheet": "Concept Contact Sheet (ConceptExpress)",
}
