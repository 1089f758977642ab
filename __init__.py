"""ConceptExpress for ComfyUI.

This folder is two things at once:

* a ComfyUI node pack: ComfyUI imports this file by path from ``custom_nodes/<folder>`` and reads
  ``NODE_CLASS_MAPPINGS``; and
* the Python package ``concept_express`` when pip-installed (``concept_express.uce_core`` is the method,
  ``concept_express.uce_kernels`` the tensor kernels, ``concept_express.nodes`` the ComfyUI nodes).

Importing it never requires ComfyUI: the node classes import ComfyUI lazily, inside the functions that run
in a ComfyUI server.
"""

__version__ = "0.1.0"

if __package__:  # imported as a package: by ComfyUI, or as concept_express
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402  (no ComfyUI import happens here)
    from .nodes.example import install_example_image  # noqa: E402

    install_example_image()  # inside ComfyUI: the templates' example image into its input folder (never replaces one)
# else: pytest imports this file on its own (no parent package) when the checkout's folder name is not a Python
# name, e.g. a clone named comfyui-concept-express; there is nothing to export then.

WEB_DIRECTORY = None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]
