"""extract-many on the local engine: the library on disk, its index, resuming, interrupts and refusals."""

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from library_inputs import DONE, FAILED, SETTINGS, run_main, tree, write_inputs
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from concept_express.uce_core import cli as cli_module
from concept_express.uce_core.batch import ExtractJob
from concept_express.uce_core.errors import ConceptExpressError
from concept_express.uce_core.library import Entry, Library, list_images


@pytest.fixture(scope="module")
def local_library(tmp_path_factory):
    """One local extract-many run over the four inputs (shared, read-only: tests that change it copy it)."""
    root = tmp_path_factory.mktemp("local")
    inputs = write_inputs(root / "in")
    code, out, err = run_main("extract-many", inputs, "--out", root / "lib", *SETTINGS)
    assert code == 0, err
    return inputs, root / "lib", out + err


def tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def same_set(a, b):
    """Two concept sets hold the same files: PNGs byte for byte, embeddings bit for bit (tensors and metadata; the
    metadata's key order in the file is not fixed by safetensors), manifests equal but for run times."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name.endswith(".png"):
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
        elif name.endswith(".safetensors"):
            (ta, ma), (tb, mb) = tensors(a / name), tensors(b / name)
            assert ma == mb and ta.keys() == tb.keys(), name
            assert all(torch.equal(ta[k], tb[k]) for k in ta), name
    ma, mb = (json.loads((x / "manifest.json").read_text()) for x in (a, b))
    for m in (ma, mb):
        m["info"].pop("seconds")
        m["info"]["localization"].pop("timings_s")
    assert ma == mb


def test_local_run_writes_two_sets_and_records_two_failures(local_library, tmp_path):
    inputs, lib, output = local_library
    index = json.loads((lib / "index.json").read_text())
    entries = {e["folder"]: e for e in index["images"]}
    assert sorted(entries) == sorted([*DONE, *FAILED])
    assert sorted(p.name for p in lib.iterdir()) == sorted([*DONE, "index.json", "index.html"])
    for folder in DONE:
        entry = entries[folder]
        assert entry["status"] == "done" and entry["error"] is None and entry["image"] == str(inputs / f"{folder}.png")
        assert entry["model"] == "tiny-sd1" and entry["steps"] == 2 and entry["seconds"] > 0
        manifest = json.loads((lib / folder / "manifest.json").read_text())
        assert entry["final_loss"] == manifest["history"]["loss"][-1]
        assert [c["name"] for c in entry["concepts"]] == [c["name"] for c in manifest["concepts"]] == ["concept_1"]
        for concept in entry["concepts"]:
            with Image.open(lib / folder / concept["mask"]) as im:  # the area, measured on the mask picture
                assert concept["area"] == pytest.approx((np.asarray(im) > 127).mean(), abs=1e-6)
            assert concept["area"] >= 0.25 and concept["eot_score"] > 1.0  # min_area; eq. 5 keeps ratios > 1
    for folder, message in FAILED.items():
        assert entries[folder]["status"] == "failed" and message in entries[folder]["error"]
        assert message in output
    assert "2 done, 2 failed" in output and "Traceback" not in output

    # the same files as 'extract' writes for that image with the same settings (its own run of the command)
    code, _, err = run_main("extract", inputs / "b_discs.png", *SETTINGS, "--out", tmp_path / "single")
    assert code == 0, err
    same_set(tmp_path / "single", lib / "b_discs")
    assert (lib / "b_discs" / "concept_1.safetensors").stat().st_size > 0


def test_second_run_does_nothing_and_a_deleted_set_is_redone_alone(local_library, tmp_path):
    inputs, shared, _ = local_library
    lib = tmp_path / "lib"
    shutil.copytree(shared, lib)
    before = tree(lib)
    code, _, err = run_main("extract-many", inputs, "--out", lib, *SETTINGS)
    assert code == 0 and "nothing to do" in err
    assert tree(lib) == before  # not a file touched, not even the index

    kept = load_file(lib / "b_discs" / "concept_1.safetensors")["emb_params"]
    shutil.rmtree(lib / "b_discs")
    code, out, err = run_main("extract-many", inputs, "--out", lib, *SETTINGS)
    assert code == 0, err
    assert "1 done, 0 failed, 0 crashed, 3 already finished" in out
    after = tree(lib)
    assert {k: v for k, v in after.items() if k.startswith("a_gray/")} == {
        k: v for k, v in before.items() if k.startswith("a_gray/")
    }
    assert torch.equal(load_file(lib / "b_discs" / "concept_1.safetensors")["emb_params"], kept)
    statuses = {e["folder"]: e["status"] for e in json.loads((lib / "index.json").read_text())["images"]}
    assert statuses == {"a_gray": "done", "b_discs": "done", "c_busy": "failed", "d_broken": "failed"}
    assert not (lib / ".staging").exists()


def test_ctrl_c_keeps_finished_images_and_the_next_run_resumes(local_library, tmp_path, monkeypatch):
    inputs, shared, _ = local_library
    lib = tmp_path / "lib"
    marker = tmp_path / "interrupted"
    monkeypatch.setenv("CONCEPT_EXPRESS_TEST_CRASH", f"int:b_discs:1:{marker}")  # SIGINT inside b_discs' training
    # Ctrl-C as in a terminal, even where pytest runs as a background job with SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code, _, err = run_main("extract-many", inputs, "--out", lib, *SETTINGS)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert marker.exists() and code == 130, err
    assert "finished images are kept" in err and "Traceback" not in err
    monkeypatch.delenv("CONCEPT_EXPRESS_TEST_CRASH")
    statuses = {e["folder"]: e["status"] for e in json.loads((lib / "index.json").read_text())["images"]}
    assert statuses == {"a_gray": "done", "b_discs": "pending", "c_busy": "pending", "d_broken": "pending"}
    assert sorted(p.name for p in lib.iterdir()) == ["a_gray", "index.html", "index.json"]  # no half-written set

    code, out, err = run_main("extract-many", inputs, "--out", lib, *SETTINGS)
    assert code == 0, err
    assert "1 done, 2 failed, 0 crashed, 1 already finished" in out
    for folder in DONE:
        same_set(shared / folder, lib / folder)


def test_stem_collisions_get_unique_folders_that_stay_theirs(tmp_path):
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        Image.new("RGB", (64, 64)).save(tmp_path / sub / "cat.png")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "dog").mkdir()  # someone else's folder: never used
    images = [tmp_path / "x" / "cat.png", tmp_path / "y" / "cat.png", tmp_path / "dog.png"]
    lib = Library.open(tmp_path / "lib", {"model": "m"})
    assert [e.folder for e in lib.plan(images)] == ["cat", "cat-2", "dog-2"]
    lib.save()
    reopened = Library.open(tmp_path / "lib", {"model": "m"})
    assert [e.folder for e in reopened.plan(list(reversed(images)))] == ["dog-2", "cat-2", "cat"]


def test_failed_images_are_kept_unless_asked_and_crashed_ones_are_redone(tmp_path):
    lib = Library.open(tmp_path, {"model": "m"})
    lib.entries = [
        Entry(str(tmp_path / f"{s}.png"), s, s, {"error": "x"}) for s in ("failed", "crashed", "pending", "done")
    ]
    images = [tmp_path / f"{s}.png" for s in ("failed", "crashed", "pending", "done")]
    assert [e.folder for e in lib.plan(images)] == ["crashed", "pending", "done"]  # done, but its folder is gone
    assert [e.folder for e in lib.plan(images, retry_failed=True)] == ["failed", "crashed", "pending", "done"]


def test_listing_images(tmp_path):
    for name in ("b.jpg", "a.png", "a_mask_1.png", "notes.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.jpg"]  # a_mask_1.png is a's ground truth
    listing = tmp_path / "list.txt"
    listing.write_text("# my images\nb.jpg\n\n" + str(tmp_path / "a.png") + "\nb.jpg\n")
    assert list_images(listing) == [(tmp_path / "b.jpg").resolve(), (tmp_path / "a.png").resolve()]


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "is an empty folder"),
        ("no-images", "holds no images"),
        ("out-is-a-file", "is a file, not a folder"),
        ("missing", "no such folder or file"),
        ("foreign-index", "is not a concept library's index"),
        ("other-settings", "was made with other settings (capture, localize, train differ)"),
        ("unreachable-ray", "cannot reach a Ray cluster at 127.0.0.1:"),
    ],
)
def test_bad_input_is_one_clear_error_and_nothing_is_written(case, message, tmp_path, capsys):
    source, out = write_inputs(tmp_path / "in"), tmp_path / "lib"
    extra = []
    if case == "empty":
        source = tmp_path / "empty"
        source.mkdir()
    elif case == "no-images":
        source = tmp_path / "texts"
        source.mkdir()
        (source / "readme.txt").write_text("no pictures here")
    elif case == "out-is-a-file":
        out.write_text("a file where the library should go")
    elif case == "missing":
        source = tmp_path / "nowhere"
    elif case == "foreign-index":
        out.mkdir()
        (out / "index.json").write_text('{"something": "else"}')
    elif case == "other-settings":
        job = ExtractJob(model="tiny-sd1", localize={"n_max": 10}, train={"steps": 7})
        Library.open(out, job.identity()).save()
    elif case == "unreachable-ray":
        import socket

        with socket.socket() as s:  # a free port on the loopback: nothing listens there
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        extra = ["--ray-address", f"127.0.0.1:{port}"]
    before = tree(tmp_path)
    code = cli_module.main(["extract-many", str(source), "--out", str(out), *SETTINGS, *extra])
    err = capsys.readouterr().err
    assert code == 1 and message in err, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert tree(tmp_path) == before


def test_job_identity_ignores_what_does_not_change_results():
    import dataclasses

    from concept_express.uce_core.train import TrainSettings

    a = ExtractJob("m", train=dataclasses.asdict(TrainSettings(micro_batch=0)), device="cpu")
    b = ExtractJob("m", train=dataclasses.asdict(TrainSettings(micro_batch=4, checkpoint_every=7)), device="cuda")
    c = ExtractJob("m", train=dataclasses.asdict(TrainSettings(seed=1)))
    assert a.identity() == b.identity() != c.identity()
    assert json.loads(json.dumps(a.identity())) == a.identity()  # compares equal to what the index stores
    with pytest.raises(ConceptExpressError, match="not a concept library"):
        Library.open(Path("/nonexistent-library-folder"), None)


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
]


def _chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the gallery test: install Debian's chromium (.ci/run does)")
        pytest.skip("needs Debian's chromium (apt-get install chromium)")
    return found


def _find(screen: np.ndarray, tile: np.ndarray) -> tuple[int, int] | None:
    """Top-left corner of an exact copy of ``tile`` in ``screen`` (both H x W x 3 uint8), or None."""
    h, w = tile.shape[:2]
    height, width = screen.shape[:2]
    ys, xs = np.nonzero(np.all(screen[: height - h + 1, : width - w + 1] == tile[0, 0], axis=-1))
    for y, x in zip(ys, xs):
        if np.array_equal(screen[y, x : x + w], tile[0]) and np.array_equal(screen[y : y + h, x : x + w], tile):
            return int(y), int(x)
    return None


def test_gallery_opened_in_headless_chromium_shows_every_image(local_library, tmp_path):
    import subprocess

    _, lib, _ = local_library
    shot = tmp_path / "gallery.png"
    command = [
        _chromium(),
        *CHROMIUM_FLAGS,
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1000,1600",
        f"--screenshot={shot}",
        (lib / "index.html").resolve().as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and shot.exists(), result.stderr
    with Image.open(shot) as im:
        screen = np.asarray(im.convert("RGB"))
    places = []
    for folder in DONE:  # each set's numbered overlay, pixel for pixel, somewhere on the page
        with Image.open(lib / folder / "concepts.png") as im:
            place = _find(screen, np.asarray(im.convert("RGB")))
        assert place is not None, f"{folder}/concepts.png is not on the rendered page"
        places.append(place)
    assert places == sorted(places)  # in the index's order, top to bottom
    page = (lib / "index.html").read_text()
    for folder, message in FAILED.items():
        assert f"{folder}.png" in page and message.split(":")[-1].strip() in page
    for folder in DONE:
        assert f'src="{folder}/concept_1_mask.png"' in page and f"embedding:{folder}/concept_1" in page


def test_preview_renders_one_sample_per_concept_into_the_gallery(tmp_path):
    inputs = write_inputs(tmp_path / "in")
    listing = tmp_path / "one.txt"
    listing.write_text("in/a_gray.png\n")  # relative to the list's folder
    lib = tmp_path / "lib"
    code, _, err = run_main("extract-many", listing, "--out", lib, *SETTINGS, "--preview", "--preview-steps", "2")
    assert code == 0, err
    (entry,) = json.loads((lib / "index.json").read_text())["images"]
    assert entry["image"] == str(inputs / "a_gray.png") and entry["status"] == "done"
    page = (lib / "index.html").read_text()
    with Image.open(lib / "a_gray" / "image.png") as im:
        size = im.size
    for concept in entry["concepts"]:
        sample = lib / "a_gray" / "samples" / f"{concept['name']}.png"
        with Image.open(sample) as im:
            assert im.size == size and len(np.unique(np.asarray(im).reshape(-1, 3), axis=0)) > 20  # a rendering
        assert f'src="a_gray/samples/{concept["name"]}.png"' in page


def test_progress_bar_shows_images_and_the_current_images_training():
    import io

    from concept_express.uce_core.batch import Display

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    display = Display(stream=screen)
    entries = [Entry("/x/cat.png", "cat"), Entry("/x/dog.png", "dog")]
    display.begin(2, 0)
    display.started(entries[0])
    display.training(entries[0], 3, 10, {"loss": 0.25})
    assert screen.getvalue().rsplit("\r", 1)[-1].startswith("[" + "." * 24 + "] 0/2 images")
    assert "cat: train 3/10 loss 0.2500" in screen.getvalue().rsplit("\r", 1)[-1]
    display.finished(entries[0], "done", {"concepts": [{}, {}], "final_loss": 0.2})
    display.started(entries[1])
    display.training(entries[1], 10, 10, {"loss": 0.5})
    last = screen.getvalue().rsplit("\r", 1)[-1]
    assert last.startswith("[" + "#" * 12 + "." * 12 + "] 1/2 images") and "dog: train 10/10" in last
    assert "cat" not in last and "[1/2] cat.png -> cat/: 2 concept(s), final loss 0.2000\n" in screen.getvalue()
