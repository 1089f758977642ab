"""The ``concept-express`` command."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from .cli_options import (
    DEMO_IMAGE,
    DEMO_MODEL,
    as_given_or_absolute,
    capture_options,
    export_options,
    int_at_least,
    localize_options,
    model_options,
    output_options,
    say,
    steering_options,
    train_options,
    train_settings,
)
from .errors import ConceptExpressError

CHECKPOINT = ".training-checkpoint.safetensors"  # in the output folder while extract trains; removed after export

_DESCRIPTION = """\
ConceptExpress: find the concepts in one image (no masks, no words, no count) and learn one
textual-inversion token per concept with your own Stable Diffusion checkpoint.

Models: a single-file .safetensors/.ckpt of SD1.x, SD2.x or SDXL, a diffusers folder, the
bundled scene-world model 'world' (a small model this project trained on its own procedural scenes, 128 px; the
demo's model), or one of the random-weight test models tiny-sd1, tiny-sd2, tiny-sdxl (their output is meaningless).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="concept-express", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    capture = sub.add_parser(
        "capture",
        help="capture and aggregate the attention of one image, write previews",
        description="Stage 1: run the UNet once on the image and save the aggregated "
        "self-attention and the end-of-text attention map, with previews.",
    )
    capture.add_argument("image", nargs="?", help="the image (PNG, JPEG, WebP, ...)")
    output_options(capture, "output/capture")
    model_options(capture)
    capture_options(capture)
    capture.set_defaults(run=run_capture)

    localize = sub.add_parser(
        "localize",
        help="find the concepts in captured attention (or in an image)",
        description="Stage 2: FINCH clustering of the aggregated self-attention, end-of-text "
        "filtering and constrained merging; writes concepts.safetensors and an overlay.",
    )
    localize.add_argument(
        "source", nargs="?", help="attention.safetensors from 'capture', or an image (captured first)"
    )
    output_options(localize, "output/localize")
    model_options(localize)
    capture_options(localize)
    localize_options(localize)
    steering_options(localize)
    localize.set_defaults(run=run_localize)

    extract = sub.add_parser(
        "extract",
        help="the main job: image -> concepts -> one embedding per concept",
        description="Capture attention, localize the concepts, learn one token per concept and "
        "export them as embeddings ComfyUI, A1111 and diffusers load.",
    )
    extract.add_argument("image", nargs="?", help="the image (PNG, JPEG, WebP, ...)")
    model_options(extract)
    capture_options(extract)
    localize_options(extract)
    steering_options(extract)
    train_options(extract)
    export_options(extract)
    extract.add_argument("--resume", action="store_true", help="continue from the checkpoint in the output folder")
    extract.set_defaults(run=run_extract)

    generate = sub.add_parser(
        "generate",
        help="render images with learned concepts",
        description="Render PROMPT with learned concepts: {1}, {2}, ... stand for the concepts and "
        '{all} for all of them joined with "and".',
    )
    generate.add_argument("--concepts", required=True, help="a folder written by 'extract'")
    generate.add_argument("--prompt", required=True, help='e.g. "a photo of {1} on the beach"')
    generate.add_argument("--negative", default="", help="negative prompt")
    generate.add_argument("--count", type=int_at_least(1), default=4, help="images to render (default 4)")
    generate.add_argument("--seed", type=int, default=0, help="seed of the first image (default 0)")
    generate.add_argument("--sampling-steps", type=int_at_least(1), default=50, help="DDIM steps (default 50)")
    generate.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance (default 7.5)")
    generate.add_argument("--out", help="output folder (default: CONCEPTS/images)")
    model_options(generate)
    generate.set_defaults(run=run_generate)

    from .cli_library import add_commands  # extract-many, evaluate

    add_commands(sub)
    return parser


def _resolve_inputs(args) -> tuple[str, str]:
    image, model = args.image, args.model
    if args.demo:
        image = image or str(DEMO_IMAGE)
        model = model or DEMO_MODEL
    if image is None:
        raise ConceptExpressError("give an IMAGE (or --demo for the bundled example)")
    if model is None:
        raise ConceptExpressError(
            "give --model (a checkpoint, a diffusers folder, 'world' for the bundled scene-world model, or tiny-sd1 for a "
            "random-weight test model), or --demo"
        )
    return image, model


def load_model(args, model: str):
    from .backends.loading import load_backend

    return load_backend(
        model,
        device=args.device,
        dtype=args.dtype or "auto",
        prediction_type=args.prediction_type,
        tokenizer=args.tokenizer,
        config=args.config,
    )


def _output_folder(out: Path, overwrite: bool, names: tuple[str, ...] = ()) -> Path:
    """Make sure ``out`` is a writable folder, and (unless ``overwrite``) that none of ``names`` exists in it, before
    any work is done."""
    if out.exists() and not out.is_dir():
        raise ConceptExpressError(f"{out} is a file, not a folder; give --out a folder.")
    if not overwrite:
        existing = [out / name for name in names if (out / name).exists()]
        if existing:
            raise ConceptExpressError(
                f"{existing[0]} already exists; nothing was written. Choose another folder, or add --overwrite."
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise ConceptExpressError(f"cannot write into {out} ({err.strerror or err}); choose another --out.") from None
    return out


def _load_announced(args, model: str):
    backend = load_model(args, model)
    say(f"model: {backend.info.name} ({backend.info.family}, {backend.info.prediction_type}) on {backend.device}")
    say(f"precision: {backend.precision.describe(backend.device)}")
    if backend.info.name.startswith("tiny-"):
        say("note: tiny models have RANDOM weights; the pipeline runs end to end but the concepts mean nothing")
    return backend


def run_capture(args) -> int:
    from .previews import attention_rows_preview, eot_preview

    image, model = _resolve_inputs(args)
    out = _output_folder(Path(args.out), args.overwrite, ("attention.safetensors", "attention_rows.png", "eot.png"))
    started = time.perf_counter()
    backend = _load_announced(args, model)
    maps = _capture(args, backend, image)
    written = [maps.save(out / "attention.safetensors")]
    for name, picture in (("attention_rows.png", attention_rows_preview(maps)), ("eot.png", eot_preview(maps))):
        written.append(_save_png(picture, out / name))
    say(
        f"captured {len(maps.info['self_layers'])} self-attention layers onto a {maps.grid[0]}x{maps.grid[1]} grid "
        f"and the end-of-text map at {maps.eot.shape[0]}x{maps.eot.shape[1]} in {time.perf_counter() - started:.1f} s"
    )
    for path in written:
        say(f"  wrote {path}")
    return 0


def _capture(args, backend, image):
    from .attention import capture_attention

    return capture_attention(
        backend,
        image,
        timestep=args.timestep,
        prompt=args.capture_prompt,
        resize=args.resize,
        resolution=args.resolution,
    )


MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def read_mask_files(paths: list[str]):
    """(K, H, W) float masks from mask files, or from the image files of one folder in name order (see the
    --masks help for how a file is read)."""
    import numpy as np
    import torch
    from PIL import Image

    files = [Path(p) for p in paths]
    if len(files) == 1 and files[0].is_dir():
        folder = files[0]
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in MASK_SUFFIXES)
        if not files:
            raise ConceptExpressError(f"{folder} holds no mask pictures ({', '.join(MASK_SUFFIXES)}).")
    masks = []
    for path in files:
        try:
            with Image.open(path) as im:
                im.load()
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    alpha = np.asarray(im.convert("RGBA"))[..., 3]
                    if alpha.min() < 255:  # transparency marks the concept, as in ComfyUI's Load Image
                        masks.append(1.0 - alpha.astype(np.float32) / 255)
                        continue
                masks.append(np.asarray(im.convert("L"), dtype=np.float32) / 255)
        except OSError as err:
            raise ConceptExpressError(f"{path}: cannot be read as a mask picture ({err}).") from None
    if len({m.shape for m in masks}) > 1:
        raise ConceptExpressError(
            f"the masks have different sizes ({sorted({m.shape[::-1] for m in masks})}); give them all at the image's "
            "size."
        )
    return torch.from_numpy(np.stack(masks))


def _given_masks(args):
    """The masks given by --masks and --label-image (None when neither), read before any model is loaded."""
    import numpy as np
    import torch
    from PIL import Image

    from .concept_edits import check_masks, label_image_masks

    given = []
    if getattr(args, "masks", None):
        given.append(read_mask_files(args.masks))
    if getattr(args, "label_image", None):
        try:
            with Image.open(args.label_image) as im:
                label = np.asarray(im.convert("RGBA"))
        except OSError as err:
            raise ConceptExpressError(f"{args.label_image}: cannot be read as a label image ({err}).") from None
        given.append(label_image_masks(label))
    if len({tuple(g.shape[1:]) for g in given}) > 1:
        raise ConceptExpressError("the masks and the label image have different sizes; give them at the same size.")
    if not given:
        return None
    masks = torch.cat(given)
    check_masks(masks)  # an empty mask is refused before any model is loaded
    return masks


def _edits(args):
    from .concept_edits import ConceptEdits

    return ConceptEdits(
        keep=args.keep,
        drop=args.drop,
        merge=args.merge,
        split_instances=args.split_instances,
        split_min_area=args.split_min_area,
        names=args.names,
    )


def _localize(args, maps, given=None):
    from .concept_edits import concepts_from_masks, edit_concepts
    from .localize import LocalizeSettings, localize_concepts

    settings = LocalizeSettings(n_max=args.n_max, delta=args.delta, min_area=args.min_area)
    if given is None:
        concepts = localize_concepts(maps, settings)
    elif args.mask_mode == "replace":
        concepts = concepts_from_masks(maps, given)
    else:
        concepts = concepts_from_masks(maps, given, "add", localize_concepts(maps, settings))
    return edit_concepts(concepts, _edits(args))


def run_localize(args) -> int:
    from .attention import AttentionMaps

    source = args.source or (str(DEMO_IMAGE) if args.demo else None)
    if source is None:
        raise ConceptExpressError("give attention.safetensors from 'capture', an image, or --demo")
    given = _given_masks(args)
    out = _output_folder(Path(args.out), args.overwrite, ("concepts.safetensors", "concepts.png"))
    if source.endswith(".safetensors"):
        maps = AttentionMaps.load(source)
    else:
        args.image = source
        image, model = _resolve_inputs(args)
        maps = _capture(args, _load_announced(args, model), image)
    concepts = _localize(args, maps, given)
    written = [concepts.save(out / "concepts.safetensors"), _save_png(concepts.overlay(), out / "concepts.png")]
    say(f"found {len(concepts)} concept(s) on a {concepts.grid[0]}x{concepts.grid[1]} grid")
    for path in written:
        say(f"  wrote {path}")
    return 0


def run_extract(args) -> int:
    from .export import check_export_target, chosen_names, export_names, export_tokens, sanitize_name
    from .previews import attention_rows_preview, eot_preview
    from .train import checkpoint_fingerprint, run_fingerprint, train_concept_tokens

    image, model = _resolve_inputs(args)
    previews = {"attention_rows.png": attention_rows_preview, "eot.png": eot_preview}
    given = _given_masks(args)
    created = not Path(args.out).exists()
    out = _output_folder(Path(args.out), args.overwrite, tuple(previews))
    prefix = sanitize_name(args.prefix, "prefix", stem=False)
    started = time.perf_counter()
    backend = _load_announced(args, model)
    maps = _capture(args, backend, image)
    try:
        concepts = _localize(args, maps, given)
        say(f"found {len(concepts)} concept(s) ({time.perf_counter() - started:.1f} s)")
        check_export_target(
            out, export_names([""] * len(concepts), prefix, chosen_names(concepts.info)), args.overwrite
        )
    except ConceptExpressError:
        if created and not any(out.iterdir()):
            out.rmdir()  # a refused run leaves nothing behind
        raise
    settings = train_settings(args)
    checkpoint = out / CHECKPOINT
    if checkpoint.exists() and not args.resume:
        if not args.overwrite:
            raise ConceptExpressError(
                f"{out} holds the checkpoint of an interrupted run: add --resume to continue it, "
                "or --overwrite to start again"
            )
        checkpoint.unlink()
    if args.resume:
        if not checkpoint.exists():
            say(f"nothing to resume in {out}: training starts at step 0")
        elif checkpoint_fingerprint(checkpoint) != run_fingerprint(backend.info, concepts, settings):
            raise ConceptExpressError(
                f"the checkpoint in {out} belongs to a run with other settings, another image or another model "
                "family; resume with the interrupted run's options (--dtype may change), or add --overwrite instead "
                "of --resume to start again"
            )
    bar = _ProgressBar(settings.steps)
    tokens = train_concept_tokens(
        backend, concepts, settings, progress=bar.update, checkpoint=checkpoint, resume=args.resume
    )
    bar.close()
    result = export_tokens(
        tokens,
        out,
        prefix=prefix,
        overwrite=args.overwrite,
        extra={"image": str(Path(image).resolve()), "model": as_given_or_absolute(model)},
    )
    for name, preview in previews.items():
        _save_png(preview(maps), out / name)
    if checkpoint.exists():
        checkpoint.unlink()
    final = tokens.history["loss"][-1] if tokens.history.get("loss") else float("nan")
    say(f"done in {time.perf_counter() - started:.1f} s: {len(result.names)} concept(s), final loss {final:.4f}")
    for path in result.embeddings:
        say(f"  {path}")
    say(f"  {result.manifest} (+ masks, concepts.png, loss.png, attention_rows.png, eot.png)")
    say("use them:")
    say(
        f"  ComfyUI: copy {out}/*.safetensors into ComfyUI/models/embeddings/{prefix}/ and write "
        f"'embedding:{prefix}/{result.names[0]}' in a CLIP Text Encode prompt"
    )
    say(f'  here:    concept-express generate --concepts {out} --prompt "a photo of {{1}} on the beach"')
    return 0


def run_generate(args) -> int:
    from .export import load_exported
    from .generate import generate_images

    tokens = load_exported(args.concepts)
    model = args.model or tokens.info.get("source", {}).get("model") or tokens.info.get("model", {}).get("name") or None
    if args.demo:
        model = model or DEMO_MODEL
    if not model:
        raise ConceptExpressError("give --model: the model the concepts were learned with (or one of the same family)")
    backend = load_model(args, model)
    concepts = Path(args.concepts)
    out = Path(args.out) if args.out else (concepts if concepts.is_dir() else concepts.parent) / "images"
    images = generate_images(
        backend,
        tokens,
        args.prompt,
        seed=args.seed,
        count=args.count,
        steps=args.sampling_steps,
        guidance=args.guidance,
        negative=args.negative,
    )
    stem = "".join(c if c.isalnum() else "-" for c in args.prompt).strip("-")[:60] or "image"
    for k, picture in enumerate(images):
        say(f"  wrote {_save_png(picture, out / f'{stem}_{args.seed + k}.png')}")
    return 0


class _ProgressBar:
    """Training progress on stderr: a redrawn line on a terminal, a line every 10% otherwise."""

    def __init__(self, total: int):
        self.total, self.started, self.tty = total, time.perf_counter(), sys.stderr.isatty()
        self.last_reported = -1

    def update(self, step: int, total: int, losses: dict) -> None:
        if "resumed" in losses:
            print(f"resumed from step {step}", file=sys.stderr, flush=True)
            return
        if "note" in losses:
            print(("\n" if self.tty and step else "") + f"train: {losses['note']}", file=sys.stderr, flush=True)
            return
        elapsed = time.perf_counter() - self.started
        line = f"train {step}/{total} loss {losses.get('loss', float('nan')):.4f} {elapsed:.0f}s"
        if self.tty:
            filled = int(30 * step / total)
            print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {line}", end="", file=sys.stderr, flush=True)
        elif step * 10 // total != self.last_reported or step == total:
            self.last_reported = step * 10 // total
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr, flush=True)


def _save_png(picture, path: Path) -> Path:
    from .fileio import write_atomic

    return write_atomic(path, lambda tmp: picture.save(tmp, format="PNG"))


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
        saved = getattr(args, "resume", None) is not None and (Path(args.out) / CHECKPOINT).exists()
        print(
            "concept-express: interrupted"
            + ("; the progress is saved: run the same command with --resume to continue" if saved else ""),
            file=sys.stderr,
        )
        return 130
    except OSError as err:  # a disk that fills up or goes away mid-run
        print(f"concept-express: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
