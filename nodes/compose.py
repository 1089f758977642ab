"""ComposeConceptPrompt: a prompt that uses learned concepts, as text and (with a CLIP) as conditioning."""

from __future__ import annotations

import re

from .comfy_io import CATEGORY

_PLACEHOLDER = re.compile(r"\{(\d+|all)\}")
EACH = "{each}"

# Compose Concept Prompt's modes (stored in saved workflows: keep the values).
SINGLE, EACH_CONCEPT, EACH_AND_ALL = "single", "each concept", "each concept + all"
MODES = [SINGLE, EACH_CONCEPT, EACH_AND_ALL]


def compose_text(template: str, names: list[str], joiner: str = " and ") -> str:
    """Replace {1}, {2}, ... and {all} with ``embedding:<name>`` (ComfyUI's syntax; the embedding word must start
    the prompt or follow whitespace or an opening bracket, so a space is added where it would not)."""
    from ..uce_core.errors import ConceptExpressError

    if not names:
        raise ConceptExpressError(
            "no concept names: connect tokens from Train Concept Tokens or Load Concept Tokens, "
            "or give the embedding names"
        )

    def word(i):
        if not 0 <= i < len(names):
            raise ConceptExpressError(f"{{{i + 1}}} in the template, but there are only {len(names)} concepts.")
        return f"embedding:{names[i]}"

    pieces, position = [], 0
    for match in _PLACEHOLDER.finditer(template):
        before = template[position : match.start()]
        if before and not before[-1].isspace() and before[-1] not in "([":
            before += " "
        pieces.append(before)
        key = match.group(1)
        indices = range(len(names)) if key == "all" else [int(key) - 1]
        pieces.append(joiner.join(word(i) for i in indices))
        position = match.end()
        after = template[position : position + 1]
        if after and not after.isspace() and after not in ",.;:)]":
            pieces.append(" ")
    pieces.append(template[position:])
    text = "".join(pieces)
    if "embedding:" not in text:
        raise ConceptExpressError(
            "the template has no concept in it; write {1}, {2}, ... or {all} where a concept goes."
        )
    return text


def compose_prompts(template: str, names: list[str], mode: str = SINGLE) -> list[tuple[str, str]]:
    """(label, prompt) pairs. ``single``: the template composed once, labelled with the concepts it uses. ``each
    concept``: one prompt per concept, ``{each}`` standing for concept 1, then 2, ...; labelled "1", "2", ...
    ``each concept + all``: those, then one with ``{each}`` standing for all concepts, labelled "all"."""
    from ..uce_core.errors import ConceptExpressError

    if mode not in MODES:
        raise ConceptExpressError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}.")
    if mode == SINGLE:
        if EACH in template:
            raise ConceptExpressError(
                f"{EACH} stands for each concept in turn: set mode to '{EACH_CONCEPT}' (one prompt per concept), "
                "or write {1}, {2}, ... or {all}."
            )
        text = compose_text(template, names)
        used = [m.group(1) for m in _PLACEHOLDER.finditer(template)]
        label = "all" if "all" in used else " + ".join(dict.fromkeys(used))
        return [(label, text)]
    if EACH not in template:
        raise ConceptExpressError(
            f"mode '{mode}' makes one prompt per concept: write {EACH} in the template where each concept goes "
            '(e.g. "a photo of {each}").'
        )
    if not names:
        compose_text(template, names)  # the error for no names
    pairs = [(str(i + 1), compose_text(template.replace(EACH, f"{{{i + 1}}}"), names)) for i in range(len(names))]
    if mode == EACH_AND_ALL:
        pairs.append(("all", compose_text(template.replace(EACH, "{all}"), names)))
    return pairs


class ComposeConceptPrompt:
    DESCRIPTION = (
        'Writes a prompt with learned concepts: "a photo of {1} and {2} in the snow" becomes '
        '"a photo of embedding:concept/concept_1 and embedding:concept/concept_2 in the snow". With a CLIP '
        "connected it also encodes it, like CLIP Text Encode. In mode 'each concept' it writes one prompt per "
        'concept ("a photo of {each}"), so the nodes after it run once per concept, from one queue; '
        "'each concept + all' adds one prompt with all of them."
    )
    CATEGORY = CATEGORY
    FUNCTION = "compose"
    RETURN_TYPES = ("STRING", "CONDITIONING", "STRING")
    RETURN_NAMES = ("prompt", "conditioning", "labels")
    # lists: the nodes downstream run once per prompt (one item in mode "single")
    OUTPUT_IS_LIST = (True, True, True)
    OUTPUT_TOOLTIPS = (
        "the prompt(s) for a CLIP Text Encode",
        "the encoded prompt(s) (only when a CLIP is connected)",
        'which concepts each prompt shows ("1", "2", ..., "all"), for Concept Contact Sheet',
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "template": (
                    "STRING",
                    {
                        "default": "a photo of {1}",
                        "multiline": True,
                        "tooltip": "{1}, {2}, ... stand for the concepts, {all} for all of them, "
                        "{each} for each concept in turn (modes 'each concept')",
                    },
                ),
            },
            "optional": {
                "tokens": ("UCE_TOKENS", {"tooltip": "from Train Concept Tokens or Load Concept Tokens"}),
                "embedding_names": (
                    "STRING",
                    {"forceInput": True, "tooltip": "embedding names, one per line (instead of tokens)"},
                ),
                "clip": ("CLIP", {"tooltip": "connect to also get the conditioning"}),
                "mode": (
                    MODES,
                    {
                        "default": SINGLE,
                        "tooltip": "single: one prompt. each concept: one prompt per concept ({each}), the nodes "
                        "after this one run once per concept. each concept + all: also one with all concepts",
                    },
                ),
            },
        }

    def compose(self, template, tokens=None, embedding_names=None, clip=None, mode=SINGLE):
        if tokens is not None:
            names = list(tokens.info.get("embedding_names") or tokens.names)
        else:
            names = [n.strip() for n in (embedding_names or "").replace(",", "\n").splitlines() if n.strip()]
        pairs = compose_prompts(template, names, mode)
        texts = [text for _, text in pairs]
        conditionings = [None] * len(texts)
        if clip is not None:
            conditionings = [clip.encode_from_tokens_scheduled(clip.tokenize(text)) for text in texts]
        return (texts, conditionings, [label for label, _ in pairs])
