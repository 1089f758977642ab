"""Token learning throughput, peak memory and trajectory: the three update orders side by side at equal settings.
A benchmark, not a test.

    python benchmarks/bench_train.py                                   # tiny-sd1, CPU
    python benchmarks/bench_train.py --model random:sd2-base --device cuda --concepts 5
    python benchmarks/bench_train.py --extract                         # the CPU demo: extract end to end, timed

Modes: ``reference`` (the official loop: one forward, backward and AdamW step per prompt), ``sequential`` (the
default: the same updates in the same order, every prompt's gradient from one batched pass at the step's start) and
``averaged`` (one update per step). Each mode runs in a fresh process: model load, capture of the example image,
N hand-made concepts (horizontal bands; localization is not what is measured), then ``--steps`` training steps,
split phase and merged phase in the proportion of the default schedule (merge at 1/5 of the steps). Reported: steps
per second over all steps, peak memory (``bench_capture.Meter``): CUDA ``max_memory_allocated`` or, on CPU, the
process's peak resident set (VmHWM), in all (the 12 GB target is on this) and above what was in use before
training; steps per CPU second of the process (meaningful on a shared machine with ``--threads 1``); and the
trajectory distance: the relative L2 distance of each mode's displacement (final tokens minus
the merged starting tokens, all concepts) from the reference's. Results go in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_capture import Meter, load, run_worker  # noqa: E402  (shared with the capture benchmark)


def worker(args) -> dict:
    import torch

    from concept_express.uce_core.attention import capture_attention
    from concept_express.uce_core.concepts import Concepts
    from concept_express.uce_core.train import TrainSettings, _Run, train_concept_tokens

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = torch.device(args.device)
    backend = load(args.model, device, args.dtype)
    maps = capture_attention(backend, str(ROOT / "assets" / "example.png"), resolution=args.resolution)
    h, w = maps.grid
    masks = torch.zeros(args.concepts, h, w, dtype=torch.bool)
    for i in range(args.concepts):
        masks[i, i * h // args.concepts : (i + 1) * h // args.concepts] = True
    features = torch.stack([maps.self_attention[m.flatten()].mean(0) for m in masks])
    concepts = Concepts(masks, features, torch.ones(args.concepts), maps.grid, maps.image, {})
    settings = TrainSettings(
        steps=args.steps,
        merge_step=max(1, args.steps // 5),
        update=args.mode,
        micro_batch=args.micro_batch,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    start = [
        v.detach().view(settings.split_tokens, args.concepts, -1).mean(0).cpu()
        for v in _Run(backend, concepts, settings).vectors
    ]
    notes = []
    progress = lambda step, total, info: notes.append(info["note"]) if "note" in info else None
    cpu = time.process_time()
    with Meter(device) as meter:
        tokens = train_concept_tokens(backend, concepts, settings, progress=progress)
    cpu = time.process_time() - cpu
    displacement = torch.cat([(v - s).flatten() for v, s in zip(tokens.vectors, start)])
    return {
        "displacement": displacement.tolist(),
        "notes": notes,
        "mode": args.mode,
        "steps_per_s": args.steps / meter.seconds,
        "steps_per_cpu_s": args.steps / cpu,
        "seconds": meter.seconds,
        "extra_gib": meter.extra_mib / 1024,
        "peak_gib": meter.peak_mib / 1024,
        "grid": [h, w],
        "device": str(device),
        "model": args.model,
    }


def extract_demo() -> None:
    """Time the README's main job: concept-express extract --demo (tiny-sd1, CPU), end to end."""
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "concept_express.uce_core.cli", "extract", "--demo", "--out", out],
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - started
    print(result.stdout.strip())
    if result.returncode:
        print(result.stderr.strip())
    print(f"extract --demo: {seconds:.1f} s wall clock, exit code {result.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-sd1")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")
    parser.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], help="precision policy (default auto)")
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--concepts", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--micro-batch", type=int, default=0)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--modes", default="reference,sequential,averaged")
    parser.add_argument("--extract", action="store_true", help="time the CPU demo extract instead")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.extract:
        extract_demo()
        return
    if args.mode:
        print(json.dumps(worker(args)))
        return
    rows = {}
    for mode in args.modes.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--mode",
            mode,
            "--model",
            args.model,
            "--device",
            args.device,
            "--concepts",
            str(args.concepts),
            "--steps",
            str(args.steps),
            "--micro-batch",
            str(args.micro_batch),
        ]
        cmd += ["--threads", str(args.threads)] + (["--dtype", args.dtype] if args.dtype else [])
        cmd += ["--resolution", str(args.resolution)] if args.resolution else []
        cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
        rows[mode] = run_worker(cmd)
    first = next(iter(rows.values()))
    print(
        f"model {first['model']} on {first['device']}, latent grid {first['grid'][0]}x{first['grid'][1]}, "
        f"N = {args.concepts}, {args.steps} steps (merge at {max(1, args.steps // 5)})"
    )
    import torch

    reference = torch.tensor(rows["reference"]["displacement"]) if "reference" in rows else None
    print(
        f"{'mode':10s} {'steps/s':>9s} {'seconds':>9s} {'steps/CPU s':>12s} {'extra GiB':>10s} {'peak GiB':>9s} "
        f"{'vs reference':>13s}"
    )
    for mode, r in rows.items():
        distance = ""
        if reference is not None:
            distance = f"{float((torch.tensor(r['displacement']) - reference).norm() / reference.norm()):13.3f}"
        print(
            f"{mode:10s} {r['steps_per_s']:9.3f} {r['seconds']:9.1f} {r['steps_per_cpu_s']:12.3f} "
            f"{r['extra_gib']:10.2f} {r['peak_gib']:9.2f} "
            f"{distance}"
        )
    for mode, r in rows.items():
        for note in r["notes"]:
            print(f"{mode}: {note}")
    if "reference" in rows:
        for mode in rows:
            if mode != "reference":
                ratio = rows[mode]["steps_per_s"] / rows["reference"]["steps_per_s"]
                cpu = rows[mode]["steps_per_cpu_s"] / rows["reference"]["steps_per_cpu_s"]
                print(f"{mode} vs reference: {ratio:.2f}x the steps/s, {cpu:.2f}x the steps per CPU second")
    print("vs reference: |displacement - reference's| / |reference's displacement| (final minus starting tokens)")


if __name__ == "__main__":
    main()
