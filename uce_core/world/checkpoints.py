"""The world recipe's checkpoints: atomic writes, and a training state (modules, optimizer, random streams) saved
and restored under fixed keys, so that every stage resumes the same way."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def save(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` through a temporary file: an interrupted write leaves the old checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path) -> dict | None:
    return torch.load(path, weights_only=False) if path.is_file() else None


def snapshot(generator: torch.Generator, rng: np.random.Generator | None = None, **parts) -> dict:
    """The state of each of ``parts`` (modules, optimizers: anything with ``state_dict``) under its name, and the
    random streams under "generator" and "rng"."""
    state = {name: part.state_dict() for name, part in parts.items()}
    state["generator"] = generator.get_state()
    if rng is not None:
        state["rng"] = rng.bit_generator.state
    return state


def restore(state: dict, generator: torch.Generator, rng: np.random.Generator | None = None, **parts) -> None:
    """Put back what ``snapshot`` saved."""
    for name, part in parts.items():
        part.load_state_dict(state[name])
    generator.set_state(state["generator"])
    if rng is not None:
        rng.bit_generator.state = state["rng"]
