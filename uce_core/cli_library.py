"""The ``extract-many`` and ``evaluate`` commands (concept libraries: batch.py, library.py, ray_engine.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import cli_options
from .errors import ConceptExpressError


def add_commands(sub) -> None:
    many = sub.add_parser(
        "extract-many",
        help="a concept library: every image of a folder or list, resumable, locally or on Ray",
        description="Extract the concepts of every image of DIR_OR_LIST into LIBRARY/<image-name>/ (as 'extract' "
        "writes them), with LIBRARY/index.json and the gallery LIBRARY/index.html. Running it again continues: "
        "finished images are skipped, unfinished ones done again.",
    )
    many.add_argument("source", metavar="DIR_OR_LIST", help="a folder of images, or a text file with one path a line")
    many.add_argument("--out", required=True, metavar="LIBRARY", help="the library folder")
    _job_options(many)
    many.set_defaults(run=run_extract_many)

    evaluate = sub.add_parser(
        "evaluate",
        help="the paper's localization metrics of a library against ground-truth masks",
        description="Score LIBRARY's concepts against the masks of --truth DIR (NAME.png with NAME_mask_1.png, "
        "NAME_mask_2.png, ...): IoU, recall and precision (paper eqs. 18-20) per image and over the set. With "
        "--model, the images of DIR not in LIBRARY yet are extracted first (as extract-many does, here or on Ray).",
    )
    evaluate.add_argument("library", metavar="LIBRARY", help="a library written by extract-many")
    evaluate.add_argument("--truth", required=True, metavar="DIR", help="images with NAME_mask_K.png masks beside")
    _job_options(evaluate)
    evaluate.set_defaults(run=run_evaluate)


def _job_options(parser: argparse.ArgumentParser) -> None:
    cli_options.model_options(parser)
    cli_options.capture_options(parser)
    cli_options.localize_options(parser)
    cli_options.train_options(parser)
    group = parser.add_argument_group("library")
    group.add_argument(
        "--prefix", default="concept", help="embedding names PREFIX_1, ... in each set (default concept)"
    )
    group.add_argument("--preview", action="store_true", help="render one sample per concept into the gallery")
    group.add_argument(
        "--preview-steps", type=cli_options.int_at_least(1), default=25, help="DDIM steps of a sample (25)"
    )
    group.add_argument("--retry-failed", action="store_true", help="do failed images again (default: keep them)")
    engine = parser.add_argument_group("engine (default: this process, one image after another)")
    engine.add_argument("--ray", action="store_true", help='a local Ray instance (pip install -e ".[ray]")')
    engine.add_argument("--ray-address", metavar="HOST:PORT", help="an existing Ray cluster (ray start --head)")
    engine.add_argument(
        "--workers",
        type=cli_options.int_at_least(1),
        help="--ray: images at a time on the local instance (default: cores)",
    )
    engine.add_argument("--cpus-per-task", type=float, default=1, help="Ray: CPUs each image reserves (default 1)")
    engine.add_argument(
        "--gpus-per-task", type=float, help="Ray: GPUs each image reserves (default 1 on a cluster with GPUs, else 0)"
    )
    engine.add_argument(
        "--max-retries", type=cli_options.int_at_least(0), default=3, help="Ray: retries of a lost task (3)"
    )
    engine.add_argument(
        "--threads",
        type=cli_options.int_at_least(1),
        help="torch threads per image (default: torch's here, --cpus-per-task on Ray)",
    )


def build_job(args):
    import dataclasses

    from .batch import ExtractJob
    from .export import sanitize_name

    model = args.model or (cli_options.DEMO_MODEL if args.demo else None)
    if model is None:
        raise ConceptExpressError("give --model (a checkpoint, a diffusers folder, or tiny-sd1), or --demo")
    settings = cli_options.train_settings(args)
    return ExtractJob(
        model=cli_options.as_given_or_absolute(model),
        dtype=args.dtype,
        prediction_type=args.prediction_type,
        tokenizer=args.tokenizer,
        config=args.config,
        capture={
            "timestep": args.timestep,
            "prompt": args.capture_prompt,
            "resize": args.resize,
            "resolution": args.resolution,
        },
        localize={"n_max": args.n_max, "delta": args.delta, "min_area": args.min_area},
        train=dataclasses.asdict(settings),
        prefix=sanitize_name(args.prefix, "prefix", stem=False),
        preview={"steps": args.preview_steps, "prompt": "a photo of {}"} if args.preview else None,
        device=args.device,
    )


def build_engine(args):
    from .batch import LocalEngine

    if not (args.ray or args.ray_address):
        return LocalEngine(threads=args.threads)
    from .ray_engine import RayEngine

    return RayEngine(
        address=args.ray_address,
        workers=args.workers,
        cpus_per_task=args.cpus_per_task,
        gpus_per_task=args.gpus_per_task,
        threads=args.threads,
        max_retries=args.max_retries,
    )


def _extract(args, source, library) -> int:
    from .batch import extract_many
    from .library import INDEX

    job, engine = build_job(args), build_engine(args)
    try:
        report = extract_many(source, library, job, engine=engine, retry_failed=args.retry_failed)
    except KeyboardInterrupt:
        print(
            "concept-express: interrupted; the finished images are kept: run the same command to do the rest",
            file=sys.stderr,
        )
        return 130
    root = Path(library)
    cli_options.say(
        f"{report.done} done, {report.failed} failed, {report.crashed} crashed, {report.skipped} already finished "
        f"({report.seconds:.1f} s)"
    )
    for image, error in report.errors:
        cli_options.say(f"  {Path(image).name}: {error}")
    if (root / INDEX).exists():
        cli_options.say(f"library: {root / INDEX}\ngallery: {root / 'index.html'}")
    if report.crashed:
        cli_options.say(f"{report.crashed} image(s) crashed: run the same command again to do them again")
        return 1
    return 0


def run_extract_many(args) -> int:
    return _extract(args, args.source, args.out)


def run_evaluate(args) -> int:
    from .library_eval import format_scores, read_truth, score_library

    truth = read_truth(args.truth)
    code = 0
    if args.model or args.demo:
        code = _extract(args, sorted(truth), args.library)
        if code == 130:
            return code
    scores = score_library(args.library, args.truth)
    for image, why in scores.missing:
        cli_options.say(f"not scored: {Path(image).name} ({why})")
    if not scores.per_image:
        raise ConceptExpressError(
            f"none of the {len(truth)} image(s) of {args.truth} is in {args.library}; extract them first "
            "(extract-many, or evaluate with --model)."
        )
    cli_options.say(format_scores(scores))
    return code
