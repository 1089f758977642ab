"""Stage 2: from ``AttentionMaps`` to ``Concepts`` (paper sec. 3.2; reference-spec 1.6-1.8).

1. Pre-clustering: the FINCH hierarchy of the self-attention rows under symmetric KL (``finch.finch``).
2. Level choice: the level with N' clusters, the reference's rule (the last level with >= n_max clusters), and the
   threshold delta from the graph that formed it (``level_delta``).
3. EOT filter (eq. 5): keep a pre-cluster iff its mean end-of-text activation exceeds the grid's mean.
4. Post-clustering: FINCH over the kept regions with the delta cut and the touching constraint
   (``finch.constrained_finch``); each final concept is a union of regions with its mean attention f_i.
5. Optional: concepts under a minimum area are dropped or merged into the touching concept nearest in attention.

Where the reference crashes, this does a documented sensible thing instead (docs/deviations.md, "Stage 2").
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from ..uce_kernels import cluster_means, prepare_distributions, sym_kl_distances
from .attention import AttentionMaps
from .concepts import Concepts
from .errors import ConceptExpressError
from .finch import Hierarchy, KernelOptions, constrained_finch, finch
from .regions import areas, eot_scores, masks_of, region_means, relabel, touching

DELTAS = ("reference", "paper")
FEATURES = ("reference", "paper")
SMALL_REGIONS = ("drop", "merge")
FLAT_EOT = 1e-5  # an EOT map whose range is below this fraction of its magnitude counts as constant


@dataclass(frozen=True)
class LocalizeSettings:
    """Settings of the localization stage. The defaults reproduce the reference.

    n_max: upper limit of concepts N_max; the pre-clustering level is the last one with >= n_max clusters.
    delta: "reference" = max over the edges of the graph that formed that level of count * d (a mutual first-neighbour
        pair counts twice); "paper" = the largest d over the same edges ("largest intra-cluster distance").
    features: f_i of a merged concept; "reference" = unweighted mean of its candidate regions' f; "paper" = eq. 6, the
        mean attention row over all its cells (area-weighted), also used for the merging itself.
    min_area: concepts covering less than this fraction of the grid are handled by ``small`` (0 = off).
    small: "drop" them, or "merge" each into the touching concept nearest in symmetric KL (dropped if it touches none).
    backend / precision / mode: the first-neighbour kernel (``uce_kernels.sym_kl_first_neighbours``).
    device: where to compute ("cpu", "cuda", ...); None = where the attention maps are.
    """

    n_max: int = 10
    delta: str = "reference"
    features: str = "reference"
    min_area: float = 0.0
    small: str = "drop"
    backend: str = "auto"
    precision: str = "ieee"
    mode: str = "fast"
    device: str | None = None

    def __post_init__(self):
        checks = [
            (isinstance(self.n_max, int) and self.n_max >= 1, f"n_max must be a positive integer, got {self.n_max!r}"),
            (self.delta in DELTAS, f"delta must be one of {DELTAS}, got {self.delta!r}"),
            (self.features in FEATURES, f"features must be one of {FEATURES}, got {self.features!r}"),
            (0.0 <= self.min_area < 1.0, f"min_area is a fraction of the grid in [0, 1), got {self.min_area!r}"),
            (self.small in SMALL_REGIONS, f"small must be one of {SMALL_REGIONS}, got {self.small!r}"),
            (
                self.backend in ("auto", "torch", "triton"),
                f"backend must be auto, torch or triton, got {self.backend!r}",
            ),
            (
                self.precision in ("ieee", "tf32x3", "tf32"),
                f"precision must be ieee, tf32x3 or tf32, got {self.precision!r}",
            ),
            (self.mode in ("fast", "reference"), f"mode must be fast or reference, got {self.mode!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConceptExpressError(message)

    @property
    def kernel(self) -> KernelOptions:
        return KernelOptions(self.backend, self.precision, self.mode)


@dataclass(frozen=True)
class LevelChoice:
    index: int
    rule: str


def choose_level(counts: list[int], n_max: int) -> LevelChoice:
    """The pre-clustering level (reference train.py: the first i with counts[i] >= n_max > counts[i+1]; counts
    decrease, so the last level with >= n_max clusters). Where the reference crashes: no level has >= n_max clusters
    -> level 0, the finest; every level has >= n_max -> the last, the coarsest."""
    for i in range(len(counts) - 1):
        if counts[i] >= n_max and counts[i + 1] < n_max:
            return LevelChoice(i, "reference")
    if counts[0] < n_max:
        return LevelChoice(0, "finest level: no level has >= n_max clusters")
    return LevelChoice(len(counts) - 1, "coarsest level: every level has >= n_max clusters")


def level_delta(hierarchy: Hierarchy, index: int, rows: torch.Tensor, definition: str = "reference") -> float:
    """delta of the chosen level, from the first-neighbour graph that formed it (over the centroids of level
    index-1): "reference" = max count * d over its edges, "paper" = max d.

    Level 0 (where the reference has no delta) uses the graph over the grid cells, first-neighbour edges only: pairs
    of cells sharing a first neighbour can number O(n^2) there. A single node gives 0."""
    level = hierarchy.levels[index]
    if level.graph is None:
        return 0.0
    if index == 0:
        edges = level.graph.edges()
    else:
        edges = level.graph.edges(hierarchy.centroids(index - 1, rows))
    weights = edges.count if definition == "reference" else torch.ones_like(edges.count)
    return max(0.0, float((weights * edges.distance.double()).max()))


def normalised_eot(maps: AttentionMaps, device: torch.device) -> torch.Tensor:
    """The EOT map bilinearly upsampled to the grid and min-max normalised to [0, 1] (reference-spec 1.7)."""
    eot = torch.nan_to_num(maps.eot_on_grid().to(device), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = eot.min(), eot.max()
    # A map constant up to rounding (e.g. a constant map after bilinear upsampling) would be stretched to [0, 1] by
    # the normalisation, turning float noise into "salient" regions.
    if not bool(high - low > FLAT_EOT * torch.maximum(high.abs(), low.abs())):
        raise ConceptExpressError(
            "the end-of-text attention map is constant, so no region can be told apart from the background "
            "(eq. 5 needs a salient foreground). Check the attention capture (model, prompt, timestep) or the image."
        )
    return (eot - low) / (high - low)


def localize_concepts(maps: AttentionMaps, settings: LocalizeSettings = LocalizeSettings()) -> Concepts:
    """Find the concepts in ``maps``: N binary masks on the grid, their mean attention f_i and EOT scores."""
    clock = _Clock()
    device = torch.device(settings.device) if settings.device else maps.self_attention.device
    grid = maps.grid
    rows = prepare_distributions(maps.self_attention.to(device))
    clock.lap("prepare")

    hierarchy = finch(rows, settings.kernel)
    clock.lap("pre_clustering")
    choice = choose_level(hierarchy.counts, settings.n_max)
    level = hierarchy.levels[choice.index]
    delta = level_delta(hierarchy, choice.index, rows, settings.delta)
    clock.lap("delta")

    eot = normalised_eot(maps, device).reshape(-1)
    pre_scores = eot_scores(eot, level.labels, level.num_clusters)
    kept = torch.nonzero(pre_scores > 1.0).flatten()
    if kept.numel() == 0:
        raise ConceptExpressError(
            f"no region stands out in the end-of-text attention: all {level.num_clusters} pre-clusters (FINCH level "
            f"{choice.index}) score <= 1.0 (best {float(pre_scores.max()):.4f}; eq. 5 keeps a region only if its mean "
            "EOT activation exceeds the image's). The image may have no distinct foreground object, or the "
            "self-attention may be too uniform to separate it. Try an image with clearer objects, a larger n_max "
            "(finer pre-clusters), or another model/timestep for the attention capture."
        )
    mapping = torch.full((level.num_clusters,), -1, dtype=torch.long, device=device)
    mapping[kept] = torch.arange(kept.numel(), device=device)
    candidate_cells = relabel(level.labels, mapping)  # candidate of each cell, -1 for the filtered-out cells
    candidate_rows = hierarchy.centroids(choice.index, rows)[kept]
    clock.lap("eot_filter")

    features_of = concept_features(settings.features, rows, candidate_cells, candidate_rows)
    post = constrained_finch(
        candidate_rows,
        candidate_cells.view(grid),
        delta,
        lambda labels, k: features_of(relabel(candidate_cells, labels), k),
        settings.kernel,
    )
    concept_cells = relabel(candidate_cells, post.levels[-1].labels)
    num_concepts = post.levels[-1].num_clusters
    clock.lap("post_clustering")

    small = {}
    if settings.min_area > 0:
        concept_cells, num_concepts, small = _handle_small(concept_cells, num_concepts, grid, settings, features_of)
        clock.lap("small_regions")

    features = features_of(concept_cells, num_concepts)
    inside = (candidate_cells >= 0) & (concept_cells >= 0)
    pairs = torch.unique(candidate_cells[inside] * num_concepts + concept_cells[inside])
    candidates = torch.bincount(pairs % num_concepts, minlength=num_concepts)  # candidate regions per concept
    scores = eot_scores(eot, concept_cells, num_concepts)
    clock.lap("outputs")

    info = {
        **maps.info,  # provenance of the attention (model, image size, crop: Concepts.masks_on_source uses it)
        "levels": hierarchy.counts,
        "chosen_level": choice.index,
        "level_rule": choice.rule,
        "n_prime": level.num_clusters,
        "delta": delta,
        "pre_cluster_scores": [float(s) for s in pre_scores],
        "kept_pre_clusters": [int(k) for k in kept],
        "post_levels": post.counts,
        "small_regions": small,
        "candidates": [int(c) for c in candidates],
        "settings": dataclasses.asdict(settings),
        "timings_s": clock.laps,
    }
    return Concepts(
        masks_of(concept_cells, num_concepts, grid).cpu(),
        features.float().cpu(),
        scores.float().cpu(),
        grid,
        maps.image,
        info,
        attention=maps,
    )


def concept_features(rule: str, rows, candidate_cells, candidate_rows):
    """f(cells, k) -> (k, d): the mean attention f_i of concepts given as cell labels.

    "reference": the unweighted mean of the member candidates' rows (train.py's feat_final); "paper": eq. 6 over the
    concept's cells (``regions.region_means``). ``candidate_cells`` labels every cell with its candidate region."""
    if rule == "paper":
        return lambda cells, k: region_means(rows, cells, k)

    def unweighted(cells, k):
        inside = candidate_cells >= 0
        concept_of_candidate = torch.full((candidate_rows.shape[0],), k, dtype=torch.long, device=cells.device)
        concept_of_candidate[candidate_cells[inside]] = torch.where(cells[inside] >= 0, cells[inside], k)
        return cluster_means(candidate_rows, concept_of_candidate, k + 1)[:k]

    return unweighted


def _handle_small(cells, k, grid, settings, features_of):
    """Drop concepts under ``min_area`` of the grid, or merge each (smallest first) into the touching concept with
    the nearest f. Returns the new cell labels, the count and a record of what happened."""
    limit = settings.min_area * cells.numel()
    record = {"limit_cells": limit, "dropped": 0, "merged": 0}
    while k > 0:
        sizes = areas(cells, k)
        smallest = int(torch.argmin(sizes))
        if sizes[smallest] >= limit:
            break
        mapping = torch.arange(k, device=cells.device)
        neighbours = touching(cells.view(grid), k)[smallest].nonzero().flatten()
        if settings.small == "merge" and neighbours.numel():
            f = features_of(cells, k)
            distances = sym_kl_distances(f[smallest : smallest + 1], f[neighbours])[0]
            mapping[smallest] = neighbours[int(torch.argmin(distances))]
            record["merged"] += 1
        else:
            mapping[smallest] = -1
            record["dropped"] += 1
        survivors = torch.unique(mapping[mapping >= 0])
        renumber = torch.full((k,), -1, dtype=torch.long, device=cells.device)
        renumber[survivors] = torch.arange(survivors.numel(), device=cells.device)
        cells = relabel(cells, torch.where(mapping >= 0, renumber[mapping.clamp(min=0)], mapping))
        k = survivors.numel()
    if k == 0:
        raise ConceptExpressError(
            f"every concept covers less than min_area={settings.min_area} of the grid; lower min_area or set it to 0."
        )
    return cells, k, record


class _Clock:
    def __init__(self):
        self.laps, self._last = {}, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 6)
        self._last = now
