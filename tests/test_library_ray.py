"""extract-many on a local Ray instance (2 worker slots): the same library as the local engine, and a worker killed in
the middle of an image is retried. Each run starts and stops its own Ray instance on the loopback interface."""

import json
import os

import pytest
import torch
from library_inputs import DONE, FAILED, SETTINGS, cli, run_main, write_inputs
from safetensors.torch import load_file

pytest.importorskip("ray", reason='Ray is an optional extra: pip install -e ".[ray]" (the test extra includes it)')

RAY = ["--ray", "--workers", "2", "--cpus-per-task", "1"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("ray") / "in")


def test_ray_with_two_workers_writes_the_library_the_local_loop_writes(inputs, tmp_path):
    from test_library import same_set

    code, _, err = run_main("extract-many", inputs, "--out", tmp_path / "local", *SETTINGS, "--threads", "1")
    assert code == 0, err
    result = cli("extract-many", inputs, "--out", tmp_path / "ray", *SETTINGS, *RAY)  # 1 torch thread per image
    assert result.returncode == 0, result.stderr
    assert "local Ray instance: 2 task slot(s)" in result.stderr and "2 done, 2 failed" in result.stdout
    local, ray = (json.loads((tmp_path / x / "index.json").read_text()) for x in ("local", "ray"))
    assert local["job"] == ray["job"]
    strip = ("seconds", "finished")
    by_folder = {
        name: {e["folder"]: {k: v for k, v in e.items() if k not in strip} for e in index["images"]}
        for name, index in (("local", local), ("ray", ray))
    }
    assert by_folder["local"] == by_folder["ray"]
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == sorted(
        p.name for p in (tmp_path / "local").iterdir()
    )
    for folder in DONE:
        same_set(tmp_path / "local" / folder, tmp_path / "ray" / folder)
    for folder, message in FAILED.items():
        assert by_folder["ray"][folder]["status"] == "failed" and message in by_folder["ray"][folder]["error"]


def test_a_worker_killed_in_the_middle_of_an_image_is_retried(inputs, tmp_path):
    listing = tmp_path / "two.txt"
    listing.write_text(f"{inputs / 'b_discs.png'}\n{inputs / 'a_gray.png'}\n")
    marker = tmp_path / "killed"
    # the worker running b_discs exits (os._exit) when its training reaches step 1, once
    env = {**os.environ, "CONCEPT_EXPRESS_TEST_CRASH": f"kill:b_discs:1:{marker}"}
    result = cli("extract-many", listing, "--out", tmp_path / "lib", *SETTINGS, *RAY, env=env)
    assert result.returncode == 0, result.stderr
    assert marker.exists()  # the worker did die in the middle of b_discs
    index = json.loads((tmp_path / "lib" / "index.json").read_text())
    assert {e["folder"]: e["status"] for e in index["images"]} == {"b_discs": "done", "a_gray": "done"}
    assert "2 done, 0 failed, 0 crashed" in result.stdout

    reference = tmp_path / "reference"
    code, _, err = run_main("extract-many", listing, "--out", reference, *SETTINGS, "--threads", "1")
    assert code == 0, err
    for folder in ("b_discs", "a_gray"):
        name = "concept_1.safetensors"
        assert torch.equal(
            load_file(tmp_path / "lib" / folder / name)["emb_params"],
            load_file(reference / folder / name)["emb_params"],
        )


def test_a_task_that_keeps_dying_is_recorded_as_crashed_and_redone_next_time(inputs, tmp_path):
    listing = tmp_path / "one.txt"
    listing.write_text(f"{inputs / 'a_gray.png'}\n")
    marker = tmp_path / "killed"
    env = {**os.environ, "CONCEPT_EXPRESS_TEST_CRASH": f"kill:a_gray:1:{marker}"}
    result = cli("extract-many", listing, "--out", tmp_path / "lib", *SETTINGS, *RAY, "--max-retries", "0", env=env)
    assert result.returncode == 1 and marker.exists()
    assert "1 image(s) crashed: run the same command again" in result.stdout
    (entry,) = json.loads((tmp_path / "lib" / "index.json").read_text())["images"]
    assert entry["status"] == "crashed" and entry["error"].startswith("WorkerCrashedError"), entry
    assert entry["error"].endswith("(tried 1 time(s))")
    assert not (tmp_path / "lib" / "a_gray").exists()
    code, out, err = run_main("extract-many", listing, "--out", tmp_path / "lib", *SETTINGS)  # marker: no crash now
    assert code == 0 and "1 done, 0 failed, 0 crashed, 0 already finished" in out, err
