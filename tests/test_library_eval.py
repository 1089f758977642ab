"""evaluate LIBRARY --truth DIR: the paper's metrics (eqs. 18-20) against masks in the NAME_mask_K.png layout,
checked against IoUs computed here with numpy from the pictures on disk."""

import json
import shutil

import numpy as np
import pytest
from library_inputs import SETTINGS, run_main, write_inputs
from PIL import Image


def _mask(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 127


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_evaluate_extracts_what_is_missing_then_scores_every_image(tmp_path):
    inputs = write_inputs(tmp_path / "in")
    truth = tmp_path / "truth"
    truth.mkdir()
    for name in ("a_gray", "b_discs", "c_busy"):
        shutil.copy(inputs / f"{name}.png", truth / f"{name}.png")
    left = np.zeros((128, 128), bool)
    left[:, :64] = True
    disc = np.zeros((128, 128), bool)
    disc[20:60, 30:70] = True
    masks = {"a_gray": [left, ~left], "b_discs": [disc], "c_busy": [disc]}
    for name, arrays in masks.items():
        for k, array in enumerate(arrays, start=1):
            Image.fromarray(array.astype(np.uint8) * 255).save(truth / f"{name}_mask_{k}.png")

    lib = tmp_path / "lib"
    code, out, err = run_main("evaluate", lib, "--truth", truth, *SETTINGS)
    assert code == 0, err
    assert "3 done" not in out and "2 done, 1 failed" in out  # the mask files were not taken for images
    index = json.loads((lib / "index.json").read_text())
    scores = {e["folder"]: e["evaluation"] for e in index["images"]}

    # a_gray: one predicted concept, two true halves: the better half is matched (IoU / N with N = 1)
    predicted = _mask(lib / "a_gray" / "concept_1_mask.png")
    best = max(_iou(predicted, left), _iou(predicted, ~left))
    assert scores["a_gray"]["iou"] == pytest.approx(best, abs=1e-6)
    assert scores["a_gray"]["recall"] == 0.5 and scores["a_gray"]["precision"] == 1.0  # 1 hit of M = 2 and N = 1
    predicted = _mask(lib / "b_discs" / "concept_1_mask.png")
    assert scores["b_discs"]["iou"] == pytest.approx(_iou(predicted, disc), abs=1e-6)
    assert scores["c_busy"] == {**scores["c_busy"], "iou": 0.0, "recall": 0.0, "predicted": 0, "truth": 1}
    mean = index["evaluation"]
    assert mean["images"] == 3
    assert mean["iou"] == pytest.approx((scores["a_gray"]["iou"] + scores["b_discs"]["iou"]) / 3, abs=1e-6)
    assert f"| **all 3** | 0.67 | | {100 * mean['iou']:.1f} |" in out

    # scoring alone (no --model): the same numbers, nothing extracted
    code, again, err = run_main("evaluate", lib, "--truth", truth)
    assert code == 0, err
    assert again.strip().splitlines()[-5:] == out.strip().splitlines()[-5:]


def test_evaluate_refuses_a_truth_folder_without_masks(tmp_path, capsys):
    from concept_express.uce_core import cli

    write_inputs(tmp_path / "in")
    code = cli.main(["evaluate", str(tmp_path / "lib"), "--truth", str(tmp_path / "in")])
    err = capsys.readouterr().err
    assert code == 1 and "has no image with ground-truth masks" in err and not (tmp_path / "lib").exists()
