"""The CLI with concepts the user gives (--masks, --label-image) or corrects (--keep, --drop, --merge,
--split-instances, --names): hand-computed grids on the bundled example, manifests, and refusals that write nothing.

The example is 640 x 480; the tiny models see its centred 640 x 426.7 crop (rows 26.7..453.3) on a 16 x 24 grid, so a
grid cell is 26.67 x 26.67 source pixels and cell (r, c) spans x = 26.67 c .. and y = 26.67 (r + 1) .."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from concept_express.uce_core import cli, cli_options
from concept_express.uce_core.concepts import Concepts

TINY_ON_EXAMPLE = (str(cli_options.EXAMPLE_IMAGE), "--model", "tiny-sd1")  # the still life, on tiny-sd1's 16 x 24 grid

BALL = (80, 160, 0, 80)  # source pixels y0, y1, x0, x1 -> rows 2..4, columns 0..2
MUG = (240, 320, 400, 480)  # rows 8..10, columns 15..17
DOT = (400, 410, 540, 550)  # 10 x 10 pixels inside cell (14, 20)


def grid_of(*boxes):
    out = np.zeros((16, 24), dtype=bool)
    for r0, r1, c0, c1 in boxes:
        out[r0:r1, c0:c1] = True
    return out


def write_mask(path, box, size=(640, 480)):
    array = np.zeros(size[::-1], dtype=np.uint8)
    y0, y1, x0, x1 = box
    array[y0:y1, x0:x1] = 255
    Image.fromarray(array, "L").save(path)
    return str(path)


def run(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_localize_takes_a_folder_of_masks_in_name_order(tmp_path, capsys):
    folder = tmp_path / "masks"
    folder.mkdir()
    write_mask(folder / "1-ball.png", BALL)
    write_mask(folder / "2-mug.png", MUG)
    write_mask(folder / "3-dot.png", DOT)
    (folder / "notes.txt").write_text("not a mask")
    code, out, err = run(capsys, "localize", *TINY_ON_EXAMPLE, "--masks", str(folder), "--out", str(tmp_path / "out"))
    assert code == 0, err
    concepts = Concepts.load(tmp_path / "out" / "concepts.safetensors")
    expected = [grid_of((2, 5, 0, 3)), grid_of((8, 11, 15, 18)), grid_of((14, 15, 20, 21))]
    np.testing.assert_array_equal(concepts.masks.numpy(), np.stack(expected))


def test_extract_trains_the_given_masks_under_the_given_names(tmp_path, capsys):
    m1, m2 = write_mask(tmp_path / "m1.png", BALL), write_mask(tmp_path / "m2.png", MUG)
    out = tmp_path / "out"
    code, stdout, err = run(
        capsys,
        "extract",
        *TINY_ON_EXAMPLE,
        "--masks",
        m1,
        m2,
        "--names",
        "red ball, mug/cup",
        "--steps",
        "2",
        "--merge-step",
        "1",
        "--out",
        str(out),
    )
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(c["number"], c["name"]) for c in manifest["concepts"]] == [(1, "red_ball"), (2, "mug_cup")]
    assert (out / "red_ball.safetensors").exists() and (out / "mug_cup.safetensors").exists()
    h, w = manifest["grid"]
    for entry, expected in zip(manifest["concepts"], [grid_of((2, 5, 0, 3)), grid_of((8, 11, 15, 18))]):
        with Image.open(out / entry["mask"]) as im:
            picture = np.asarray(im.convert("L"))
        ys = ((np.arange(h) + 0.5) * picture.shape[0] / h).astype(int)
        xs = ((np.arange(w) + 0.5) * picture.shape[1] / w).astype(int)
        np.testing.assert_array_equal(picture[np.ix_(ys, xs)] > 127, expected)
    assert "embedding:concept/red_ball" in stdout


def test_edits_in_the_cli_keep_merge_and_split(tmp_path, capsys):
    two_pieces = tmp_path / "two.png"
    array = np.zeros((480, 640), np.uint8)
    array[80:160, 0:80] = 255  # the ball's cells
    array[240:320, 400:480] = 255  # and the mug's: one mask, two pieces
    Image.fromarray(array).save(two_pieces)
    dot = write_mask(tmp_path / "dot.png", DOT)
    code, _, err = run(
        capsys,
        "localize",
        *TINY_ON_EXAMPLE,
        "--masks",
        str(two_pieces),
        dot,
        "--split-instances",
        "--split-min-area",
        "0.02",  # 7.7 cells: the 9-cell pieces split off
        "--out",
        str(tmp_path / "split"),
    )
    assert code == 0, err
    concepts = Concepts.load(tmp_path / "split" / "concepts.safetensors")
    expected = [grid_of((2, 5, 0, 3)), grid_of((8, 11, 15, 18)), grid_of((14, 15, 20, 21))]
    np.testing.assert_array_equal(concepts.masks.numpy(), np.stack(expected))
    assert concepts.info["origin"] == ["1.1", "1.2", "2"]
    code, _, err = run(
        capsys,
        "localize",
        *TINY_ON_EXAMPLE,
        "--masks",
        str(two_pieces),
        dot,
        "--merge",
        "1+2",
        "--out",
        str(tmp_path / "merged"),
    )
    assert code == 0, err
    merged = Concepts.load(tmp_path / "merged" / "concepts.safetensors")
    assert len(merged) == 1 and merged.masks[0].sum() == 19


def test_a_transparent_region_of_a_picture_is_its_mask(tmp_path):
    rgba = np.full((48, 64, 4), 255, np.uint8)
    rgba[8:16, 0:8, 3] = 0  # the mask editor erases the alpha where it paints
    Image.fromarray(rgba, "RGBA").save(tmp_path / "painted.png")
    masks = cli.read_mask_files([str(tmp_path / "painted.png")])
    expected = torch.zeros(1, 48, 64)
    expected[0, 8:16, 0:8] = 1
    assert torch.equal(masks, expected)


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "mask 1 of 1 is empty"),
        ("square", "aspect ratio differs"),
        ("colours", "300 colours"),
        ("keep nothing", "leaves no concept"),
        ("out of range", "no concept 3"),
        ("same names", "would both be"),
    ],
)
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, capsys, case, message):
    args = ["extract", *TINY_ON_EXAMPLE, "--steps", "2", "--merge-step", "1", "--out", str(tmp_path / "out")]
    ball = write_mask(tmp_path / "ball.png", BALL)
    if case == "empty":
        args += ["--masks", write_mask(tmp_path / "empty.png", (0, 0, 0, 0))]
    elif case == "square":
        args += ["--masks", write_mask(tmp_path / "square.png", (0, 100, 0, 100), size=(480, 480))]
    elif case == "colours":
        label = np.zeros((480, 640, 3), np.uint8)
        label[:15, :20] = np.stack([np.arange(300) % 256, np.arange(300) // 256 + 1, np.zeros(300)], 1).reshape(
            15, 20, 3
        )
        Image.fromarray(label).save(tmp_path / "label.png")
        args += ["--label-image", str(tmp_path / "label.png")]
    elif case == "keep nothing":
        args += ["--masks", ball, "--keep", "1", "--drop", "1"]
    elif case == "out of range":
        args += ["--masks", ball, write_mask(tmp_path / "mug.png", MUG), "--merge", "1+3"]
    else:
        args += ["--masks", ball, write_mask(tmp_path / "mug.png", MUG), "--names", "cup, Cup"]
    code, _, err = run(capsys, *args)
    assert code == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
