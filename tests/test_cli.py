"""The CLI main job: extract -> files on disk -> generate, its schedule defaults and its refusals."""

import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from concept_express.uce_core import cli, cli_options


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "concept_express.uce_core.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["extract", "--demo"], (100, 20)),  # the demo's short schedule, 1:4 like the paper's
        (["extract", "photo.png", "--model", "m.safetensors"], (500, 100)),  # scripts/train.sh
        (["extract", "--demo", "--steps", "500"], (500, 100)),  # an explicit length gets the paper's merge step
        (["extract", "--demo", "--steps", "40", "--merge-step", "8"], (40, 8)),
        (["extract", "photo.png", "--model", "m", "--merge-step", "0"], (500, 0)),
        (["extract", "photo.png", "--model", "m", "--steps", "80"], (80, 16)),  # too short for step 100: a fifth
    ],
)
def test_training_schedule_defaults(argv, expected):
    args = cli.build_parser().parse_args(argv)
    assert cli_options.schedule(args) == expected


def test_extract_writes_loadable_embeddings_then_generate_renders_them(tmp_path):
    out = tmp_path / "out"
    result = _cli("extract", "--demo", "--steps", "3", "--merge-step", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    names = [c["name"] for c in manifest["concepts"]]
    assert names and names == [f"concept_{i + 1}" for i in range(len(names))]
    assert f"{len(names)} concept(s)" in result.stdout and "embedding:concept/concept_1" in result.stdout
    for name in names:
        vectors = load_file(out / f"{name}.safetensors")
        assert list(vectors) == ["emb_params"] and vectors["emb_params"].shape == (1, 128)  # the world model's width
        assert (out / f"{name}_mask.png").exists()
    for name in ("attention_rows.png", "eot.png", "concepts.png", "loss.png"):
        with Image.open(out / name) as im:
            im.load()
            pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
            assert im.width >= 128 and len(np.unique(pixels, axis=0)) > 20  # a picture, not a blank sheet
    assert not (out / ".training-checkpoint.safetensors").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    _every_demo_object_is_found(out, names)

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = _cli("extract", "--demo", "--steps", "3", "--merge-step", "1", "--out", str(out))
    assert again.returncode == 1 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    images = tmp_path / "images"
    rendered = _cli(
        "generate",
        "--concepts",
        str(out),
        "--prompt",
        "a photo of {1} and {all}",
        "--count",
        "2",
        "--sampling-steps",
        "2",
        "--out",
        str(images),
    )
    assert rendered.returncode == 0, rendered.stderr
    pictures = sorted(images.glob("*.png"))
    assert len(pictures) == 2
    with Image.open(out / "image.png") as source:
        size = source.size  # the training image at the model's working size: the world's 128 x 128
    assert size == (128, 128)
    for picture in pictures:
        with Image.open(picture) as im:
            assert im.size == size


def _every_demo_object_is_found(out, names):
    """The demo's written masks against the demo scene's true pixel masks (the world renders them): every object is
    matched, one mask to one object (Hungarian), with IoU 0.5 or more (measured: 0.58, 0.75 and 0.76, and a fourth
    mask on the table; the weights before the focus stage's even terms missed the ball)."""
    from scipy.optimize import linear_sum_assignment

    from concept_express.uce_core.world.scenes import DEMO_SEED, render_scene

    truth = render_scene(DEMO_SEED).masks.astype(bool)
    found = np.stack([np.asarray(Image.open(out / f"{name}_mask.png").convert("L")) > 127 for name in names])
    assert found.shape[1:] == truth.shape[1:]
    inter = (found[:, None] & truth[None]).sum(axis=(2, 3))
    union = (found[:, None] | truth[None]).sum(axis=(2, 3))
    ious = inter / np.maximum(union, 1)
    rows, cols = linear_sum_assignment(ious, maximize=True)
    assert len(cols) == len(truth), f"{len(names)} concepts for {len(truth)} objects"
    assert ious[rows, cols].min() >= 0.5, np.round(ious, 2)


def test_extract_keeps_an_interrupted_runs_checkpoint(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    checkpoint = out / ".training-checkpoint.safetensors"
    checkpoint.write_bytes(b"progress of an interrupted run")
    result = _cli("extract", "--demo", "--steps", "2", "--out", str(out))
    assert result.returncode == 1 and "--resume" in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert checkpoint.read_bytes() == b"progress of an interrupted run"
    assert sorted(p.name for p in out.iterdir()) == [checkpoint.name]


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["generate", "--concepts", "x", "--prompt", "{1}", "--sampling-steps", "0"],
            "--sampling-steps: 0 is too small",
        ),
        (["capture", "--demo", "--timestep", "5000"], "--timestep: 5000 is out of range: give 0..999"),
        (["extract", "--demo", "--steps", "ten"], "--steps: 'ten' is not a whole number"),
    ],
)
def test_out_of_range_numbers_are_refused_before_any_work(argv, message):
    result = _cli(*argv)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_a_bad_device_or_output_folder_is_one_clear_line(tmp_path):
    bad_device = _cli("capture", "--demo", "--device", "quantum", "--out", str(tmp_path / "a"))
    assert bad_device.returncode == 1 and "'quantum' is not a device name" in bad_device.stderr
    a_file = tmp_path / "taken"
    a_file.write_text("a file where the folder should go")
    result = _cli("extract", "--demo", "--steps", "2", "--out", str(a_file))
    assert result.returncode == 1 and "is a file, not a folder" in result.stderr
    assert "model:" not in result.stdout  # refused before loading anything
    for failed in (bad_device, result):
        assert failed.stderr.strip().count("\n") == 0 and "Traceback" not in failed.stderr


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    out = tmp_path / "out"
    run = ["extract", "--demo", "--steps", "4", "--merge-step", "2", "--out", str(out)]
    # the default update diverges within step 1 at this rate (its second AdamW update meets the first's result):
    # nothing finite to keep, and the advice does not promise a checkpoint
    at_once = _cli(*run, "--lr", "1e30")
    assert (
        at_once.returncode == 1
        and "diverged at step 1" in at_once.stderr
        and "Start again in float32" in at_once.stderr
    )
    assert not (out / cli.CHECKPOINT).exists()
    # one update per step: step 1 is finite, step 2 diverges, and the last finite state is kept
    diverged = _cli(*run, "--lr", "1e30", "--update", "averaged", "--overwrite")
    assert diverged.returncode == 1 and "diverged at step 2" in diverged.stderr and "--resume" not in diverged.stderr
    assert "Start again (--overwrite" in diverged.stderr and "--dtype fp32" in diverged.stderr
    checkpoint = out / cli.CHECKPOINT
    kept = checkpoint.read_bytes()
    other = _cli(*run, "--lr", "1e-3", "--resume")
    assert other.returncode == 1 and "belongs to a run with other settings" in other.stderr
    assert checkpoint.read_bytes() == kept and not (out / "manifest.json").exists()
    again = _cli(*run, "--lr", "1e-3", "--overwrite")
    assert again.returncode == 0, again.stderr
    assert not checkpoint.exists() and (out / "manifest.json").exists()


def test_ctrl_c_then_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    run = ["extract", "--demo", "--steps", "12", "--merge-step", "4", "--checkpoint-every", "1"]
    whole = _cli(*run, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "stopped"
    command = [sys.executable, "-m", "concept_express.uce_core.cli", *run, "--out", str(out)]
    # as from a terminal: SIGINT not ignored (a shell without job control starts background jobs with it ignored,
    # and the child would inherit that)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 240
    while not (out / cli.CHECKPOINT).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)  # what Ctrl-C sends
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "run the same command with --resume" in stderr
    assert not (out / "manifest.json").exists()

    resumed = _cli(*run, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    step = int(re.search(r"resumed from step (\d+)", resumed.stderr).group(1))
    assert 1 <= step < 12  # continued from the checkpoint, not from scratch (which would end the same way)
    names = json.loads((tmp_path / "whole" / "manifest.json").read_text())["concepts"]
    for entry in names:
        expected = load_file(tmp_path / "whole" / entry["file"])["emb_params"]
        assert torch.equal(load_file(out / entry["file"])["emb_params"], expected), entry["file"]
