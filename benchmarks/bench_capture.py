"""Attention capture: time and peak extra memory, side by side with a plain UNet forward and with the reference's
store-every-layer-then-stack approach, in one run. A benchmark, not a test.

    python benchmarks/bench_capture.py                          # tiny-sd1 at its 128 px
    python benchmarks/bench_capture.py --model random:sd2-base  # SD2.1-base architecture, random weights, 512 px
    python benchmarks/bench_capture.py --model path/to/model.safetensors --device cuda

Each mode runs in a fresh process on the same prepared latents (the VAE encode is not timed). "Extra memory" is the
peak during the call minus the memory in use just before it (model weights, inputs): on CUDA from torch.cuda.max_memory_allocated, on CPU from the process's peak resident
set (VmHWM, reset through /proc/self/clear_refs before the call). Modes:

* plain      — one UNet forward with the normal fused attention (what any denoising step costs);
* capture    — the capture pass of ``capture_attention``: explicit probabilities, folded into one n x n float32
               aggregate on the fly, and the EOT map;
* stacked    — the reference's approach: keep every self-attention layer's map, then upsample all of them into a
               stack of n x n maps and sum. Kept here as head means in float32, so it is a lower bound of what the
               reference holds (it keeps every head, ~0.9 GiB fp16, then a 16 x n x n stack).

Results are recorded in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("plain", "capture", "stacked")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class Meter:
    """Peak extra memory of a block, in MiB."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
            self.base = _rss_kib("VmRSS") * 1024
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _rss_kib("VmHWM") * 1024
        self.seconds = time.perf_counter() - self.start
        self.extra_mib = (peak - self.base) / 2**20
        self.peak_mib = peak / 2**20  # everything in use at the peak (CUDA: allocated tensors; CPU: resident set)


def run_worker(cmd: list[str], env: dict | None = None) -> dict:
    """Run one measurement in a fresh process; its last stdout line is its JSON result."""
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd[1:4])} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class StackingRecorder:
    """The reference's way: keep each self-attention layer's map, upsample and stack them all at the end."""

    def __init__(self, target):
        self.target, self.layers = target, []

    def wants(self, layer):
        return layer.kind == "self"

    def record(self, layer, probs):
        self.layers.append((probs[0].clone(), layer.grid))

    def finish(self):
        import torch
        import torch.nn.functional as F

        th, tw = self.target
        stack = []
        for probs, (rh, rw) in self.layers:
            keys = F.interpolate(probs.view(1, -1, rh, rw), size=(th, tw), mode="bilinear", align_corners=False)
            keys = keys.view(rh, rw, th * tw).repeat_interleave(th // rh, 0).repeat_interleave(tw // rw, 1)
            stack.append(keys.reshape(th * tw, th * tw) * (rh / th))
        total = torch.stack(stack).sum(0)
        return total / total.sum(-1, keepdim=True)


def load(model: str, device, dtype):

    from concept_express.uce_core.backends.diffusers_backend import DiffusersBackend, info_from_pipeline
    from concept_express.uce_core.backends.loading import load_backend
    from concept_express.uce_core.backends.tiny import build_random_pipeline

    if model.startswith("random:"):
        pipe = build_random_pipeline(model.split(":", 1)[1])
        return DiffusersBackend(pipe, info_from_pipeline(pipe, model), device=device, dtype=dtype or "auto")
    return load_backend(model, device=device, dtype=dtype or "auto")


def worker(args) -> dict:
    import torch

    from concept_express.uce_core.attention import CaptureRecorder
    from concept_express.uce_core.backends.base import Prompt
    from concept_express.uce_core.images import fit_to_model, load_image, to_tensor

    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device(args.device)
    backend = load(args.model, device, args.dtype)
    picture = fit_to_model(load_image(args.image), args.resolution or backend.info.resolution)
    with torch.no_grad():
        latents = backend.encode_image(to_tensor(picture).to(device))
        cond = backend.encode_prompts([Prompt.text("")])
        t = torch.tensor([0], device=device)

        def run():
            if args.mode == "plain":
                backend.predict(latents, t, cond)
            elif args.mode == "capture":
                recorder = CaptureRecorder(tuple(latents.shape[-2:]), cond.eot_positions[0], device=device)
                backend.predict(latents, t, cond, recorder)
                recorder.self_attention()
                recorder.eot_map(tuple(latents.shape[-2:]))
            else:
                recorder = StackingRecorder(tuple(latents.shape[-2:]))
                backend.predict(latents, t, cond, recorder)
                recorder.finish()

        run()  # warm-up
        times, extras = [], []
        for _ in range(args.repeat):
            with Meter(device) as meter:
                run()
            times.append(meter.seconds)
            extras.append(meter.extra_mib)
    n = latents.shape[-2] * latents.shape[-1]
    return {
        "mode": args.mode,
        "seconds": statistics.median(times),
        "extra_mib": max(extras),
        "n": n,
        "aggregate_mib": n * n * 4 / 2**20,
        "size": list(picture.size),
        "device": str(device),
        "model": args.model,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-sd1", help="tiny-sd1, random:sd2-base, a checkpoint or folder")
    parser.add_argument("--image", default=str(Path(__file__).resolve().parent.parent / "assets" / "example.png"))
    parser.add_argument("--resolution", type=int, help="working resolution (default: the model's)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], help="precision policy (default auto)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # worker process
    args = parser.parse_args()
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
            "--image",
            args.image,
            "--device",
            args.device,
            "--repeat",
            str(args.repeat),
        ]
        cmd += ["--resolution", str(args.resolution)] if args.resolution else []
        cmd += ["--dtype", args.dtype] if args.dtype else []
        rows[mode] = run_worker(cmd)
    first = next(iter(rows.values()))
    print(
        f"model {first['model']} on {first['device']}, image {first['size'][0]}x{first['size'][1]} px, "
        f"n = {first['n']} (aggregate {first['aggregate_mib']:.0f} MiB), median of {args.repeat}"
    )
    print(f"{'mode':10s} {'time s':>9s} {'extra MiB':>10s} {'extra / aggregate':>18s}")
    for mode, r in rows.items():
        print(f"{mode:10s} {r['seconds']:9.3f} {r['extra_mib']:10.1f} {r['extra_mib'] / r['aggregate_mib']:18.2f}")
    if "capture" in rows and "stacked" in rows:
        c, s = rows["capture"], rows["stacked"]
        print(
            f"capture vs stacked: {s['extra_mib'] / max(c['extra_mib'], 1e-9):.1f}x less extra memory, "
            f"{s['seconds'] / c['seconds']:.2f}x the speed"
        )
    if "capture" in rows and "plain" in rows:
        print(f"capture vs plain forward: {rows['capture']['seconds'] / rows['plain']['seconds']:.2f}x the time")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
