"""Localization quality in the layout of the paper's Table 3: this method (N found automatically) against k-means and
FINCH with a fixed number of clusters, both followed by the same EOT filter, scored with the paper's IoU / recall /
precision (appendix B, eqs. 18-20; uce_core/evaluate.py), averaged over seeded synthetic scenes (uce_core/synthetic.py:
clean, part-structured, noisy, same-category look-alikes, crowded). A measurement script, not a test.

    python benchmarks/bench_localize_quality.py                        # 64 x 64 grid (SD at 512 px), 3 seeds
    python benchmarks/bench_localize_quality.py --grid 32 --seeds 5    # faster
    python benchmarks/bench_localize_quality.py --delta paper --features paper
"""

from __future__ import annotations

import argparse
import statistics
import time

from concept_express.uce_core.evaluate import SUITE, format_table, run_benchmark
from concept_express.uce_core.localize import LocalizeSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, default=64, help="side of the latent grid")
    parser.add_argument("--seeds", type=int, default=3, help="scenes per scenario")
    parser.add_argument("--counts", default="4,5,6,7", help="cluster counts of the baselines")
    parser.add_argument("--delta", default="reference", choices=["reference", "paper"])
    parser.add_argument("--features", default="reference", choices=["reference", "paper"])
    parser.add_argument("--n-max", type=int, default=10)
    args = parser.parse_args()
    settings = LocalizeSettings(n_max=args.n_max, delta=args.delta, features=args.features)
    counts = tuple(int(c) for c in args.counts.split(","))
    start = time.perf_counter()
    result = run_benchmark(
        SUITE, seeds=range(args.seeds), counts=counts, settings=settings, grid=(args.grid, args.grid)
    )
    print(
        f"{len(result.per_scene)} scenes ({', '.join(SUITE)} x {args.seeds} seeds), {args.grid} x {args.grid} grid, "
        f"delta={args.delta}, features={args.features}, n_max={args.n_max}; "
        f"{time.perf_counter() - start:.0f} s\n"
    )
    print(format_table(result))
    print("\nper scenario, ours: IoU / recall / precision (%), concepts found vs objects")
    for name in SUITE:
        rows = [r for r in result.per_scene if r["scenario"] == name]
        ours = [r["ours"] for r in rows]
        print(
            f"  {name:11s} {100 * statistics.fmean(s.iou for s in ours):5.1f} "
            f"{100 * statistics.fmean(s.recall for s in ours):5.1f} "
            f"{100 * statistics.fmean(s.precision for s in ours):5.1f}   "
            f"{' '.join(f'{s.num_predicted}/{s.num_truth}' for s in ours)}"
        )


if __name__ == "__main__":
    main()
