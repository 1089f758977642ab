"""ComposeConceptPrompt: a prompt that uses learned concepts, as text and (with a CLIP) as conditioning."""

from __future__ import annotations

import re

from .comfy_io import CATEGORY

_PLACEHOLDER = re.compile(r"\{(\d+|all)\}")


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


class ComposeConceptPrompt:
    DESCRIPTION = (
        'Writes a prompt with learned concepts: "a photo of {1} and {2} in the snow" becomes '
        '"a photo of embedding:concept/concept_1 and embedding:concept/concept_2 in the snow". With a CLIP '
        "connected it also encodes it, like CLIP Text Encode."
    )
    CATEGORY = CATEGORY
    FUNCTION = "compose"
    RETURN_TYPES = ("STRING", "CONDITIONING")
    RETURN_NAMES = ("prompt", "conditioning")
    OUTPUT_TOOLTIPS = ("the prompt for a CLIP Text Encode", "the encoded prompt (only when a CLIP is connected)")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "template": (
                    "STRING",
                    {
                        "default": "a photo of {1}",
                        "multiline": True,
                        "tooltip": "{1}, {2}, ... stand for the concepts, {all} for all of them",
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
            },
        }

    def compose(self, template, tokens=None, embedding_names=None, clip=None):
        if tokens is not None:
            names = list(tokens.info.get("embedding_names") or tokens.names)
        else:
            names = [n.strip() for n in (embedding_names or "").replace(",", "\n").splitlines() if n.strip()]
        text = compose_text(template, names)
        conditioning = None
        if clip is not None:
            conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        return (text, conditioning)
