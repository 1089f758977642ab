"""The paper's localization metrics (evaluate.py: eqs. 18-20, Hungarian matching) over a concept library whose images
have ground-truth masks.

Ground-truth layout (``--truth DIR``): the images, and beside each image ``NAME.<ext>`` one binary PNG per object,
``NAME_mask_1.png``, ``NAME_mask_2.png``, ... at the image's size (white, > 127, is the object; the numbering need not
match the concepts'). An image without mask files has no ground truth and is not scored. ``extract-many DIR`` skips
the mask files, so the same folder is both the input of the library and its ground truth.

Where the comparison happens: at the working size of each image (``image.png`` of its set, the picture the model saw).
The predicted masks are the set's ``<name>_mask.png`` files; each truth mask is cropped to the part of the original
image the model saw (the capture's centre crop, recorded in the manifest; under 4 % of one side) and resized there
(nearest). An image the method found no concept in (status ``failed`` with an error from localization or training)
scores 0 on every metric, as a method that predicts no mask does; one not extracted yet is listed, not scored.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import ConceptExpressError
from .evaluate import LocalizationScore, score_masks
from .library import IMAGE_SUFFIXES, MASK_NAME, Library

METRICS = ("iou", "recall", "precision")


def read_truth(folder: str | Path) -> dict[Path, list[Path]]:
    """Image path (resolved) -> its mask files in object order, for every image of ``folder`` that has masks."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConceptExpressError(
            f"{folder}: no such folder; --truth takes a folder of images and NAME_mask_K.png files."
        )
    files = [p for p in folder.iterdir() if p.is_file()]
    masks: dict[str, list[tuple[int, Path]]] = {}
    for p in files:
        match = MASK_NAME.match(p.name)
        if match:
            masks.setdefault(match.group("stem"), []).append((int(match.group("k")), p))
    truth = {}
    for p in sorted(files):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.stem in masks and not MASK_NAME.match(p.name):
            truth[p.resolve()] = [m for _, m in sorted(masks[p.stem])]
    if not truth:
        raise ConceptExpressError(
            f"{folder} has no image with ground-truth masks (NAME.png with NAME_mask_1.png, NAME_mask_2.png, ...)."
        )
    return truth


@dataclass
class LibraryScores:
    per_image: list[tuple[str, LocalizationScore]] = field(default_factory=list)  # (folder, score)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (image, why it was not scored)

    def mean(self) -> dict[str, float]:
        if not self.per_image:
            return {}
        out = {m: statistics.fmean(getattr(s, m) for _, s in self.per_image) for m in METRICS}
        out["concepts"] = statistics.fmean(s.num_predicted for _, s in self.per_image)
        out["images"] = len(self.per_image)
        return out


def score_library(root: str | Path, truth_folder: str | Path, write: bool = True) -> LibraryScores:
    """Score every library image that has ground truth; with ``write``, store each image's scores in its index entry
    (``evaluation``) and the means at the top of the index (``evaluation``)."""
    truth = read_truth(truth_folder)
    lib = Library.open(root, None)
    scores = LibraryScores()
    for image, mask_files in truth.items():
        entry = lib.entry_for(image)
        if entry is None or entry.status in ("pending", "crashed"):
            scores.missing.append((str(image), "not extracted yet" if entry is None else entry.status))
            continue
        if entry.status == "failed":
            score = LocalizationScore(0.0, 0.0, 0.0, 0, len(mask_files))
        else:
            folder = lib.root / entry.folder
            predicted, info = _predicted(folder)
            score = score_masks(predicted, _truth_masks(mask_files, info, predicted.shape[1:]))
        scores.per_image.append((entry.folder, score))
        entry.data = {**(entry.data or {}), "evaluation": _as_json(score)}
    if write and scores.per_image:
        lib.meta["evaluation"] = {"truth": str(Path(truth_folder).resolve()), **scores.mean()}
        lib.save()
    return scores


def _predicted(folder: Path) -> tuple[torch.Tensor, dict]:
    from PIL import Image

    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    masks = []
    for concept in manifest["concepts"]:
        with Image.open(folder / Path(concept["mask"]).name) as im:
            masks.append(torch.from_numpy(np.asarray(im.convert("L")) > 127))
    return torch.stack(masks), manifest.get("info", {}).get("localization", {})


def _truth_masks(files: list[Path], info: dict, size: tuple[int, int]) -> torch.Tensor:
    """The truth masks on the working picture: cropped as the capture cropped the image, resized (nearest)."""
    from PIL import Image

    height, width = size
    out = []
    for path in files:
        with Image.open(path) as im:
            mask = im.convert("L")
        source = info.get("source_size")
        if source and list(mask.size) != list(source):
            raise ConceptExpressError(
                f"{path} is {mask.size[0]}x{mask.size[1]} pixels, its image {source[0]}x{source[1]}; "
                "a mask must have its image's size."
            )
        box = info.get("source_crop") or [0, 0, mask.size[0], mask.size[1]]
        mask = mask.crop(tuple(int(round(v)) for v in box)).resize((width, height), Image.NEAREST)
        out.append(torch.from_numpy(np.asarray(mask) > 127))
    return torch.stack(out)


def _as_json(score: LocalizationScore) -> dict:
    return {
        **{m: round(getattr(score, m), 6) for m in METRICS},
        "predicted": score.num_predicted,
        "truth": score.num_truth,
        "matches": [list(m) for m in score.matches],
    }


def format_scores(scores: LibraryScores) -> str:
    """Per image and over the set, in % (the paper's Table 3 units)."""
    lines = ["| image | concepts | truth | IoU | Recall | Precision |", "|---|---|---|---|---|---|"]
    for folder, s in scores.per_image:
        lines.append(
            f"| {folder} | {s.num_predicted} | {s.num_truth} | {100 * s.iou:.1f} | {100 * s.recall:.1f} | "
            f"{100 * s.precision:.1f} |"
        )
    mean = scores.mean()
    if mean:
        lines.append(
            f"| **all {mean['images']}** | {mean['concepts']:.2f} | | {100 * mean['iou']:.1f} | "
            f"{100 * mean['recall']:.1f} | {100 * mean['precision']:.1f} |"
        )
    return "\n".join(lines)
