"""Training memory per prompt at real model sizes: the estimate the micro-batch is chosen from (bytes autograd
saves for the backward pass, ``uce_core/memory.py``) against the peak memory one micro-batch's forward + backward
really takes. A benchmark, not a test.

    python benchmarks/bench_memory.py --model random:sd2-base --size 512 --batches 1,2     # CPU, about 5 minutes
    python benchmarks/bench_memory.py --model random:sd2-base --device cuda --batches 1,2,4,8

Each micro-batch runs in a fresh process: the model (random weights, real architecture), one hand-made concept,
the training forward (text encoder, UNet, losses, attention recording for the alignment term) on m prompts with one
copy of the vectors per prompt, then its backward pass. Reported per m: saved bytes (the estimate's input), the peak
above the memory in use just before (CPU: the resident set's high-water mark VmHWM, reset through
/proc/self/clear_refs; CUDA: max_memory_allocated), and the peak in all. Results go in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_capture import Meter, load, run_worker  # noqa: E402


def worker(args) -> dict:
    import torch

    from concept_express.uce_core.concepts import Concepts
    from concept_express.uce_core.memory import saved_bytes
    from concept_express.uce_core.train import TrainSettings, _Run

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = torch.device(args.device)
    backend = load(args.model, device, args.dtype)
    side = args.size // backend.info.vae_scale_factor
    masks = torch.zeros(1, side, side, dtype=torch.bool)
    masks[0, side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = True
    features = torch.full((1, side * side), 1.0 / (side * side))
    image = torch.full((args.size, args.size, 3), 128, dtype=torch.uint8)
    concepts = Concepts(masks, features, torch.ones(1), (side, side), image, {})
    run = _Run(backend, concepts, TrainSettings(split_tokens=1, micro_batch=args.batch))
    m = args.batch
    items = (run.items() * m)[:m]
    draws = run.draw(m)

    def forward():
        copies = [v.detach().unsqueeze(0).repeat(m, 1, 1).requires_grad_() for v in run.vectors]
        denoise, attention, _ = run.forward(items, draws, slice(0, m), copies)
        return (denoise + 1e-5 * attention).sum()

    saved = saved_bytes(forward)
    with Meter(device) as meter:
        forward().backward()
    return {
        "batch": m,
        "saved_gib": saved / 2**30,
        "extra_gib": meter.extra_mib / 1024,
        "peak_gib": meter.peak_mib / 1024,
        "seconds": meter.seconds,
        "latent": side,
        "precision": backend.precision.describe(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:sd2-base")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")
    parser.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--batches", default="1,2")
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch:
        print(json.dumps(worker(args)))
        return
    rows = []
    for m in [int(x) for x in args.batches.split(",")]:
        cmd = [sys.executable, __file__, "--batch", str(m), "--model", args.model, "--device", args.device]
        cmd += ["--size", str(args.size), "--threads", str(args.threads)] + (
            ["--dtype", args.dtype] if args.dtype else []
        )
        rows.append(run_worker(cmd))
        r = rows[-1]
        print(
            f"m={m}: saved {r['saved_gib']:.2f} GiB, peak above start {r['extra_gib']:.2f} GiB, "
            f"peak in all {r['peak_gib']:.2f} GiB, {r['seconds']:.1f} s",
            flush=True,
        )
    print(f"model {args.model} at {args.size} px (latent {rows[0]['latent']}), {rows[0]['precision']}")
    for a, b in zip(rows, rows[1:]):
        saved = (b["saved_gib"] - a["saved_gib"]) / (b["batch"] - a["batch"])
        extra = (b["extra_gib"] - a["extra_gib"]) / (b["batch"] - a["batch"])
        print(
            f"per prompt (m={a['batch']}->{b['batch']}): saved {saved:.3f} GiB, peak {extra:.3f} GiB, "
            f"peak / saved {extra / saved:.2f}"
        )


if __name__ == "__main__":
    main()
