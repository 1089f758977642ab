"""Pieces of the reference's optimizer step that the update orders of ``train.py`` share.

* Gradient clipping (reference spec 1.10: ``accelerator.clip_grad_norm_`` over the text encoder's parameters, of
  which only the token-embedding table learns). The norm is that of the whole table's gradient: the placeholder rows
  (the learned vectors, with the contrastive term's gradient on every split token) and the rows of the prompt's
  other tokens (start and end of text, "a", "photo", "of", the padding), whose gradient the reference computes and
  then throws away by restoring those rows. A row read at several positions (the padding; "and" in the composite
  prompt) gets the sum of their gradients, as a table row does. The factor is torch's: max_norm / (norm + 1e-6),
  at most 1.
* ``LossScale``: the dynamic loss scale of torch's ``GradScaler`` (accelerate's fp16 mixed precision), one update per
  optimizer step: a step whose gradients are not finite is skipped and halves the scale; 2000 finite steps in a row
  double it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .backends.base import TokenTap


def clip_coefficient(squared_norm: float, max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_``'s factor for a gradient of the given squared L2 norm (1 when max_norm <= 0)."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (math.sqrt(squared_norm) + 1e-6))


def table_grad_sq(taps: Iterable[TokenTap]) -> float:
    """Squared L2 norm of the embedding-table gradient that the tapped token uses add up to: uses of the same row of
    the same encoder's table are summed first. Taps of several prompts may be given together (their gradients then
    add up per row, as one loss over all of them would give)."""
    by_encoder: dict[int, list[TokenTap]] = {}
    for t in taps:
        if t.tap.grad is not None:
            by_encoder.setdefault(t.encoder, []).append(t)
    total = 0.0
    for group in by_encoder.values():
        ids = torch.cat([t.ids for t in group])
        grads = torch.cat([t.tap.grad for t in group]).double()
        keep = ids >= 0
        rows, inverse = torch.unique(ids[keep], return_inverse=True)
        table = torch.zeros(len(rows), grads.shape[-1], dtype=torch.float64, device=grads.device)
        table.index_add_(0, inverse, grads[keep])
        total += float(table.pow(2).sum())
    return total


class LossScale:
    """torch.amp.GradScaler's dynamic scale, driven by hand (one ``update`` per optimizer step), so that several
    optimizer steps can share one backward pass. Disabled: the scale stays 1."""

    def __init__(
        self, enabled: bool, init: float = 2.0**16, growth: float = 2.0, backoff: float = 0.5, interval: int = 2000
    ):
        self.enabled = enabled
        self.scale = init if enabled else 1.0
        self.growth, self.backoff, self.interval = growth, backoff, interval
        self.streak = 0

    def update(self, finite: bool) -> None:
        if not self.enabled:
            return
        if not finite:
            self.scale *= self.backoff
            self.streak = 0
            return
        self.streak += 1
        if self.streak == self.interval:
            self.scale *= self.growth
            self.streak = 0

    def state(self) -> list[float]:
        return [self.scale, float(self.streak)]

    def load(self, state) -> None:
        if self.enabled and state:
            self.scale, self.streak = float(state[0]), int(state[1])
