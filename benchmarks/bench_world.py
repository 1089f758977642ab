"""End to end on the scene world (uce_core/world): does the whole method find objects and learn them, on a model
that has learned something? A measurement script, not a test; results in benchmarks/README.md.

1. Localization with the default settings (capture at t = 0 with the empty prompt, FINCH, EOT filter,
   post-clustering) on held-out test scenes, scored against the ground-truth masks on the latent grid with the
   paper's Hungarian IoU / recall / precision (eqs. 18-20), beside the same pipeline on the world model's
   architecture with random weights, and the two low-level baselines (RGB k-means with k = objects + 1; saturation
   threshold + connected components), and the same localization on perfect attention maps (each self-attention row
   even over its cell's object or the background, the true foreground as the end-of-text map: what the clustering
   makes of a model that sees objects perfectly). Object IoU (each ground-truth object's matched IoU, 0 when
   unmatched) is also given for all objects and for the objects that share their colour with another object of the
   scene.
2. The end-of-text map's foreground ratio (mean over object cells / mean over the grid) for the empty prompt.
3. Token learning (default schedule unless --steps) on the first --token-scenes test scenes: each learned token
   renders "a photo of {i}" --renders times (DDIM 50 steps, guidance 7.5) and the judge (world/judge.py) names the
   (shape, colour) it sees most; ACC^1 = share of renders whose judged class is the class of the object the concept
   was matched to (a concept matched to no object counts as wrong). Beside it: the same with tokens trained on the
   ground-truth masks (the upper bound localization can reach), random token vectors (an empirical chance), and
   1 / 30 (uniform chance), and the objects named in the world's own words ("a photo of a red cube with blue
   stripes", rendered and judged the same way: what the model draws when it is told in words); and each of these for
   the shape alone (chance 1 / 5) and the colour alone (1 / 6).

    python benchmarks/bench_world.py                                   # everything (about 2 h on 2 CPU cores)
    python benchmarks/bench_world.py --token-scenes 0                  # localization and EOT only (minutes)
    python benchmarks/bench_world.py --scenes 12 --token-scenes 2 --steps 100 --renders 2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from concept_express.uce_core.attention import AttentionMaps, capture_attention
from concept_express.uce_core.backends.base import Prompt
from concept_express.uce_core.backends.diffusers_backend import DiffusersBackend, info_from_pipeline
from concept_express.uce_core.backends.loading import load_backend
from concept_express.uce_core.concepts import Concepts
from concept_express.uce_core.errors import ConceptExpressError
from concept_express.uce_core.evaluate import iou_matrix
from concept_express.uce_core.generate import generate_images
from concept_express.uce_core.localize import localize_concepts, normalised_eot
from concept_express.uce_core.regions import eot_scores, region_means
from concept_express.uce_core.train import TrainSettings, train_concept_tokens
from concept_express.uce_core.world.evaluation import (
    eot_foreground_ratio,
    kmeans_rgb,
    saturation_components,
    score,
    truth_on_grid,
)
from concept_express.uce_core.world.judge import CLASSES, judge_labels, load_judge
from concept_express.uce_core.world.model import random_world_pipeline
from concept_express.uce_core.world.scenes import COLOURS, SHAPES, SIZE, SPLITS, render_scene


def object_ious(predicted: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """Each ground-truth object's IoU under the Hungarian assignment (0 when it is matched to nothing)."""
    out = np.zeros(truth.shape[0])
    if predicted.shape[0]:
        ious = iou_matrix(predicted.bool(), truth.bool())
        rows, cols = linear_sum_assignment(ious, maximize=True)
        out[cols] = ious[rows, cols]
    return out


def localize_or_nothing(maps) -> Concepts | None:
    try:
        return localize_concepts(maps)
    except ConceptExpressError:
        return None


def oracle_maps(scene, truth: torch.Tensor) -> AttentionMaps:
    """The maps a perfect model would give: each self-attention row spread evenly over its cell's region (its
    object, or the background) with a small floor, and the true foreground as the end-of-text map."""
    label = torch.zeros(truth.shape[1:], dtype=torch.long)
    for k, mask in enumerate(truth, 1):
        label[mask] = k
    label = label.flatten()
    rows = (label[:, None] == label[None, :]).float() + 1e-3
    foreground = truth.any(dim=0).float()
    return AttentionMaps(rows / rows.sum(dim=1, keepdim=True), foreground, tuple(truth.shape[1:]),
                         torch.from_numpy(scene.image))  # fmt: skip


def oracle_attention(scene, grid: tuple[int, int]) -> torch.Tensor:
    """The default localization on ``oracle_maps``."""
    truth = truth_on_grid(scene, grid)
    concepts = localize_or_nothing(oracle_maps(scene, truth))
    return concepts.masks if concepts is not None else torch.zeros((0, *grid), dtype=torch.bool)


def localization(backends: dict, scenes: list) -> dict:
    methods = list(backends) + ["kmeans-rgb", "saturation-cc", "oracle-attention"]
    rows = {m: [] for m in methods}
    objects = {m: [] for m in methods}
    shared = {m: [] for m in methods}
    ratios = {m: [] for m in backends}
    for scene in scenes:
        share = scene.shares_colour
        for name, backend in backends.items():
            maps = capture_attention(backend, scene.image)
            truth = truth_on_grid(scene, maps.grid)
            ratios[name].append(eot_foreground_ratio(maps.eot_on_grid(), truth))
            concepts = localize_or_nothing(maps)
            predicted = concepts.masks if concepts is not None else torch.zeros((0, *maps.grid), dtype=torch.bool)
            rows[name].append(score(predicted, truth))
            per_object = object_ious(predicted, truth)
            objects[name].extend(per_object)
            shared[name].extend(per_object[share])
        for name, method in (("kmeans-rgb", kmeans_rgb), ("saturation-cc", saturation_components),
                             ("oracle-attention", oracle_attention)):  # fmt: skip
            predicted = method(scene, truth.shape[1:])
            rows[name].append(score(predicted, truth))
            per_object = object_ious(predicted, truth)
            objects[name].extend(per_object)
            shared[name].extend(per_object[share])
    table = {}
    for m in methods:
        table[m] = {
            "iou": statistics.fmean(r.iou for r in rows[m]),
            "recall": statistics.fmean(r.recall for r in rows[m]),
            "precision": statistics.fmean(r.precision for r in rows[m]),
            "concepts_per_scene": statistics.fmean(r.num_predicted for r in rows[m]),
            "object_iou": float(np.mean(objects[m])),
            "shared_colour_object_iou": float(np.mean(shared[m])) if shared[m] else float("nan"),
        }
        if m in ratios:
            table[m]["eot_foreground_ratio"] = float(np.nanmean(ratios[m]))
    return {
        "scenes": len(scenes),
        "objects": sum(len(s.objects) for s in scenes),
        "shared_colour_objects": int(sum(s.shares_colour.sum() for s in scenes)),
        "methods": table,
    }


def truth_concepts(maps, truth: torch.Tensor) -> Concepts:
    """Concepts from the ground-truth masks: f_i and the EOT scores by the method's own rules (eqs. 5-6)."""
    labels = torch.full((maps.n,), -1, dtype=torch.long)
    for i, mask in enumerate(truth):
        labels[mask.reshape(-1)] = i
    k = truth.shape[0]
    rows = maps.self_attention
    eot = normalised_eot(maps, rows.device).reshape(-1)
    return Concepts(truth.clone(), region_means(rows, labels, k), eot_scores(eot, labels, k).float(), maps.grid,
                    maps.image, {"source": "ground truth"})  # fmt: skip


def named(judge, images) -> list[tuple[str, str]]:
    """The judge's (shape, colour) for each PIL image."""
    return judge_labels(judge, np.stack([np.asarray(im.convert("RGB")) for im in images]))


def judged(backend, tokens, count: int, judge, renders: int, seed: int) -> list[list[tuple[str, str]]]:
    """Per concept 1..count, the judge's (shape, colour) for each of its ``renders`` renders of "a photo of {i}"."""
    return [
        named(judge, generate_images(backend, tokens, f"a photo of {{{i + 1}}}", seed=seed, count=renders))
        for i in range(count)
    ]


def judged_words(backend, scene, judge, renders: int, seed: int) -> list[list[tuple[str, str]]]:
    """Per object, the judge's (shape, colour) for each render of the object in the world's own words ("a photo of
    a red cube with blue stripes"), sampled as ``generate_images`` samples: what the model draws from words."""
    uncond = backend.encode_prompts([Prompt.text("")])
    out = []
    for obj in scene.objects:
        cond = backend.encode_prompts([Prompt.text(f"a photo of {obj.phrase()}")])
        images = [backend.sample(cond, uncond, steps=50, guidance=7.5, width=SIZE, height=SIZE,
                                 generator=torch.Generator(device="cpu").manual_seed(seed + k))
                  for k in range(renders)]  # fmt: skip
        out.append(named(judge, images))
    return out


def tally(names: list[list[tuple[str, str]]], wanted: list) -> np.ndarray:
    """Renders whose judged (shape, colour) / shape / colour is the wanted object's (None: never right)."""
    counts = np.zeros(3, dtype=int)
    for seen, label in zip(names, wanted):
        if label is not None:
            counts += [sum(n == label for n in seen), sum(n[0] == label[0] for n in seen),
                       sum(n[1] == label[1] for n in seen)]  # fmt: skip
    return counts


def token_learning(backend, scenes: list, settings: TrainSettings, renders: int, log) -> dict:
    """ACC^1 (shape and colour right) and, beside it, the shape alone and the colour alone, for tokens learned on
    the found concepts, on the ground-truth masks, for random vectors of the found tokens' norms, and for the
    objects named in words."""
    judge = load_judge()
    found, truth, chance, words = (np.zeros(3, dtype=int) for _ in range(4))
    found_total = truth_total = matched_concepts = 0
    for number, scene in enumerate(scenes, 1):
        start = time.perf_counter()
        maps = capture_attention(backend, scene.image)
        ground = truth_on_grid(scene, maps.grid)
        labels = [o.label for o in scene.objects]
        concepts = localize_or_nothing(maps)
        if concepts is not None and len(concepts):
            ious = iou_matrix(concepts.masks, ground)
            rows, cols = linear_sum_assignment(ious, maximize=True)
            wanted = [None] * len(concepts)
            for r, c in zip(rows, cols):
                if ious[r, c] > 0:
                    wanted[r] = labels[c]
            tokens = train_concept_tokens(backend, concepts, settings)
            found += tally(judged(backend, tokens, len(concepts), judge, renders, scene.seed), wanted)
            found_total += renders * len(concepts)
            matched_concepts += sum(w is not None for w in wanted)
            # empirical chance: the learned vectors' norms, random directions
            generator = torch.Generator().manual_seed(scene.seed)
            tokens.vectors = [torch.randn(v.shape, generator=generator) * v.norm(dim=1, keepdim=True) / v.shape[1] ** 0.5
                              for v in tokens.vectors]  # fmt: skip
            chance += tally(judged(backend, tokens, len(concepts), judge, renders, scene.seed), wanted)
        gt_tokens = train_concept_tokens(backend, truth_concepts(maps, ground), settings)
        truth += tally(judged(backend, gt_tokens, len(labels), judge, renders, scene.seed), labels)
        words += tally(judged_words(backend, scene, judge, renders, scene.seed), labels)
        truth_total += renders * len(labels)
        log(f"  token scene {number}/{len(scenes)} (seed {scene.seed}, {len(labels)} objects, "
            f"{0 if concepts is None else len(concepts)} concepts): {time.perf_counter() - start:.0f} s; so far ACC^1 "
            f"found {found[0]}/{found_total}, true masks {truth[0]}/{truth_total}, random {chance[0]}/{found_total}, "
            f"words {words[0]}/{truth_total}")  # fmt: skip
    rate = lambda counts, total: [float(c) / max(1, total) for c in counts]  # noqa: E731
    found_rate, truth_rate, chance_rate = rate(found, found_total), rate(truth, truth_total), rate(chance, found_total)
    words_rate = rate(words, truth_total)
    return {
        "scenes": len(scenes),
        "steps": settings.steps,
        "renders_per_concept": renders,
        "acc1_found_concepts": found_rate[0],
        "concepts_found": found_total // max(1, renders),
        "concepts_matched_to_an_object": matched_concepts,
        "acc1_ground_truth_masks": truth_rate[0],
        "acc1_random_vectors": chance_rate[0],
        "acc1_word_prompts": words_rate[0],
        "acc1_uniform_chance": 1 / len(CLASSES),
        "shape_found_concepts": found_rate[1],
        "shape_ground_truth_masks": truth_rate[1],
        "shape_random_vectors": chance_rate[1],
        "shape_word_prompts": words_rate[1],
        "shape_uniform_chance": 1 / len(SHAPES),
        "colour_found_concepts": found_rate[2],
        "colour_ground_truth_masks": truth_rate[2],
        "colour_random_vectors": chance_rate[2],
        "colour_word_prompts": words_rate[2],
        "colour_uniform_chance": 1 / len(COLOURS),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=50, help="held-out test scenes for localization")
    parser.add_argument("--token-scenes", type=int, default=10, help="test scenes for token learning (0: skip)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the default schedule)")
    parser.add_argument("--renders", type=int, default=4, help="renders per learned token")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    scenes = [render_scene(seed) for seed in SPLITS["test"][: args.scenes]]
    world = load_backend("world", device="cpu")
    pipe = random_world_pipeline(seed=0)
    control = DiffusersBackend(pipe, info_from_pipeline(pipe, "world-random"))
    result = {"localization": localization({"world": world, "world-random": control}, scenes)}
    loc = result["localization"]
    print(f"Localization on {loc['scenes']} held-out test scenes ({loc['objects']} objects, "
          f"{loc['shared_colour_objects']} share their colour with another object), default settings:\n")  # fmt: skip
    print(
        f"{'method':<16}{'IoU':>7}{'recall':>8}{'prec.':>7}{'N/scene':>9}{'obj IoU':>9}{'shared':>8}{'EOT ratio':>11}"
    )
    for name, m in loc["methods"].items():
        ratio = f"{m['eot_foreground_ratio']:.2f}" if "eot_foreground_ratio" in m else "-"
        print(f"{name:<16}{m['iou']:7.3f}{m['recall']:8.3f}{m['precision']:7.3f}{m['concepts_per_scene']:9.2f}"
              f"{m['object_iou']:9.3f}{m['shared_colour_object_iou']:8.3f}{ratio:>11}")  # fmt: skip
    best_baseline = max(loc["methods"]["kmeans-rgb"]["shared_colour_object_iou"],
                        loc["methods"]["saturation-cc"]["shared_colour_object_iou"])  # fmt: skip
    margin = loc["methods"]["world"]["shared_colour_object_iou"] - best_baseline
    print(f"\nshared-colour objects: world model {margin:+.3f} IoU over the better baseline")
    if args.token_scenes:
        settings = (
            TrainSettings()
            if args.steps is None
            else TrainSettings(steps=args.steps, merge_step=min(100, args.steps // 5))
        )
        token_scenes = scenes[: args.token_scenes]
        print(
            f"\nToken learning on {len(token_scenes)} scenes, {settings.steps} steps, {args.renders} renders per token:"
        )
        result["tokens"] = token_learning(world, token_scenes, settings, args.renders, print)
        t = result["tokens"]
        print(f"ACC^1 found concepts {t['acc1_found_concepts']:.3f} ({t['concepts_found']} concepts, "
              f"{t['concepts_matched_to_an_object']} matched to an object); ground-truth masks "
              f"{t['acc1_ground_truth_masks']:.3f}; random vectors {t['acc1_random_vectors']:.3f}; "
              f"uniform chance {t['acc1_uniform_chance']:.3f}; the objects in words {t['acc1_word_prompts']:.3f}")  # fmt: skip
        for part in ("shape", "colour"):
            print(f"the {part} alone: found concepts {t[part + '_found_concepts']:.3f}; ground-truth masks "
                  f"{t[part + '_ground_truth_masks']:.3f}; random vectors {t[part + '_random_vectors']:.3f}; "
                  f"uniform chance {t[part + '_uniform_chance']:.3f}; the objects in words "
                  f"{t[part + '_word_prompts']:.3f}")  # fmt: skip
    result["seconds"] = round(time.perf_counter() - started)
    print(f"\n{result['seconds']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
