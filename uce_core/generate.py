"""Rendering images with learned tokens: ``"a photo of {1} on the beach"``, ``"{1} and {2} in the snow"``,
``"a photo of {all}"`` (all concepts joined with " and ").

The reference renders with DDIM, 50 steps, guidance 7.5, seed 0 (infer.py); those are the defaults here. The
tokens enter the prompt as vectors (no vocabulary is changed), through the same path as training.
"""

from __future__ import annotations

import re

import torch

from .backends.base import Prompt, Slot
from .errors import ConceptExpressError
from .tokens import ConceptTokens

_PLACEHOLDER = re.compile(r"\{(\d+|all)\}")


def parse_template(template: str, count: int, joiner: str = " and ") -> Prompt:
    """Text with {1}..{N} and {all} -> a ``Prompt`` whose slots index the concepts (0-based)."""
    parts: list = []
    position = 0
    for match in _PLACEHOLDER.finditer(template):
        if match.start() > position:
            parts.append(template[position : match.start()])
        key = match.group(1)
        indices = range(count) if key == "all" else [int(key) - 1]
        for k, i in enumerate(indices):
            if not 0 <= i < count:
                raise ConceptExpressError(
                    f"{{{key}}} in the prompt, but there are only {count} concepts ({{1}}..{{{count}}})."
                )
            if k:
                parts.append(joiner)
            parts.append(Slot(i))
        position = match.end()
    if position < len(template):
        parts.append(template[position:])
    prompt = Prompt(tuple(parts))
    if not prompt.slots:
        raise ConceptExpressError("the prompt has no concept in it; write {1}, {2}, ... or {all} where a concept goes.")
    return prompt


def check_compatible(backend, tokens: ConceptTokens) -> None:
    info = backend.info
    if tokens.family != info.family or [v.shape[1] for v in tokens.vectors] != list(info.widths):
        raise ConceptExpressError(
            f"these tokens were learned on a {tokens.family} model (widths {[v.shape[1] for v in tokens.vectors]}); "
            f"the loaded model is {info.family} (widths {list(info.widths)}). Load a model of the same family."
        )


def generate_images(
    backend,
    tokens: ConceptTokens,
    template: str,
    *,
    seed: int = 0,
    count: int = 1,
    steps: int = 50,
    guidance: float = 7.5,
    negative: str = "",
    size: tuple[int, int] | None = None,
    progress=None,
) -> list:
    """Render ``count`` images of ``template`` (see the module docstring); returns PIL images."""
    check_compatible(backend, tokens)
    prompt = parse_template(template, len(tokens))
    vectors = [v.to(backend.device) for v in tokens.vectors]
    with torch.no_grad():
        cond = backend.encode_prompts([prompt], vectors=vectors)
        uncond = backend.encode_prompts([Prompt.text(negative)])
    width, height = size or (tokens.image.shape[1], tokens.image.shape[0])
    images = []
    for k in range(count):
        generator = torch.Generator(device="cpu").manual_seed(seed + k)
        images.append(
            backend.sample(
                cond, uncond, steps=steps, guidance=guidance, generator=generator, width=width, height=height
            )
        )
        if progress is not None:
            progress(k + 1, count)
    return images
