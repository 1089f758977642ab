"""Concept libraries at scale: images per hour of ``extract_many`` on the local loop and on a local Ray instance with 1
and 2 workers, on the same images, and the driver's overhead per image. A benchmark, not a test.

    python benchmarks/bench_scale.py                          # tiny-sd1 on the CPU: local, Ray x1, Ray x2
    python benchmarks/bench_scale.py --images 12 --steps 20
    python benchmarks/bench_scale.py --model tiny-sd1 --device cuda --workers 1 2 4 --gpus   # one worker per GPU

Each mode runs in a fresh process. Every worker (and the local loop) uses ``--threads`` torch threads (default 1),
so that two workers on two cores do not fight over them. Each mode first extracts one warm-up image per worker into a
scratch library (Ray starts, each worker loads the model), then the measured images into a new library: images/hour
is measured over that second run only, from its start to its last result. Reported per mode:

* images/h, and the speed-up over Ray with 1 worker (target: 2 workers >= 1.7x one);
* image s: the mean time a worker spent on one image (capture, localization, training, export to bytes);
* driver ms/image: what the driver spent per image writing the set into the library and rewriting the index, and
  that as a share of an image's time (target < 2 %);
* wall overhead/image: (wall time x workers - sum of image times) / images: everything else per image (scheduling,
  sending the image, returning its files, idle workers at the end of the run), as a share of an image's time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_capture import run_worker  # noqa: E402  (one measurement per fresh process)


def make_images(folder: Path, count: int, size: int) -> Path:
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        rng = np.random.default_rng(k)
        image = Image.new("RGB", (size, size), tuple(int(x) for x in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x, y = rng.integers(0, size * 2 // 3, 2)
            r = rng.integers(size // 8, size // 3)
            draw.ellipse([x, y, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        image.save(folder / f"image_{k:03d}.png")
    return folder


def worker(args) -> dict:
    import dataclasses

    from concept_express.uce_core.batch import Display, ExtractJob, LocalEngine, extract_many
    from concept_express.uce_core.train import TrainSettings

    job = ExtractJob(
        model=args.model,
        device=args.device,
        train=dataclasses.asdict(TrainSettings(steps=args.steps, merge_step=max(1, args.steps // 5))),
    )
    work = Path(args.work)
    workers = 1 if args.mode == "local" else int(args.mode.removeprefix("ray"))
    if args.mode == "local":
        engine = LocalEngine(threads=args.threads)
    else:
        from concept_express.uce_core.ray_engine import RayEngine

        engine = RayEngine(workers=workers, threads=args.threads, gpus_per_task=1 if args.gpus else 0)
    stop, start = engine.stop, engine.start
    engine.stop = lambda: None  # keep the engine (Ray, the workers' models) from the warm-up to the measured run
    quiet = Display(quiet=True)
    warm = [str(p) for p in sorted((work / "warm").iterdir())[:workers]]
    extract_many(warm, work / f"lib-warm-{args.mode}", job, engine=engine, gallery=False, display=quiet)
    engine.start = lambda job, display: None
    started = time.perf_counter()
    report = extract_many(work / "images", work / f"lib-{args.mode}", job, engine=engine, gallery=False, display=quiet)
    wall = time.perf_counter() - started
    engine.start = start
    stop()
    index = json.loads((work / f"lib-{args.mode}" / "index.json").read_text())
    seconds = [e["seconds"] for e in index["images"] if e["status"] == "done"]
    n = len(index["images"])
    image_s = sum(seconds) / len(seconds)
    return {
        "mode": args.mode,
        "workers": workers,
        "images": n,
        "done": report.done,
        "wall_s": wall,
        "images_per_hour": 3600 * n / wall,
        "image_s": image_s,
        "driver_ms": 1000 * report.driver_seconds / n,
        "driver_share": report.driver_seconds / n / image_s,
        "wall_overhead_share": (wall * workers - sum(seconds)) / n / image_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-sd1")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (tiny-sd1 works at 128)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker / of the local loop")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray worker counts to measure")
    parser.add_argument("--gpus", action="store_true", help="one GPU per task (one worker per GPU)")
    parser.add_argument("--no-local", action="store_true")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(worker(args)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        make_images(work / "images", args.images, args.size)
        make_images(work / "warm", max(args.workers), args.size)
        for p in (work / "warm").iterdir():
            p.rename(p.with_name("warm_" + p.name))
        modes = ([] if args.no_local else ["local"]) + [f"ray{w}" for w in args.workers]
        base = [sys.executable, __file__, "--work", str(work), *_passed(args)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        results = []
        for mode in modes:
            try:
                results.append(run_worker([*base, "--mode", mode], env))
            except SystemExit as failure:  # e.g. Ray cannot start on an overloaded machine: report, go on
                print(f"{mode}: no figure: {str(failure).strip().splitlines()[-1]}")
    one = next((r for r in results if r["mode"] == "ray1"), None)
    load = os.getloadavg()
    print(f"{args.images} images of {args.size} px, {args.model}, {args.steps} steps, {args.threads} torch thread(s)")
    print(f"load average before/after: {load[0]:.2f} (1 min) {load[1]:.2f} (5 min)")
    print("| mode | images/h | vs Ray x1 | image s | driver ms/image | driver share | wall overhead/image |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['images_per_hour'] / one['images_per_hour']:.2f}x" if one else "-"
        print(
            f"| {r['mode']} | {r['images_per_hour']:.0f} | {ratio} | {r['image_s']:.2f} | {r['driver_ms']:.1f} | "
            f"{100 * r['driver_share']:.2f} % | {100 * r['wall_overhead_share']:.1f} % |"
        )


def _passed(args) -> list[str]:
    out = ["--model", args.model, "--device", args.device, "--steps", str(args.steps), "--threads", str(args.threads)]
    return out + (["--gpus"] if args.gpus else [])


if __name__ == "__main__":
    main()
