"""How well concepts are localized: the paper's metrics (appendix B, eqs. 18-20) and a Table-3-style benchmark on
synthetic scenes (``synthetic.py``) comparing this method with k-means and FINCH at fixed cluster counts, both
followed by the same EOT filter (eq. 5), as in the paper's section 4.5.

Metrics, for N predicted masks and M ground-truth masks: the Hungarian assignment of predictions to truths
maximising the total IoU (M' = min(N, M) pairs); IoU = (sum of the matched IoUs) / N (eq. 18 divides by N, so an
extra prediction costs IoU); R = number of matched pairs with IoU > 0 (eq. 19); recall = R / M, precision = R / N
(eq. 20). With no prediction (N = 0, e.g. when localization finds nothing) all three are 0.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import numpy as np
import torch

from ..uce_kernels import cluster_means
from .errors import ConceptExpressError
from .finch import finch, finch_with_count
from .localize import LocalizeSettings, localize_concepts, normalised_eot
from .regions import eot_scores, masks_of, relabel
from .synthetic import Scene, SceneSpec, make_scene


@dataclass(frozen=True)
class LocalizationScore:
    iou: float
    recall: float
    precision: float
    num_predicted: int
    num_truth: int
    matches: tuple[tuple[int, int, float], ...] = ()  # (prediction, truth, IoU) of the assignment


def iou_matrix(predicted: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """(N, M) float64 IoU of every predicted mask with every ground-truth mask (0 where both are empty)."""
    p = predicted.reshape(predicted.shape[0], -1).double()
    t = truth.reshape(truth.shape[0], -1).double()
    inter = p @ t.T
    union = p.sum(1)[:, None] + t.sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter)).numpy()


def score_masks(predicted: torch.Tensor, truth: torch.Tensor) -> LocalizationScore:
    """Eqs. 18-20 for (N, h, w) predicted and (M, h, w) ground-truth boolean masks (M >= 1)."""
    from scipy.optimize import linear_sum_assignment

    n, m = int(predicted.shape[0]), int(truth.shape[0])
    if m == 0:
        raise ValueError("the ground truth needs at least one mask")
    if predicted.shape[1:] != truth.shape[1:]:
        raise ValueError(f"mask sizes differ: {tuple(predicted.shape[1:])} vs {tuple(truth.shape[1:])}")
    if n == 0:
        return LocalizationScore(0.0, 0.0, 0.0, 0, m)
    ious = iou_matrix(predicted.bool(), truth.bool())
    rows, cols = linear_sum_assignment(ious, maximize=True)
    matched = ious[rows, cols]
    hits = int((matched > 0).sum())
    matches = tuple((int(r), int(c), float(v)) for r, c, v in zip(rows, cols, matched))
    return LocalizationScore(float(matched.sum()) / n, hits / m, hits / n, n, m, matches)


def kmeans(rows: torch.Tensor, k: int, seed: int = 0, iterations: int = 100) -> torch.Tensor:
    """Seeded Euclidean k-means (k-means++ seeding, Lloyd iterations until the labels stop changing); labels (n,)
    numbered in order of each cluster's first row. A cluster that empties keeps its previous centre."""
    x = rows.float()
    n = x.shape[0]
    k = min(k, n)
    generator = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(n, (1,), generator=generator)]
    nearest = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        weights = nearest.double() if float(nearest.sum()) > 0 else torch.ones(n, dtype=torch.float64)
        pick = torch.multinomial(weights, 1, generator=generator)
        centres = torch.cat([centres, x[pick]])
        nearest = torch.minimum(nearest, ((x - x[pick]) ** 2).sum(1))
    labels = None
    for _ in range(iterations):
        new = ((centres * centres).sum(1)[None, :] - 2 * x @ centres.T).argmin(1)  # |x|^2 does not change the argmin
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        counts = torch.bincount(labels, minlength=k)
        centres = torch.where((counts > 0)[:, None], cluster_means(x, labels, k), centres)
    _, first = np.unique(labels.numpy(), return_index=True)
    order = torch.full((k,), -1, dtype=torch.long)
    order[labels[torch.from_numpy(np.sort(first))]] = torch.arange(len(first))
    return order[labels]


def eot_filtered_masks(scene: Scene, labels: torch.Tensor, k: int) -> torch.Tensor:
    """The masks of the clusters that pass the EOT filter (eq. 5), as the paper does for its baselines."""
    eot = normalised_eot(scene.maps, labels.device).reshape(-1)
    kept = torch.nonzero(eot_scores(eot, labels, k) > 1.0).flatten()
    mapping = torch.full((k,), -1, dtype=torch.long)
    mapping[kept] = torch.arange(kept.numel())
    return masks_of(relabel(labels, mapping), kept.numel(), scene.maps.grid)


def predictions(
    scene: Scene, counts=(4, 5, 6, 7), settings: LocalizeSettings = LocalizeSettings()
) -> dict[str, torch.Tensor]:
    """Predicted masks of every method on one scene: "ours" (``localize_concepts`` end to end), and "kmeans-c" and
    "finch-c" (c clusters, then the EOT filter; one FINCH hierarchy serves every c). A method that finds nothing
    predicts no mask."""
    nothing = torch.zeros((0, *scene.maps.grid), dtype=torch.bool)
    rows = scene.maps.self_attention
    out = {}
    for count in counts:
        out[f"kmeans-{count}"] = _filtered(scene, kmeans(rows, count, seed=scene.seed))
    hierarchy = finch(rows, settings.kernel)
    for count in counts:
        out[f"finch-{count}"] = _filtered(scene, finch_with_count(rows, count, hierarchy, settings.kernel))
    try:
        out["ours"] = localize_concepts(scene.maps, settings).masks
    except ConceptExpressError:
        out["ours"] = nothing
    return out


def _filtered(scene: Scene, labels: torch.Tensor) -> torch.Tensor:
    try:
        return eot_filtered_masks(scene, labels, int(labels.max()) + 1)
    except ConceptExpressError:  # a constant EOT map
        return torch.zeros((0, *scene.maps.grid), dtype=torch.bool)


SUITE = {
    "clean": SceneSpec(feature_noise=0.2, logit_noise=0.2),
    "parts": SceneSpec(parts=True),
    "noisy": SceneSpec(feature_noise=0.6, logit_noise=0.6, eot_noise=0.1),
    "lookalikes": SceneSpec(lookalikes=2),
    "crowded": SceneSpec(objects=(5, 6), background_regions=3),
}


@dataclass
class BenchmarkResult:
    methods: list[str]
    mean: dict[str, dict[str, float]]  # method -> {"iou", "recall", "precision", "concepts"}
    per_scene: list[dict] = field(default_factory=list)


def run_benchmark(
    scenarios: dict[str, SceneSpec] = SUITE,
    seeds: range = range(4),
    counts=(4, 5, 6, 7),
    settings: LocalizeSettings = LocalizeSettings(),
    grid: tuple[int, int] | None = None,
) -> BenchmarkResult:
    """Every method on every (scenario, seed) scene; metrics averaged over scenes (as Table 3 averages over images)."""
    methods = [f"kmeans-{c}" for c in counts] + [f"finch-{c}" for c in counts] + ["ours"]
    per_scene = []
    for name, spec in scenarios.items():
        if grid is not None:
            spec = SceneSpec(**{**spec.__dict__, "grid": tuple(grid)})
        for seed in seeds:
            scene = make_scene(spec, seed)
            row = {"scenario": name, "seed": seed, "objects": int(scene.truth.shape[0])}
            for method, masks in predictions(scene, counts, settings).items():
                row[method] = score_masks(masks, scene.truth)
            per_scene.append(row)
    mean = {}
    for method in methods:
        scores = [row[method] for row in per_scene]
        mean[method] = {
            "iou": statistics.fmean(s.iou for s in scores),
            "recall": statistics.fmean(s.recall for s in scores),
            "precision": statistics.fmean(s.precision for s in scores),
            "concepts": statistics.fmean(s.num_predicted for s in scores),
        }
    return BenchmarkResult(methods, mean, per_scene)


def format_table(result: BenchmarkResult) -> str:
    """Table 3 layout: one column per method, rows IoU / Recall / Precision (in %) and the mean concept count."""
    head = "| metric | " + " | ".join(result.methods) + " |"
    rule = "|---|" + "---|" * len(result.methods)
    lines = [head, rule]
    for key, label, scale in (
        ("iou", "IoU", 100),
        ("recall", "Recall", 100),
        ("precision", "Precision", 100),
        ("concepts", "concepts found", 1),
    ):
        values = [result.mean[m][key] * scale for m in result.methods]
        lines.append(f"| {label} | " + " | ".join("-" if math.isnan(v) else f"{v:.1f}" for v in values) + " |")
    return "\n".join(lines)
