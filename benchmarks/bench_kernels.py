"""Benchmark: symmetric-KL first neighbours, the reference's numpy form against ours, measured side by side in one run.

    python benchmarks/bench_kernels.py                 # CPU, n = 4096 (+ the GPU section when CUDA is present)
    python benchmarks/bench_kernels.py --n 4096 9216   # also n = 9216 (the reference takes ~20 s and 1.6 GiB there)
    python benchmarks/bench_kernels.py --no-oracle     # skip the float64 accuracy check
    python benchmarks/bench_kernels.py --input scene   # the localization benchmark's synthetic scene instead

CPU: each variant runs in a fresh subprocess on the same deterministic input (attention-like rows, n x n float32). Peak
memory above the input is the process's high-water mark (VmHWM) during the first call minus its resident size just
before (the mark is reset through /proc/self/clear_refs), so it counts numpy's and torch's allocations alike, as the
OS sees them. The variants alternate over --rounds rounds, one call per process; time is reported as the best and the
median call (wall clock), and the best process CPU time (user + sys, all threads: on a shared machine it is less
disturbed by other processes than wall time, though spinning threads inflate it). Variants:
  reference  ptp_utils.kld_distance + fill_diagonal(1e12) + argmin, numpy float32 (OpenBLAS), as the reference runs
  blocked    sym_kl_first_neighbours(rows) with the pruning switched off: the blocked search over every pair
  fast       sym_kl_first_neighbours(rows) on a CPU tensor, the default (pruned search), distances included
  oracle     float64 numpy, for the accuracy columns only (not timed against the others)
GPU (CUDA only): the kernel section of gpu_run.py (gpu_sections.kernels): n = d = 4096 and 16384 (--gpu-n), Triton
kernel in IEEE, TF32x3 and TF32 (kernel alone and whole call), the torch path, and plain torch (one cuBLAS GEMM +
argmin over the materialised n x n matrix, fp32 and TF32), accuracy against float64 on the GPU.
This is a measurement script, not a test.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from kernel_inputs import TIE_RTOL, UNIFORM_MIX


# ------------------------------------------------------------------------------------------------------------ input
def attention_like_rows(n: int, seed: int = 0, chunk: int = 256) -> np.ndarray:
    """n rows over an s x s grid (n = s^2): a local bump of random width around the row's own position, a smooth
    field shared by all rows (objects), per-row noise; softmax; 0.1 % uniform mass. Built in chunks so that building it leaves no
    temporary bigger than chunk x n behind (the memory baseline is taken after it)."""
    side = int(round(n**0.5))
    assert side * side == n, "n must be a square (a latent grid)"
    rng = np.random.default_rng(seed)
    yx = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1).reshape(n, 2).astype(np.float32)
    centres = rng.uniform(0, side, (6, 2))
    field = sum(np.exp(-((yx - c) ** 2).sum(1) / (2 * (side / 6) ** 2)) for c in centres).astype(np.float32)
    widths = rng.uniform(side / 32, side / 10, n).astype(np.float32)
    rows = np.empty((n, n), dtype=np.float32)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        d2 = ((yx[s:e, None, :] - yx[None, :, :]) ** 2).sum(-1)
        logits = -d2 / (2 * widths[s:e, None] ** 2) + 3.0 * field[None, :] * field[s:e, None]
        logits += rng.normal(0, 0.3, (e - s, n)).astype(np.float32)
        logits -= logits.max(axis=1, keepdims=True)
        np.exp(logits, out=logits)
        rows[s:e] = logits / logits.sum(axis=1, keepdims=True)
    # A little uniform mass, so that no entry is below the floor: preparation then leaves the rows as they are and
    # every variant computes on the very same numbers (with zeros the reference would only produce NaN).
    rows *= 1 - UNIFORM_MIX
    rows += UNIFORM_MIX / n
    return rows


# ------------------------------------------------------------------------------------------------------ CPU worker
def _memory_kib() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def reference_first_neighbours(x: np.ndarray) -> np.ndarray:
    """The reference's computation (ptp_utils.kld_distance, clustering/finch.clust_rank), verbatim in behaviour."""

    def compute_kld(mat1, mat2):
        plogp = np.sum(mat1 * np.log(mat1), axis=-1, keepdims=True)
        plogq = mat1 @ np.log(mat2).T
        return plogp - plogq

    dist = (compute_kld(x, x) + compute_kld(x, x).T) / 2
    np.fill_diagonal(dist, 1e12)
    return np.argmin(dist, axis=1)


def oracle_first_neighbours(x: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """float64: d_ij = 1/2 (h_i + h_j - a_i.log a_j - a_j.log a_i); returns argmin and the relative gap to the 2nd."""
    a = x.astype(np.float64)
    la = np.log(a)
    h = (a * la).sum(1)
    kappa = np.empty(len(a), dtype=np.int64)
    gap = np.empty(len(a))
    for s in range(0, len(a), chunk):
        e = min(s + chunk, len(a))
        d = 0.5 * (h[s:e, None] + h[None, :] - a[s:e] @ la.T - la[s:e] @ a.T)
        d[np.arange(e - s), np.arange(s, e)] = np.inf
        two = np.partition(d, 1, axis=1)[:, :2]
        kappa[s:e] = d.argmin(axis=1)
        gap[s:e] = (two[:, 1] - two[:, 0]) / np.abs(two[:, 0])
    return kappa, gap


def scene_rows(n: int) -> np.ndarray:
    """The self-attention of the localization benchmark's synthetic scene (uce_core.synthetic, seed 0) on a grid of n."""
    from concept_express.uce_core.synthetic import SceneSpec, make_scene

    side = int(round(n**0.5))
    assert side * side == n, "n must be a square (a latent grid)"
    return make_scene(SceneSpec(grid=(side, side)), 0).maps.self_attention.numpy()


INPUTS = {"bumps": attention_like_rows, "scene": scene_rows}


def cpu_worker(variant: str, n: int, threads: int, out_path: str, source: str) -> None:
    """One call of one variant in this fresh process: time, and peak memory above the input."""
    import torch

    torch.set_num_threads(threads)
    from concept_express.uce_kernels import sym_kl_first_neighbours, sym_kl_pruned

    make_rows = INPUTS[source]
    if variant == "oracle":
        kappa, gap = oracle_first_neighbours(make_rows(n))
        np.save(out_path, np.stack([kappa.astype(np.float64), gap]))
        print(json.dumps({"variant": variant}))
        return
    if variant == "reference":

        def call(x):
            return reference_first_neighbours(x)
    else:
        sym_kl_pruned.ENABLED = variant == "fast"

        def call(x):
            return sym_kl_first_neighbours(torch.from_numpy(x))[0].numpy()

    call(attention_like_rows(256, seed=1))  # load libraries, BLAS buffers, thread pools
    x = make_rows(n)
    _reset_peak()
    before = _memory_kib()["VmRSS"]
    start, cpu_start = time.perf_counter(), time.process_time()
    kappa = call(x)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = _memory_kib()["VmHWM"] - before
    np.save(out_path, kappa)
    print(
        json.dumps(
            {
                "variant": variant,
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "peak_above_input_mib": peak / 1024,
                "input_mib": x.nbytes / 2**20,
                "load": os.getloadavg()[0],
            }
        )
    )


def _worker(variant: str, n: int, threads: int, path: str, source: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--n",
        str(n),
        "--threads",
        str(threads),
        "--out",
        path,
        "--input",
        source,
    ]
    env = dict(
        os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads)
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"worker {variant} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cpu(sizes, rounds: int, threads: int, oracle: bool, source: str) -> None:
    """Rounds alternate the variants (reference, blocked, fast, reference, ...), each call in a fresh process, so that
    all see the same machine conditions; we report the best and the median call, and the largest peak."""
    print(
        f"\n== CPU: {threads} threads, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start, "
        f"input {source!r} =="
    )
    variants = ("reference", "blocked", "fast")
    for n in sizes:
        runs = {v: [] for v in variants}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(rounds):
                for v in variants:
                    runs[v].append(_worker(v, n, threads, os.path.join(tmp, f"{v}.npy"), source))
            kappas = {v: np.load(os.path.join(tmp, f"{v}.npy")) for v in variants}
            if oracle:
                _worker("oracle", n, threads, os.path.join(tmp, "oracle.npy"), source)
                kappa64, gap = np.load(os.path.join(tmp, "oracle.npy"))
        stats = {
            v: {
                "best": min(r["seconds"] for r in runs[v]),
                "median": statistics.median(r["seconds"] for r in runs[v]),
                "cpu": min(r["cpu_seconds"] for r in runs[v]),
                "peak": max(r["peak_above_input_mib"] for r in runs[v]),
            }
            for v in variants
        }
        loads = [r["load"] for v in variants for r in runs[v]]
        print(
            f"\nn = {n} (input {runs['fast'][0]['input_mib']:.0f} MiB float32), {rounds} rounds, "
            f"load average during the calls {min(loads):.2f}..{max(loads):.2f}"
        )
        print(f"{'variant':<11}{'best s':>9}{'median s':>10}{'best CPU s':>12}{'peak MiB above input':>22}")
        for v in variants:
            r = stats[v]
            print(f"{v:<11}{r['best']:>9.3f}{r['median']:>10.3f}{r['cpu']:>12.3f}{r['peak']:>22.1f}")
        ref = stats["reference"]
        for v in ("blocked", "fast"):
            r = stats[v]
            print(
                f"speed-up reference/{v}: {ref['best'] / r['best']:.2f}x (best), "
                f"{ref['median'] / r['median']:.2f}x (median), {ref['cpu'] / r['cpu']:.2f}x (CPU time); "
                f"memory {v}/reference: {r['peak'] / ref['peak']:.2f}"
            )
            print(f"first neighbours differing, {v} vs reference: {(kappas[v] != kappas['reference']).sum()} of {n}")
        if oracle:
            kappa64 = kappa64.astype(np.int64)
            ties = gap < TIE_RTOL
            for v in variants:
                wrong = kappas[v] != kappa64
                print(
                    f"{v} vs float64: {wrong.sum()} rows differ, {(wrong & ~ties).sum()} of them outside near ties "
                    f"(relative gap < {TIE_RTOL:g}: {ties.sum()} rows)"
                )


# -------------------------------------------------------------------------------------------------------------- GPU
def run_gpu(sizes: list[int]) -> None:
    """The kernel section of gpu_run.py (gpu_sections.kernels) on its own, printed as a table."""
    from gpu_sections import kernels

    print("\n== GPU ==")
    print(f"{'n':>6} {'variant':<42}{'median ms':>10}{'rows != float64':>17}{'outside ties':>14}{'peak MiB':>10}")
    plan = {"device": "cuda", "kernel_n": sizes, "time_per_variant_s": 1.0, "min_reps": 3}

    def show(row: dict) -> None:
        if row["kind"] == "kernel-input":
            print(f"n = {row['n']}: {row['near_ties']} rows are near ties (relative gap < {TIE_RTOL:g})")
        elif row["kind"] == "kernel-config":
            print(f"Triton tile config: {row['tile_config']}")
        elif "error" in row:
            print(f"{row['n']:>6} {row['variant']:<42}{row['error']}")
        else:
            print(
                f"{row['n']:>6} {row['variant']:<42}{row['ms']:>10.3f}{row['rows_wrong']:>17}"
                f"{row['wrong_outside_ties']:>14}{row['peak_extra_mib']:>10.1f}"
            )

    kernels(plan, show)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[4096], help="CPU sizes (squares), e.g. 4096 9216")
    parser.add_argument("--gpu-n", type=int, nargs="+", default=[4096, 16384], help="GPU sizes (squares)")
    parser.add_argument("--rounds", type=int, default=3, help="CPU: calls per variant, alternating")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-oracle", action="store_true", help="skip the float64 accuracy columns on the CPU")
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument(
        "--input",
        choices=sorted(INPUTS),
        default="bumps",
        help="CPU rows: attention-like bumps (default) or the synthetic scene of bench_localize",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        cpu_worker(args.worker, args.n[0], args.threads, args.out, args.input)
        return
    if not args.skip_cpu:
        run_cpu(args.n, args.rounds, args.threads, oracle=not args.no_oracle, source=args.input)
    import torch

    if torch.cuda.is_available():
        run_gpu(args.gpu_n)
    else:
        print("\n== GPU: no CUDA device here; GPU section skipped ==")


if __name__ == "__main__":
    main()
