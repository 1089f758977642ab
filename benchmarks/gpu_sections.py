"""The sections of ``gpu_run.py``, each run in a process of its own: environment, kernels, localization, training,
capture. A section gets the plan (a dict, ``gpu_run.PLANS``) and ``emit``, which records one result row (a dict); rows
are written as they come, so a section stopped at its time limit keeps what it had measured.

Times: CUDA events on a GPU (median of repeats after one warm-up call), ``perf_counter`` on the CPU. Memory: on a GPU
``torch.cuda.max_memory_allocated`` (tensors; the allocator's reserve and the CUDA context come on top), on the CPU
the process's peak resident set (``bench_capture.Meter``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_capture import Meter, load  # noqa: E402  (peak-memory meter and model loading of the capture benchmark)
from kernel_inputs import TIE_RTOL, UNIFORM_MIX  # noqa: E402  (the kernel benchmarks' input recipe and tie rule)

EXAMPLE = ROOT / "assets" / "example.png"
PACKAGES = ("torch", "triton", "diffusers", "transformers", "pot", "safetensors", "numpy", "concept-express")
# Training update modes compared: TrainSettings().update (the default, read from the code) first, then these names,
# each kept only where TrainSettings.validate() accepts it. Issue 12 makes an official-trajectory mode the default and
# renames "batched" to "averaged"; both spellings are listed so that either side of that change runs as it is.
OFFICIAL_LOOP = "reference"
OTHER_UPDATE_MODES = ("averaged", "batched")


# ---------------------------------------------------------------------------------------------------------- timing
class Timer:
    """``timer(fn)`` -> (median ms, last output, first call ms): one timed warm-up call, then repeats until about
    ``budget_s`` (at least ``min_reps``, at most ``max_reps``)."""

    def __init__(self, device: torch.device, budget_s: float, min_reps: int, max_reps: int = 20):
        self.cuda = device.type == "cuda"
        self.budget_s, self.min_reps, self.max_reps = budget_s, min_reps, max_reps

    def once(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end), out
        start = time.perf_counter()
        out = fn()
        return (time.perf_counter() - start) * 1e3, out

    def __call__(self, fn):
        first, out = self.once(fn)
        reps = int(min(self.max_reps, max(self.min_reps, self.budget_s * 1e3 / max(first, 1e-3))))
        samples = []
        for _ in range(reps):
            ms, out = self.once(fn)
            samples.append(ms)
        return statistics.median(samples), out, first


def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:500]


# ----------------------------------------------------------------------------------------------------- environment
def environment(plan, emit) -> None:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    import concept_express

    package = Path(concept_express.__file__).resolve().parent
    row = {
        "kind": "environment",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "versions": versions,
        "torch_cuda": torch.version.cuda,
        "package_path": str(package),
        "package_matches_tree": package == ROOT or _fingerprint(package) == _fingerprint(ROOT),
        "commit": _git(["rev-parse", "--short", "HEAD"]),
        "dirty": bool(_git(["status", "--porcelain", "--untracked-files=no"])),
        "device": plan["device"],
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        row.update(
            gpu=props.name,
            capability=f"sm_{props.major}{props.minor}",
            gpu_memory_gib=props.total_memory / 2**30,
            driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        )
    emit(row)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _fingerprint(folder: Path) -> str:
    """Hash of the package's Python sources (uce_kernels, uce_core, nodes and the top level), to tell whether the
    installed package is this tree."""
    h = hashlib.sha1()
    for sub in ("", "uce_kernels", "uce_core", "uce_core/backends", "nodes"):
        for path in sorted((folder / sub).glob("*.py")):
            h.update(f"{sub}/{path.name}".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _run(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def _git(args: list[str]) -> str | None:
    return _run(["git", "-C", str(ROOT), *args]) if (ROOT / ".git").exists() else None


# --------------------------------------------------------------------------------------------------------- kernels
def bumps(n: int, device: torch.device, seed: int = 0, chunk: int = 1024) -> torch.Tensor:
    """``bench_kernels.attention_like_rows``'s recipe built with torch on ``device`` (the numpy version takes ~25 s
    at n = 16384): a bump of random width around each row's own cell, a smooth shared field, noise, softmax, 0.1 %
    uniform mass. Other random numbers than the numpy version's, the same kind of rows."""
    side = int(round(n**0.5))
    assert side * side == n, "n must be a square (a latent grid)"
    g = torch.Generator(device=device).manual_seed(seed)
    axis = torch.arange(side, device=device, dtype=torch.float32)
    yx = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(n, 2)
    centres = torch.rand(6, 2, generator=g, device=device) * side
    field = sum(torch.exp(-((yx - c) ** 2).sum(1) / (2 * (side / 6) ** 2)) for c in centres)
    widths = side / 32 + torch.rand(n, generator=g, device=device) * (side / 10 - side / 32)
    rows = torch.empty(n, n, device=device)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        logits = -torch.cdist(yx[s:e], yx).square_() / (2 * widths[s:e, None] ** 2)
        logits += 3.0 * field[None, :] * field[s:e, None]
        logits += 0.3 * torch.randn(e - s, n, generator=g, device=device)
        rows[s:e] = logits.softmax(dim=1)
    return rows.mul_(1 - UNIFORM_MIX).add_(UNIFORM_MIX / n)


def float64_truth(x: torch.Tensor, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """First neighbours in float64 on x's device, and each row's relative gap between its best and second best."""
    a = x.double()
    la = a.log()
    h = (a * la).sum(1)
    kappa = torch.empty(len(a), dtype=torch.long, device=a.device)
    gap = torch.empty(len(a), dtype=torch.float64, device=a.device)
    for s in range(0, len(a), chunk):
        e = min(s + chunk, len(a))
        d = 0.5 * (h[s:e, None] + h[None, :] - a[s:e] @ la.T - la[s:e] @ a.T)
        d[torch.arange(e - s), torch.arange(s, e)] = float("inf")
        two = d.topk(2, dim=1, largest=False).values
        kappa[s:e] = d.argmin(dim=1)
        gap[s:e] = (two[:, 1] - two[:, 0]) / two[:, 0].abs()
    return kappa, gap


def plain_torch(x, l, h, tf32: bool) -> torch.Tensor:
    """What plain torch code does (a cdist-style n x n matrix): one GEMM, the symmetric sum, argmin; from the same
    shifted logs the kernel gets."""
    from concept_express.uce_kernels._device import cuda_matmul_precision

    with cuda_matmul_precision(tf32=tf32):
        g = x @ l.T
    s = h.unsqueeze(0) - g - g.T
    s.fill_diagonal_(float("inf"))
    return s.argmin(dim=1)


def kernels(plan, emit) -> None:
    from concept_express.uce_kernels import sym_kl_first_neighbours, sym_kl_torch
    from concept_express.uce_kernels._dispatch import PRECISIONS
    from concept_express.uce_kernels.sym_kl_triton import default_config, first_neighbours_triton

    device = torch.device(plan["device"])
    timer = Timer(device, plan["time_per_variant_s"], plan["min_reps"])
    for n in plan["kernel_n"]:
        x = bumps(n, device)
        truth, gap = float64_truth(x)
        ties = gap < TIE_RTOL
        ((l, h),) = sym_kl_torch.shifted_log_terms(x)
        emit({"kind": "kernel-input", "n": n, "near_ties": int(ties.sum())})
        variants = [
            (f"triton {p}, kernel", p, lambda p=p: first_neighbours_triton(x, l, h, precision=p)) for p in PRECISIONS
        ]
        variants += [
            (f"triton {p}, whole call", p, lambda p=p: sym_kl_first_neighbours(x, backend="triton", precision=p)[0])
            for p in PRECISIONS
        ]
        variants += [
            ("torch path (blocked search), whole call", "fp32", lambda: sym_kl_first_neighbours(x, backend="torch")[0]),
            ("plain torch n x n, fp32 GEMM", "fp32", lambda: plain_torch(x, l, h, tf32=False)),
            ("plain torch n x n, TF32 GEMM", "tf32", lambda: plain_torch(x, l, h, tf32=True)),
        ]
        for name, precision, fn in variants:
            row = {"kind": "kernel", "n": n, "variant": name, "precision": precision}
            try:
                with Meter(device) as meter:
                    ms, kappa, first_ms = timer(fn)
            except Exception as error:  # one failing variant (a compile error, out of memory) must not end the run
                row["error"] = _error(error)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            else:
                wrong = kappa.long() != truth
                row.update(
                    ms=ms,
                    first_ms=first_ms,
                    rows_wrong=int(wrong.sum()),
                    wrong_outside_ties=int((wrong & ~ties).sum()),
                    peak_extra_mib=meter.extra_mib,
                )
            emit(row)
        emit({"kind": "kernel-config", "n": n, "tile_config": str(default_config(device))})


# ---------------------------------------------------------------------------------------------------- localization
def localization(plan, emit) -> None:
    """The whole stage, ``localize_concepts`` with the defaults (backend "auto": Triton where it passed its
    self-check) and with the torch path, on the synthetic scene of bench_localize.py; and the self-check's cost."""
    from concept_express.uce_core.localize import LocalizeSettings, localize_concepts
    from concept_express.uce_core.synthetic import SceneSpec, make_scene
    from concept_express.uce_kernels import _dispatch, _guard

    if plan["force_triton"]:  # dry run: the interpreter stands in for the GPU, so that the guarded path runs
        _dispatch.auto_backend = lambda tensor: "triton"
    device = torch.device(plan["device"])
    timer = Timer(device, plan["time_per_variant_s"], plan["min_reps"])
    for side in plan["localize_sides"]:
        maps = make_scene(SceneSpec(grid=(side, side)), 0).maps
        maps.self_attention = maps.self_attention.to(device)
        n = side * side
        masks = {}
        for backend in ("auto", "torch"):
            settings = LocalizeSettings(device=plan["device"], backend=backend)
            _guard.reset()
            row = {"kind": "localize", "n": n, "backend": backend}
            try:
                with Meter(device) as meter:
                    ms, concepts, first_ms = timer(lambda: localize_concepts(maps, settings))
            except Exception as error:
                row["error"] = _error(error)
                emit(row)
                continue
            cold = _guard.checks()
            digest = hashlib.sha1(concepts.masks.cpu().numpy().tobytes()).hexdigest()[:12]
            masks[backend] = digest
            row.update(
                ms=ms,
                first_ms=first_ms,
                peak_extra_mib=meter.extra_mib,
                concepts=int(concepts.masks.shape[0]),
                levels=concepts.info.get("levels"),
                masks=digest,
            )
            emit(row)
            if backend == "auto":
                _guard.reset()  # check again with the kernel compiled and the CPU's expected answers cached
                localize_concepts(maps, settings)
                warm = _guard.checks()
                emit(
                    {
                        "kind": "guard",
                        "n": n,
                        "cold_checks": cold,
                        "warm_checks": warm,
                        "check_ms": 1e3 * sum(c["seconds"] for c in warm),
                        "first_check_ms": 1e3 * sum(c["seconds"] for c in cold),
                        "localize_ms": ms,
                        "refused": _guard.refused(device),
                    }
                )
        emit({"kind": "localize-agreement", "n": n, "same_masks": len(set(masks.values())) == 1 and len(masks) == 2})


# --------------------------------------------------------------------------------------------------------- models
def model(name: str, device: torch.device):
    """(backend, how it was built). ``random:CONFIG`` is a real-size architecture with random weights, built on the
    device itself where that works (2.6 billion SDXL weights take about a minute to initialise on a CPU)."""
    # Imported before the branch so that the dry run (tiny models) fails where the real-size path would.
    from concept_express.uce_core.backends.diffusers_backend import DiffusersBackend, info_from_pipeline
    from concept_express.uce_core.backends.tiny import build_random_pipeline

    if not name.startswith("random:"):
        return load(name, device, None), "tiny test model"

    config = name.split(":", 1)[1]
    start = time.perf_counter()
    try:
        with torch.device(device):
            pipe = build_random_pipeline(config)
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # its tables on the CPU, as usual
        built = f"on {device}"
    except Exception as error:  # a part that cannot be built there: build it all on the CPU
        pipe = build_random_pipeline(config)
        built = f"on the CPU ({_error(error)[:80]} on {device})"
    backend = DiffusersBackend(pipe, info_from_pipeline(pipe, name), device=device, dtype="auto")
    return backend, f"{built} in {time.perf_counter() - start:.1f} s"


def square_example(px: int):
    from PIL import Image, ImageOps

    return ImageOps.fit(Image.open(EXAMPLE).convert("RGB"), (px, px), Image.BICUBIC)


# --------------------------------------------------------------------------------------------------------- capture
def capture(plan, emit) -> None:
    """``capture_attention``'s UNet pass beside a plain UNet forward, per model and image size."""
    from concept_express.uce_core.attention import CaptureRecorder
    from concept_express.uce_core.backends.base import Prompt
    from concept_express.uce_core.images import to_tensor

    device = torch.device(plan["device"])
    timer = Timer(device, plan["time_per_variant_s"], plan["min_reps"], max_reps=plan["repeat"])
    for name in plan["capture_models"]:
        try:
            backend, built = model(name, device)
        except Exception as error:
            emit({"kind": "capture", "model": name, "error": _error(error)})
            continue
        for px in plan["capture_px"]:
            row = {"kind": "capture", "model": name, "px": px, "built": built, "dtype": str(backend.dtype)}
            try:
                with torch.no_grad():
                    latents = backend.encode_image(to_tensor(square_example(px)).to(device))
                    cond = backend.encode_prompts([Prompt.text("")])
                    t = torch.tensor([0], device=device)
                    grid = tuple(latents.shape[-2:])

                    def captured():
                        recorder = CaptureRecorder(grid, cond.eot_positions[0], device=device)
                        backend.predict(latents, t, cond, recorder)
                        return recorder.self_attention(), recorder.eot_map(grid)

                    with Meter(device) as plain_meter:
                        plain_ms, _, _ = timer(lambda: backend.predict(latents, t, cond))
                    with Meter(device) as capture_meter:
                        capture_ms, _, _ = timer(captured)
            except Exception as error:
                row["error"] = _error(error)
            else:
                n = grid[0] * grid[1]
                row.update(
                    n=n,
                    aggregate_mib=n * n * 4 / 2**20,
                    plain_ms=plain_ms,
                    capture_ms=capture_ms,
                    plain_extra_mib=plain_meter.extra_mib,
                    capture_extra_mib=capture_meter.extra_mib,
                )
            emit(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------------------------- training
def update_modes() -> list[str]:
    from concept_express.uce_core.train import TrainSettings

    modes = []
    for mode in dict.fromkeys([TrainSettings().update, OFFICIAL_LOOP, *OTHER_UPDATE_MODES]):
        try:
            TrainSettings(update=mode).validate()
        except Exception:  # a name this version of the code does not have
            continue
        modes.append(mode)
    return modes


def training(plan, emit) -> None:
    """Token learning with each update mode the code has, on hand-made band concepts (localization is not what is
    measured), ``train_steps`` steps with the merge at a fifth as in the default schedule. Steps/s over the steps
    after the first (the first one warms kernels up), and peak memory in all (the 12 GB target)."""
    from concept_express.uce_core.attention import capture_attention
    from concept_express.uce_core.concepts import Concepts
    from concept_express.uce_core.train import TrainSettings, train_concept_tokens

    device = torch.device(plan["device"])
    backend, built = model(plan["train_model"], device)
    px = plan["train_px"]
    maps = capture_attention(backend, square_example(px), resolution=px)
    h, w = maps.grid
    count = plan["concepts"]
    masks = torch.zeros(count, h, w, dtype=torch.bool)
    for i in range(count):
        masks[i, i * h // count : (i + 1) * h // count] = True
    attention = maps.self_attention.float().cpu()
    features = torch.stack([attention[m.flatten()].mean(0) for m in masks])
    concepts = Concepts(masks, features, torch.ones(count), maps.grid, maps.image, {})
    default = TrainSettings().update
    for mode in update_modes():
        steps = plan["train_steps"]
        settings = TrainSettings(steps=steps, merge_step=max(1, steps // 5), update=mode)
        stamps = []
        row = {"kind": "train", "mode": mode, "default": mode == default, "official_loop": mode == OFFICIAL_LOOP}
        row.update(model=plan["train_model"], built=built, px=px, grid=[h, w], concepts=count, steps=steps)
        row.update(merge_step=settings.merge_step, dtype=str(backend.dtype))
        try:
            with Meter(device) as meter:  # resets the peak (CUDA: allocated and reserved)
                stamps.append(time.perf_counter())
                train_concept_tokens(
                    backend, concepts, settings, progress=lambda *_: stamps.append(time.perf_counter())
                )
        except Exception as error:
            row["error"] = _error(error)
        else:
            step_s = [b - a for a, b in zip(stamps, stamps[1:])]
            later = step_s[1:] or step_s
            row.update(
                seconds=meter.seconds,
                steps_per_s=len(later) / sum(later),
                first_step_s=step_s[0],
                split_step_s=statistics.median(step_s[1 : settings.merge_step] or step_s[:1]),
                merged_step_s=statistics.median(step_s[settings.merge_step :] or step_s[-1:]),
                peak_gib=meter.peak_mib / 1024,
                extra_gib=meter.extra_mib / 1024,
            )
            if device.type == "cuda":
                row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        emit(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()


SECTIONS = {
    "environment": environment,
    "kernels": kernels,
    "localization": localization,
    "training": training,
    "capture": capture,
}
