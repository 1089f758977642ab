"""The command line's shared pieces: option groups, argument types, the demo's inputs and schedule, and the
settings they build. ``cli`` (the single-image commands) and ``cli_library`` (extract-many, evaluate) both use them."""

from __future__ import annotations

import argparse
from pathlib import Path

# --demo: a scene of the project's scene world (uce_core/world) and the small model trained on that world, shipped
# in the package; it trains a short schedule in the paper's split/merged proportion (1:4) so that the demo finishes
# in under a minute on a CPU. --steps/--merge-step override it.
ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_IMAGE = ASSETS / "world-example.png"
EXAMPLE_IMAGE = ASSETS / "example.png"  # the still life of the ComfyUI templates (640 x 480): the tests' picture
DEMO_MODEL = "world"
DEMO_STEPS, DEMO_MERGE_STEP = 100, 20


def int_at_least(low: int, high: int | None = None):
    """argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"{value} is out of range: give {low}..{high}"
                if high is not None
                else f"{value} is too small: give at least {low}"
            )
        return value

    return parse


def model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        help="checkpoint file, diffusers folder, world (the bundled scene-world model), or tiny-sd1 / tiny-sd2 / tiny-sdxl",
    )
    group.add_argument(
        "--demo",
        action="store_true",
        help="use the bundled scene-world example and the scene-world model trained by this project",
    )
    group.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    group.add_argument(
        "--dtype",
        choices=["auto", "fp32", "fp16", "bf16"],
        default="auto",
        help="precision: fp32, or fp16/bf16 mixed precision (float32 weights, training under autocast, the VAE in "
        "half precision), as the reference's --mixed_precision (default auto: fp16 on CUDA, fp32 elsewhere)",
    )
    group.add_argument(
        "--prediction-type",
        choices=["epsilon", "v_prediction"],
        help="override the model's prediction type (SD2.x single files are detected automatically)",
    )
    group.add_argument("--tokenizer", help="folder with the CLIP tokenizer, for single-file checkpoints")
    group.add_argument("--config", help="diffusers folder whose configs describe a single-file checkpoint")


def capture_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("attention capture")
    group.add_argument(
        "--timestep",
        type=int_at_least(0, 999),
        default=0,
        help="timestep of the capture pass (default 0, the reference's)",
    )
    group.add_argument("--capture-prompt", default="", help='prompt of the capture pass (default "", the reference\'s)')
    group.add_argument(
        "--resize",
        choices=["keep", "stretch"],
        default="keep",
        help="keep the aspect ratio (default) or stretch to a square like the reference",
    )
    group.add_argument(
        "--resolution", type=int_at_least(64), help="working resolution in pixels (default: the model's native one)"
    )


def localize_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("concept localization")
    group.add_argument(
        "--n-max", type=int, default=10, help="upper limit N_max used to pick the pre-clustering level (default 10)"
    )
    group.add_argument(
        "--delta",
        choices=["reference", "paper"],
        default="reference",
        help="post-clustering threshold: the official code's (default) or the paper's reading",
    )
    group.add_argument(
        "--min-area",
        type=float,
        default=0.0,
        help="drop concepts smaller than this fraction of the image (default 0: off, as the reference)",
    )


def steering_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "concepts you give or correct",
        "Masks: white (>= 50%) = the concept, at any resolution of this image; a picture with transparency "
        "counts its transparent part (as ComfyUI's Load Image). A grid cell belongs to a mask when at least half of "
        "it is covered. Edits use the overlay's numbers (concepts.png) and run in the order merge, keep/drop, "
        "split, names.",
    )
    group.add_argument(
        "--masks", nargs="+", metavar="MASK", help="mask files, one per concept, or one folder of them (name order)"
    )
    group.add_argument("--label-image", help="a label image: each colour one concept, black none")
    group.add_argument(
        "--mask-mode",
        choices=["replace", "add"],
        default="replace",
        help="replace (default): the given masks are the concepts; add: add them to the concepts found (a mask "
        "covering more than half of a found concept replaces it)",
    )
    group.add_argument("--keep", default="", help='only these concepts, e.g. "1,3,4"')
    group.add_argument("--drop", default="", help='leave these concepts out, e.g. "2"')
    group.add_argument("--merge", default="", help='one concept of each group, e.g. "2+5, 3+4"')
    group.add_argument(
        "--split-instances", action="store_true", help="a concept of separate pieces becomes one concept per piece"
    )
    group.add_argument(
        "--split-min-area",
        type=float,
        default=0.01,
        help="pieces under this fraction of the image are not split off (default 0.01)",
    )
    group.add_argument(
        "--names", default="", help='embedding names of the edited concepts in order, e.g. "dog, teapot, lamp"'
    )


def train_options(parser: argparse.ArgumentParser) -> None:
    from .train import TrainSettings

    d = TrainSettings()
    group = parser.add_argument_group("token learning")
    group.add_argument(
        "--steps", type=int_at_least(1), help=f"training steps (default {d.steps}; {DEMO_STEPS} with --demo)"
    )
    group.add_argument(
        "--merge-step",
        type=int_at_least(0),
        help=f"step at which split tokens merge (default {d.merge_step}, or a fifth of --steps when "
        f"that is shorter; {DEMO_MERGE_STEP} with --demo)",
    )
    group.add_argument(
        "--split-tokens",
        type=int,
        default=d.split_tokens,
        help=f"tokens per concept before merging (default {d.split_tokens})",
    )
    group.add_argument(
        "--lr", type=float, default=d.learning_rate, help=f"AdamW learning rate (default {d.learning_rate:g})"
    )
    group.add_argument(
        "--contrastive-weight",
        type=float,
        default=d.contrastive_weight,
        help=f"alpha (default {d.contrastive_weight:g})",
    )
    group.add_argument(
        "--attention-weight",
        type=float,
        default=d.attention_weight,
        help=f"beta, EMD alignment (default {d.attention_weight:g})",
    )
    group.add_argument(
        "--emd",
        choices=["sinkhorn", "exact"],
        default=d.emd,
        help="EMD solver (default: entropic Sinkhorn as the reference)",
    )
    group.add_argument(
        "--update",
        choices=["sequential", "reference", "averaged"],
        default=d.update,
        help="sequential (default): the reference's one AdamW update per prompt, gradients from one batched pass; "
        "reference: the reference's loop, one pass per prompt (slow); averaged: one update per step (fewer updates)",
    )
    group.add_argument(
        "--init",
        choices=["random", "reference"],
        default=d.init,
        help="split-token initialisation: random at the vocabulary's scale (default) or the reference's fixed rows",
    )
    group.add_argument(
        "--template", default=d.template, help=f'training prompt, {{}} marks the token (default "{d.template}")'
    )
    group.add_argument("--seed", type=int, default=d.seed, help=f"seed (default {d.seed}, the official run's)")
    group.add_argument("--no-flip", action="store_true", help="no random horizontal flips during training")
    group.add_argument(
        "--micro-batch", type=int, default=0, help="prompts per UNet call (default 0: as many as the memory allows)"
    )
    group.add_argument(
        "--memory-budget",
        type=float,
        default=0.0,
        metavar="GIB",
        help="memory a training step may use on top of the models, for choosing the micro-batch "
        "(default 0: 80%% of what the device has free)",
    )
    group.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    group.add_argument(
        "--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between resumable checkpoints"
    )


def output_options(parser: argparse.ArgumentParser, folder: str) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("output")
    group.add_argument("--out", default=folder, help=f"output folder (default: ./{folder})")
    group.add_argument("--overwrite", action="store_true", help="replace existing files in the output folder")
    return group


def export_options(parser: argparse.ArgumentParser) -> None:
    group = output_options(parser, "output")
    group.add_argument(
        "--prefix", default="concept", help="embedding names are PREFIX_1, PREFIX_2, ... (default: concept)"
    )


def schedule(args) -> tuple[int, int]:
    """--steps / --merge-step, else the demo's short schedule with --demo, else the paper's (TrainSettings)."""
    from .train import TrainSettings

    demo = args.demo and args.steps is None
    steps = DEMO_STEPS if demo else TrainSettings.steps if args.steps is None else args.steps
    if args.merge_step is not None:
        merge_step = args.merge_step
    elif demo:
        merge_step = DEMO_MERGE_STEP
    else:  # the paper's step 100, or a fifth of a run too short to reach it (the paper's proportion)
        merge_step = TrainSettings.merge_step if steps > TrainSettings.merge_step else steps // 5
    if demo:
        say(f"demo schedule: {steps} steps, merge at {merge_step} (the paper's is 500, merge at 100: set --steps 500)")
    return steps, merge_step


def train_settings(args):
    """The TrainSettings of the token-learning options (validated)."""
    from .train import TrainSettings

    steps, merge_step = schedule(args)
    settings = TrainSettings(
        steps=steps,
        merge_step=merge_step,
        split_tokens=args.split_tokens,
        learning_rate=args.lr,
        contrastive_weight=args.contrastive_weight,
        attention_weight=args.attention_weight,
        emd=args.emd,
        update=args.update,
        init=args.init,
        template=args.template,
        seed=args.seed,
        flip=not args.no_flip,
        micro_batch=args.micro_batch,
        memory_budget=args.memory_budget,
        gradient_checkpointing=args.gradient_checkpointing,
        checkpoint_every=args.checkpoint_every,
    )
    settings.validate()
    return settings


def as_given_or_absolute(model: str) -> str:
    """A model path made absolute (so that 'generate' finds it from any folder); a model name as given."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def say(message: str) -> None:
    print(message, flush=True)
