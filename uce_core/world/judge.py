"""The world's judge: a small CNN that says which (shape, colour) objects a 128 px picture shows.

It gives the benchmark its ACC^1 analogue: a learned token's renders are judged, and a render counts as correct when
the judge's most confident (shape, colour) class is the concept's (chance: 1 / 30 with 5 shapes x 6 colours). The
judge knows nothing of the diffusion model: it is trained on rendered single-object scenes only (the picture "a photo
of X" asks for; seeds of its own, disjoint from the diffusion model's training, validation and test scenes), with
blur, noise and colour jitter so that the softer pictures a small diffusion model draws are in its range. One softmax
over the 30 classes.

    python -m concept_express.uce_core.world.judge --out uce_core/world/weights/judge.safetensors
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .scenes import COLOURS, SHAPES, render_scene

CLASSES = tuple((s, c) for s in SHAPES for c in COLOURS)
JUDGE_SEEDS = range(30_000_000, 31_000_000)
WEIGHTS = Path(__file__).with_name("weights") / "judge.safetensors"


class Judge(nn.Module):
    """Four stride-2 conv stages (24-96 channels) on the picture at 64 px, global max pooling, one linear layer."""

    def __init__(self, width: int = 24):
        super().__init__()
        layers, c = [], 3
        for out in (width, width * 2, width * 4, width * 4):
            layers += [nn.Conv2d(c, out, 3, padding=1, stride=2), nn.GroupNorm(4, out), nn.SiLU(),
                       nn.Conv2d(out, out, 3, padding=1), nn.GroupNorm(4, out), nn.SiLU()]  # fmt: skip
            c = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, len(CLASSES))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, 64, 64) in [-1, 1] (``to_input``) -> logits (B, 30)."""
        return self.head(self.features(images).amax(dim=(2, 3)))


def to_input(images) -> torch.Tensor:
    """uint8 (B, H, W, 3) array or tensor (or one (H, W, 3) image) -> (B, 3, 64, 64) float in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x[None]
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur (down to 24-64 px and back), colour jitter, noise and flips."""
    b, side = x.shape[0], x.shape[-1]
    low = int(torch.randint(24, side + 1, (1,), generator=generator))
    if low < side:
        x = F.interpolate(
            F.interpolate(x, size=(low, low), mode="bilinear", antialias=True), size=(side, side), mode="bilinear"
        )
    x = x * (1 + 0.1 * (torch.rand(b, 3, 1, 1, generator=generator) - 0.5)) + 0.1 * (
        torch.rand(b, 1, 1, 1, generator=generator) - 0.5
    )
    x = x + 0.05 * torch.rand(b, 1, 1, 1, generator=generator) * torch.randn(x.shape, generator=generator)
    return torch.where(torch.rand(b, 1, 1, 1, generator=generator) < 0.5, x.flip(-1), x).clamp(-1, 1)


def train_judge(steps: int = 3000, batch: int = 64, scenes: int = 20_000, seed: int = 0, log=print) -> Judge:
    torch.manual_seed(seed)
    rendered = [render_scene(JUDGE_SEEDS[i], count=1) for i in range(scenes)]
    images = np.stack([s.image for s in rendered])
    labels = torch.tensor([CLASSES.index(s.objects[0].label) for s in rendered])
    judge = Judge()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(steps):
        idx = torch.randint(len(images), (batch,), generator=generator)
        x = _augment(to_input(images[idx.numpy()]), generator)
        loss = F.cross_entropy(judge(x), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 100 == 0:
            log(f"judge step {step + 1}/{steps}: loss {float(loss):.4f} ({time.time() - start:.0f} s)")
    return judge.eval()


@torch.no_grad()
def judge_accuracy(judge: Judge, count: int = 600, offset: int = 500_000) -> float:
    """Top-1 accuracy on single-object rendered scenes the judge never saw."""
    scenes = [render_scene(JUDGE_SEEDS[offset + i], count=1) for i in range(count)]
    logits = judge(to_input(np.stack([s.image for s in scenes])))
    truth = torch.tensor([CLASSES.index(s.objects[0].label) for s in scenes])
    return float((logits.argmax(1) == truth).float().mean())


def load_judge(path: str | Path = WEIGHTS) -> Judge:
    from safetensors.torch import load_file

    judge = Judge()
    judge.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return judge.eval()


@torch.no_grad()
def judge_labels(judge: Judge, images) -> list[tuple[str, str]]:
    """The most confident (shape, colour) of each picture."""
    return [CLASSES[int(i)] for i in judge(to_input(images)).argmax(1)]


def main(argv=None) -> int:
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description="train the scene world's judge")
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    judge = train_judge(args.steps)
    print(f"top-1 accuracy on 600 unseen single-object scenes: {judge_accuracy(judge):.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in judge.state_dict().items()}, str(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
