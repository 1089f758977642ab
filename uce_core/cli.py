"""The ``concept-express`` command."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .errors import ConceptExpressError

EXAMPLE_IMAGE = Path(__file__).resolve().parent.parent / "assets" / "example.png"
DEMO_MODEL = "tiny-sd1"

_DESCRIPTION = """\
ConceptExpress: find the concepts in one image (no masks, no words, no count) and learn one
textual-inversion token per concept with your own Stable Diffusion checkpoint.

Models: a single-file .safetensors/.ckpt of SD1.x, SD2.x or SDXL, a diffusers folder, or one of the
random-weight test models tiny-sd1, tiny-sd2, tiny-sdxl (their output is meaningless; for trying things out).
"""


def _model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="checkpoint file, diffusers folder, or tiny-sd1 / tiny-sd2 / tiny-sdxl")
    group.add_argument("--demo", action="store_true",
                       help=f"use the bundled example image and the random-weight {DEMO_MODEL} model")
    group.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    group.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                       help="model weights dtype (default: float32 on CPU, bfloat16/float16 on GPU)")
    group.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                       help="override the model's prediction type (SD2.x single files are detected automatically)")
    group.add_argument("--tokenizer", help="folder with the CLIP tokenizer, for single-file checkpoints")
    group.add_argument("--config", help="diffusers folder whose configs describe a single-file checkpoint")


def _capture_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("attention capture")
    group.add_argument("--timestep", type=int, default=0, help="timestep of the capture pass (default 0, the reference's)")
    group.add_argument("--capture-prompt", default="", help='prompt of the capture pass (default "", the reference\'s)')
    group.add_argument("--resize", choices=["keep", "stretch"], default="keep",
                       help="keep the aspect ratio (default) or stretch to a square like the reference")
    group.add_argument("--resolution", type=int, help="working resolution in pixels (default: the model's native one)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="concept-express", description=_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    capture = sub.add_parser("capture", help="capture and aggregate the attention of one image, write previews",
                             description="Stage 1: run the UNet once on the image and save the aggregated "
                                         "self-attention and the end-of-text attention map, with previews.")
    capture.add_argument("image", nargs="?", help="the image (PNG, JPEG, WebP, ...)")
    capture.add_argument("--out", default="output", help="output folder (default: ./output)")
    _model_options(capture)
    _capture_options(capture)
    capture.set_defaults(run=run_capture)
    return parser


def _resolve_inputs(args) -> tuple[str, str]:
    image, model = args.image, args.model
    if args.demo:
        image = image or str(EXAMPLE_IMAGE)
        model = model or DEMO_MODEL
    if image is None:
        raise ConceptExpressError("give an IMAGE (or --demo for the bundled example)")
    if model is None:
        raise ConceptExpressError("give --model (a checkpoint, a diffusers folder, or tiny-sd1 for a random-weight test "
                                  "model), or --demo")
    return image, model


def load_model(args, model: str):
    import torch

    from .backends.loading import load_backend

    dtype = getattr(torch, args.dtype) if args.dtype else None
    return load_backend(model, device=args.device, dtype=dtype, prediction_type=args.prediction_type,
                        tokenizer=args.tokenizer, config=args.config)


def run_capture(args) -> int:
    from .attention import capture_attention
    from .previews import attention_rows_preview, eot_preview

    image, model = _resolve_inputs(args)
    out = Path(args.out)
    started = time.perf_counter()
    backend = load_model(args, model)
    _say(f"model: {backend.info.name} ({backend.info.family}, {backend.info.prediction_type}) on {backend.device}")
    if backend.info.name.startswith("tiny-"):
        _say("note: tiny models have RANDOM weights; their attention shows the method running, not real concepts")
    maps = capture_attention(backend, image, timestep=args.timestep, prompt=args.capture_prompt, resize=args.resize,
                             resolution=args.resolution)
    written = [maps.save(out / "attention.safetensors")]
    for name, picture in (("attention_rows.png", attention_rows_preview(maps)), ("eot.png", eot_preview(maps))):
        written.append(_save_png(picture, out / name))
    _say(f"captured {len(maps.info['self_layers'])} self-attention layers onto a {maps.grid[0]}x{maps.grid[1]} grid "
         f"and the end-of-text map at {maps.eot.shape[0]}x{maps.eot.shape[1]} in {time.perf_counter() - started:.1f} s")
    for path in written:
        _say(f"  wrote {path}")
    return 0


def _save_png(picture, path: Path) -> Path:
    from .fileio import write_atomic

    return write_atomic(path, lambda tmp: picture.save(tmp, format="PNG"))


def _say(message: str) -> None:
    print(message, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # e.g. its notice that torchvision is absent
    try:
        return args.run(args)
    except ConceptExpressError as err:
        print(f"concept-express: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("concept-express: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
