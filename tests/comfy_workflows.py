"""Test support: the shipped ComfyUI workflows (UI format) read the way ComfyUI's frontend reads them.

* ``STOCK_NODES``: the stock ComfyUI nodes the workflows use, declared here by hand in ComfyUI's own
  INPUT_TYPES / RETURN_TYPES form (checked against a real server's /object_info by the real-ComfyUI tests).
* ``widget_slots``: the positional ``widgets_values`` layout the frontend gives a node declaration, including the
  widgets the frontend adds on its own ("control_after_generate" after seed INTs, the upload button of Load Image).
* ``to_api``: UI format -> API ("prompt") format, as the frontend's graphToPrompt does it for the graphs we ship
  (muted nodes left out, notes left out, widget values named, links as [node id, output index]).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "workflows"
# The frontend titles a pack's template by its file name (and shows <name>.jpg on its card).
EXTRACT = "Extract every concept from one image"
REUSE = "Reuse extracted concepts in a new prompt"
MASKS = "Extract concepts painted in the mask editor"
WORKFLOW_NAMES = (EXTRACT, REUSE, MASKS)
EXAMPLE_IMAGE = "concept-express-example.png"  # what the templates' Load Image selects (nodes/example.py)

# Frontend-only node types: never sent to the server (graphToPrompt skips virtual nodes).
FRONTEND_ONLY = {"Note", "MarkdownNote"}

MODE_ALWAYS, MODE_NEVER = 0, 2

CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
# A combo whose choices are files on the user's machine (any name is a valid value in a shipped workflow).
ANY_FILE = "ANY_FILE"

# A few stable sampler / scheduler names; a shipped workflow must use one of these. The real-ComfyUI tests check
# that the server offers them all.
SAMPLERS = ["euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "ddim", "uni_pc"]
SCHEDULERS = ["normal", "karras", "exponential", "simple", "sgm_uniform"]

STOCK_NODES = {
    "CheckpointLoaderSimple": {
        "input": {"required": {"ckpt_name": (ANY_FILE, {})}},
        "output": ("MODEL", "CLIP", "VAE"),
    },
    "LoadImage": {
        "input": {"required": {"image": (ANY_FILE, {"image_upload": True})}},
        "output": ("IMAGE", "MASK"),
    },
    "PreviewImage": {"input": {"required": {"images": ("IMAGE", {})}}, "output": ()},
    "SaveImage": {
        "input": {"required": {"images": ("IMAGE", {}), "filename_prefix": ("STRING", {"default": "ComfyUI"})}},
        "output": (),
    },
    "MaskToImage": {"input": {"required": {"mask": ("MASK", {})}}, "output": ("IMAGE",)},
    "CLIPTextEncode": {
        "input": {"required": {"text": ("STRING", {"multiline": True, "dynamicPrompts": True}), "clip": ("CLIP", {})}},
        "output": ("CONDITIONING",),
    },
    "EmptyLatentImage": {
        "input": {
            "required": {
                "width": ("INT", {"default": 512, "min": 16, "max": 16384, "step": 8}),
                "height": ("INT", {"default": 512, "min": 16, "max": 16384, "step": 8}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
            }
        },
        "output": ("LATENT",),
    },
    "KSampler": {
        "input": {
            "required": {
                "model": ("MODEL", {}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0}),
                "sampler_name": (SAMPLERS, {}),
                "scheduler": (SCHEDULERS, {}),
                "positive": ("CONDITIONING", {}),
                "negative": ("CONDITIONING", {}),
                "latent_image": ("LATENT", {}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0}),
            }
        },
        "output": ("LATENT",),
    },
    "VAEDecode": {"input": {"required": {"samples": ("LATENT", {}), "vae": ("VAE", {})}}, "output": ("IMAGE",)},
}

# Outputs that newer ComfyUI versions added to stock nodes (declared above as ComfyUI 0.8.0 has them). ComfyUI 0.33.0
# gives Save Image and Preview Image a pass-through IMAGE output ("images"); a workflow whose nodes list no such output
# (saved by an older frontend, like ours) loads and runs on both.
ADDED_OUTPUTS = {"SaveImage": ("IMAGE",), "PreviewImage": ("IMAGE",)}

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


# Our combo inputs whose choices are what is saved on the user's machine.
DYNAMIC_CHOICES = {("LoadConceptTokens", "concept_set")}


def our_declarations() -> dict[str, dict]:
    """Our nodes in the same form as STOCK_NODES, straight from the node classes."""
    from concept_express.nodes import NODE_CLASS_MAPPINGS

    out = {}
    for name, cls in NODE_CLASS_MAPPINGS.items():
        inputs = {section: dict(specs) for section, specs in cls.INPUT_TYPES().items()}
        for section in inputs.values():
            for input_name, spec in section.items():
                if (name, input_name) in DYNAMIC_CHOICES:
                    section[input_name] = (ANY_FILE, spec[1])
        out[name] = {"input": inputs, "output": tuple(cls.RETURN_TYPES)}
    return out


def declarations_from_object_info(object_info: dict, names) -> dict[str, dict]:
    """The same form, from a real server's /object_info (lists become tuples; V3 "COMBO" keeps its options)."""
    out = {}
    for name in names:
        info = object_info[name]
        inputs = {}
        for section in ("required", "optional"):
            if section in info["input"]:
                inputs[section] = {k: (v[0], v[1] if len(v) > 1 else {}) for k, v in info["input"][section].items()}
        out[name] = {"input": inputs, "output": tuple(info["output"])}
    return out


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))


@dataclass
class Slot:
    """One entry of a node's widgets_values."""

    input: str  # the input it belongs to
    kind: str  # "value", "control_after_generate" or "upload"
    spec: tuple | None  # (type or choices, options) for "value"


def input_kind(spec) -> str:
    kind = spec[0]
    if isinstance(kind, (list, tuple)) or kind == ANY_FILE:
        return "COMBO"
    return kind


def is_widget(spec) -> bool:
    options = spec[1] if len(spec) > 1 else {}
    return input_kind(spec) in WIDGET_TYPES and not options.get("forceInput")


def declared_inputs(declaration: dict) -> list[tuple[str, tuple]]:
    """(name, spec) for every required then optional input, in declaration order (hidden ones left out)."""
    sections = declaration["input"]
    return [(n, s) for section in ("required", "optional") for n, s in sections.get(section, {}).items()]


def widget_slots(declaration: dict) -> list[Slot]:
    """The widgets_values layout the frontend uses for a node of this declaration."""
    slots = []
    for name, spec in declared_inputs(declaration):
        if not is_widget(spec):
            continue
        options = spec[1] if len(spec) > 1 else {}
        slots.append(Slot(name, "value", spec))
        if input_kind(spec) == "INT" and options.get("control_after_generate", name in ("seed", "noise_seed")):
            slots.append(Slot(name, "control_after_generate", None))
        if options.get("image_upload"):
            slots.append(Slot(name, "upload", None))
    return slots


def check_value(spec, value) -> str | None:
    """Why ``value`` is not a valid value for an input declared as ``spec`` (None when it is)."""
    kind, options = input_kind(spec), (spec[1] if len(spec) > 1 else {})
    if kind == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{value!r} is not an INT"
    elif kind == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{value!r} is not a FLOAT"
    elif kind == "BOOLEAN":
        if not isinstance(value, bool):
            return f"{value!r} is not a BOOLEAN"
    elif kind == "STRING":
        if not isinstance(value, str):
            return f"{value!r} is not a STRING"
    elif kind == "COMBO":
        if spec[0] == ANY_FILE:
            return None if isinstance(value, str) and value else f"{value!r} is not a file name"
        if value not in spec[0]:
            return f"{value!r} is not one of {list(spec[0])}"
    if kind in ("INT", "FLOAT"):
        if "min" in options and value < options["min"]:
            return f"{value} < min {options['min']}"
        if "max" in options and value > options["max"]:
            return f"{value} > max {options['max']}"
    return None


def link_table(workflow: dict) -> dict[int, list]:
    return {link[0]: link for link in workflow["links"]}


def to_api(workflow: dict, declarations: dict[str, dict]) -> dict:
    """UI format -> API format for the node modes and features our workflows use."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = link_table(workflow)
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", MODE_ALWAYS) == MODE_NEVER:
            continue
        if node.get("mode", MODE_ALWAYS) != MODE_ALWAYS:
            # bypassed nodes would need ComfyUI's pass-through rewiring; the shipped workflows have none
            # (test_workflows checks that they use only enabled and muted nodes)
            raise ValueError(f"node {node['id']} has mode {node['mode']}: only enabled (0) and muted (2) nodes convert")
        declaration = declarations[node["type"]]
        values = dict(zip([(s.input, s.kind) for s in widget_slots(declaration)], node.get("widgets_values") or []))
        linked = {i["name"]: i.get("link") for i in node.get("inputs", []) if i.get("link") is not None}
        inputs = {}
        for name, _spec in declared_inputs(declaration):
            if name in linked:
                _, source, slot, *_ = links[linked[name]]
                if nodes[source].get("mode", MODE_ALWAYS) == MODE_NEVER:
                    continue
                inputs[name] = [str(source), slot]
            elif (name, "value") in values:
                inputs[name] = values[(name, "value")]
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": node["type"]}
    return prompt


def nodes_of(prompt: dict, class_type: str) -> list[str]:
    return sorted((k for k, v in prompt.items() if v["class_type"] == class_type), key=int)


def set_inputs(prompt: dict, class_type: str, **values) -> None:
    """Override widget values of every node of ``class_type`` in an API prompt."""
    ids = nodes_of(prompt, class_type)
    assert ids, f"no {class_type} in the prompt"
    for i in ids:
        prompt[i]["inputs"].update(values)


def downstream(workflow: dict, start: int) -> list[int]:
    """``start`` and every node downstream of it."""
    found, frontier = [start], [start]
    while frontier:
        current = frontier.pop()
        for _, source, _, target, _, _ in workflow["links"]:
            if source == current and target not in found:
                found.append(target)
                frontier.append(target)
    return found
