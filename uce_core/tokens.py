"""``ConceptTokens``: the learned tokens (one vector per concept per text encoder) with what they were learned from,
and the initialisation of split tokens.

Initialisation (paper sec. 3.3: "randomly initialize g tokens" without any human word):

* ``"random"`` (default): each split token, in each text encoder, is drawn from a Gaussian with the per-dimension
  mean and standard deviation of that encoder's vocabulary embeddings, from a generator seeded by the training seed.
  The tokens start at the scale of real tokens but carry no word.
* ``"reference"``: the official code's choice: copy fixed vocabulary rows. It copies rows -150..-101 of the
  embedding table resized by 50 new tokens, i.e. vocabulary ids V-100+k for token k (ids 49308.. for SD2). Beyond
  the reference's 50 tokens the ids continue (modulo V).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

INITIALISATIONS = ("random", "reference")


def initial_vectors(table: torch.Tensor, count: int, method: str, generator: torch.Generator) -> torch.Tensor:
    """(count, width) float32 starting vectors from a (vocabulary, width) embedding table."""
    table = table.detach().float().cpu()
    if method == "random":
        mean, std = table.mean(dim=0), table.std(dim=0)
        return mean + std * torch.randn(count, table.shape[1], generator=generator)
    if method == "reference":
        vocab = table.shape[0]
        ids = torch.tensor([(vocab - 100 + k) % vocab for k in range(count)])
        return table[ids].clone()
    raise ValueError(f"initialisation must be one of {INITIALISATIONS}, not {method!r}")


@dataclass
class ConceptTokens:
    """Learned tokens. ``vectors[e]`` is (N, width_e) for text encoder ``encoder_keys[e]``."""

    vectors: list[torch.Tensor]
    encoder_keys: list[str]
    family: str
    names: list[str]
    masks: torch.Tensor  # (N, h, w) bool, the concepts' latent masks
    image: torch.Tensor  # (H, W, 3) uint8
    history: dict[str, list[float]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.names)
        if (
            len(self.vectors) != len(self.encoder_keys)
            or any(v.shape[0] != n for v in self.vectors)
            or self.masks.shape[0] != n
        ):
            raise ValueError("vectors, encoder keys, names and masks disagree on the number of concepts or encoders")
        self.masks = self.masks.bool()

    def __len__(self) -> int:
        return len(self.names)
