"""benchmarks/gpu_run.sh + gpu_run.py, the one-command GPU run: its dry run on the CPU (tiny sizes, Triton under the
interpreter) goes through the installer and every section, and the report's target logic is checked on a hand-made
report. The figures of a dry run mean nothing; what is checked is that the script runs and reports correctly."""

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_run  # noqa: E402
import gpu_sections  # noqa: E402


def probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel, standing in for the wheels carried to the GPU machine."""
    files = {
        "gpu_run_probe.py": "INSTALLED = True\n",
        "gpu_run_probe-0.0.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: gpu-run-probe\nVersion: 0.0.0\n",
        "gpu_run_probe-0.0.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append("gpu_run_probe-0.0.0.dist-info/RECORD,,")
    files["gpu_run_probe-0.0.0.dist-info/RECORD"] = "\n".join(record) + "\n"
    path = folder / "gpu_run_probe-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    return path


@pytest.mark.slow
def test_dry_run_installs_the_wheels_runs_every_section_and_reports(tmp_path):
    wheels, site, out = tmp_path / "wheels", tmp_path / "site", tmp_path / "report"
    wheels.mkdir()
    probe_wheel(wheels)
    env = dict(os.environ, PYTHON=sys.executable, GPU_RUN_WHEELS=str(wheels), GPU_RUN_SITE=str(site))
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1900,  # the dry run's own budget is 1800 s (a loaded 2-core machine); about 45 s on a quiet one
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (site / "gpu_run_probe.py").is_file()  # the carried wheels were installed where PYTHONPATH points
    report = json.loads((out / "gpu_run.json").read_text())
    sections = report["sections"]
    assert list(sections) == [name for name, _ in gpu_run.SECTIONS]
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(sections, "ok")
    errors = [r for s in sections.values() for r in s["rows"] if "error" in r]
    assert not errors

    env_row = sections["environment"]["rows"][0]
    assert env_row["package_matches_tree"] and env_row["versions"]["torch"]

    kernel = [r for r in sections["kernels"]["rows"] if r["kind"] == "kernel"]
    plan = gpu_run.PLANS["dry-run"]
    assert {r["n"] for r in kernel} == set(plan["kernel_n"])
    assert len(kernel) == 9 * len(plan["kernel_n"])  # 3 precisions x (kernel, whole call), torch path, 2 plain
    assert all(r["wrong_outside_ties"] == 0 and r["ms"] > 0 for r in kernel)  # every variant against float64

    guard = [r for r in sections["localization"]["rows"] if r["kind"] == "guard"]
    assert guard and all(r["warm_checks"] and all(c["ok"] for c in r["warm_checks"]) for r in guard)
    assert all(r["refused"] is None for r in guard)
    agreement = [r for r in sections["localization"]["rows"] if r["kind"] == "localize-agreement"]
    assert agreement and all(r["same_masks"] for r in agreement)

    train = sections["training"]["rows"]
    assert [r["mode"] for r in train] == gpu_sections.update_modes()
    assert train[0]["default"] and any(r["official_loop"] for r in train)
    assert all(r["steps_per_s"] > 0 and r["peak_gib"] > 0 for r in train)

    capture = sections["capture"]["rows"]
    assert [r["model"] for r in capture] == plan["capture_models"]
    assert all(r["n"] == (r["px"] // 8) ** 2 and r["capture_ms"] > 0 for r in capture)

    assert report["targets"] and all(t["value"] is not None and t["met"] in (True, False) for t in report["targets"])
    text = (out / "gpu_run.md").read_text()
    assert "DRY RUN" in text and "## Targets" in text and "## Capture" in text


def test_without_cuda_the_full_run_refuses_with_one_clear_message(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_run.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode != 0 and "no CUDA device" in done.stderr and "--dry-run" in done.stderr
    assert "Traceback" not in done.stderr


def kernel_row(variant, precision, ms, wrong_outside_ties=0, n=4096):
    return {
        "kind": "kernel",
        "n": n,
        "variant": variant,
        "precision": precision,
        "ms": ms,
        "wrong_outside_ties": wrong_outside_ties,
    }


def test_targets_take_the_fastest_fp32_level_kernel_and_the_fastest_plain_torch():
    rows = [
        kernel_row("triton ieee, kernel", "ieee", 1.2),
        kernel_row("triton tf32x3, kernel", "tf32x3", 0.9, wrong_outside_ties=3),  # not fp32-level here
        kernel_row("triton tf32, kernel", "tf32", 0.5),  # never fp32-level
        kernel_row("triton ieee, whole call", "ieee", 0.1),  # not the kernel
        kernel_row("plain torch n x n, fp32 GEMM", "fp32", 3.0),
        kernel_row("plain torch n x n, TF32 GEMM", "tf32", 2.0),
        kernel_row("triton ieee, kernel", "ieee", 0.01, n=9216),  # another size
    ]
    local = [
        {"kind": "localize", "n": 4096, "backend": "torch", "ms": 5.0},
        {"kind": "localize", "n": 4096, "backend": "auto", "ms": 25.0},
        {
            "kind": "guard",
            "n": 4096,
            "check_ms": 0.2,
            "first_check_ms": 900.0,
            "localize_ms": 25.0,
            "warm_checks": [{}],
        },
    ]
    train = [
        {
            "kind": "train",
            "mode": "a",
            "default": True,
            "official_loop": False,
            "px": 512,
            "concepts": 5,
            "peak_gib": 11.0,
        },
        {
            "kind": "train",
            "mode": "b",
            "default": False,
            "official_loop": True,
            "px": 512,
            "concepts": 5,
            "peak_gib": 11.5,
        },
    ]
    report = {
        "plan": gpu_run.PLANS["gpu"],
        "sections": {"kernels": {"rows": rows}, "localization": {"rows": local}, "training": {"rows": train}},
    }
    got = [(t["value"], t["met"]) for t in gpu_run.targets(report)]
    assert got[0] == ("1.200 ms (ieee)", True)
    assert got[1] == ("1.67x (plain torch n x n, TF32 GEMM: 2.000 ms)", False)
    assert got[2] == ("25.00 ms", False)  # the auto row, not the torch path's
    assert got[3][1] is True and got[3][0].startswith("0.20 ms = 0.80 %")
    assert got[4] == ("11.81 GB (11.00 GiB)", True)  # 12 GB = 12e9 bytes = 11.18 GiB
    assert got[5] == ("12.35 GB (11.50 GiB)", False)


def test_update_modes_come_from_the_code_and_names_it_refuses_are_dropped(monkeypatch):
    from concept_express.uce_core.train import TrainSettings

    modes = gpu_sections.update_modes()
    assert modes[0] == TrainSettings().update and gpu_sections.OFFICIAL_LOOP in modes
    for mode in modes:
        TrainSettings(update=mode).validate()
    monkeypatch.setattr(gpu_sections, "OTHER_UPDATE_MODES", ("no-such-mode", *gpu_sections.OTHER_UPDATE_MODES))
    assert gpu_sections.update_modes() == modes
