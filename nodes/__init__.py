"""ComfyUI nodes (category "ConceptExpress").

Thin adapters between ComfyUI types and ``uce_core``. Declaring the classes imports nothing from ComfyUI; their
functions import it lazily when a ComfyUI server runs them.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
