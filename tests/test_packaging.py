"""The package as users install it: one import name, no ComfyUI needed, the README's commands, the CLI."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def _run(*args, **kwargs):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, **kwargs)


def test_imports_without_comfyui_and_exposes_node_mappings():
    code = (
        "import sys, concept_express, concept_express.uce_core, concept_express.uce_kernels, concept_express.nodes; "
        "assert 'comfy' not in sys.modules and 'folder_paths' not in sys.modules; "
        "assert isinstance(concept_express.NODE_CLASS_MAPPINGS, dict); print('ok')"
    )
    result = _run("-c", code, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_no_folder_of_the_checkout_shadows_an_installed_package():
    """`python ...` run in the checkout puts its folder first on sys.path, so a top-level package folder named like an
    installed distribution's module hides it: transformers >= 5.25 requires `kernels` and, when our layer was called
    kernels/, `import transformers` from the checkout loaded ours and diffusers failed to import."""
    from importlib.metadata import packages_distributions

    installed = packages_distributions()
    ours = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert ours, ROOT
    assert not {name: installed[name] for name in ours if name in installed}
    result = _run("-c", "from transformers import PreTrainedModel; import diffusers.models; print('ok')", cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]


def test_wheel_installs_one_package_with_its_data(tmp_path):
    """A real wheel: everything under concept_express/ (no top-level nodes/uce_kernels/uce_core), configs and the
    example image included, tests excluded."""
    import zipfile

    args = ["-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)]
    try:
        import setuptools  # noqa: F401

        args.insert(4, "--no-build-isolation")
    except ImportError:
        pass
    result = _run(*args)
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if ".dist-info/" not in n}
    assert top == {"concept_express"}, top
    for needed in (
        "concept_express/__init__.py",
        "concept_express/uce_core/cli.py",
        "concept_express/uce_core/backends/configs/sdxl/unet/config.json",
        "concept_express/assets/example.png",
        "concept_express/uce_kernels/__init__.py",
    ):
        assert needed in names, needed
    assert not [n for n in names if n.startswith("concept_express/tests/")]
    entry_points = [n for n in names if n.endswith("entry_points.txt")]
    assert (
        "concept-express = concept_express.uce_core.cli:main" in zipfile.ZipFile(wheel).read(entry_points[0]).decode()
    )


def test_requirements_txt_leaves_torch_alone():
    lines = [
        l.split(";")[0].strip()
        for l in (ROOT / "requirements.txt").read_text().splitlines()
        if l.strip() and not l.startswith("#")
    ]
    names = {l.split(">")[0].split("=")[0].split("<")[0].strip().lower() for l in lines}
    assert not names & {"torch", "torchvision", "torchaudio"}
    assert {"diffusers", "transformers", "pot", "numpy", "safetensors", "pillow"} <= names


def test_ci_runs_the_readmes_test_command():
    sys.path.insert(0, str(ROOT / ".ci"))
    try:
        from readme_command import readme_command
    finally:
        sys.path.pop(0)
    test_command = readme_command("test")
    assert "pip install" in test_command and "pytest" in test_command
    ci = (ROOT / ".ci/run").read_text()
    assert "TRITON_INTERPRET=1" in ci
    assert "readme_command.py test" in ci
    # lint first (a pinned ruff), then the README's command, then the real-ComfyUI suite with nothing skipped
    assert ci.index("ruff==$RUFF_VERSION") < ci.index("readme_command.py test") < ci.index("-m pytest -m comfyui")
    # the mutation catalogue after the README's command (its .venv), before the real-ComfyUI step
    assert (
        ci.index("readme_command.py test")
        < ci.index(".venv/bin/python tests/mutations/run.py")
        < ci.index("-m pytest -m comfyui")
    )
    assert re.search(r"^RUFF_VERSION=\d+\.\d+\.\d+$", ci, re.M) and "CONCEPT_EXPRESS_REQUIRE_ALL=1" in ci
    demo = readme_command("demo")
    assert "concept-express" in demo and "--demo" in demo
    # exactly two set-up commands on the README's first screen
    assert (ROOT / "README.md").read_text().count("<!-- command:") == 2


def test_cli_help_reads_well():
    result = _run("-m", "concept_express.uce_core.cli", "--help")
    assert result.returncode == 0
    assert "capture" in result.stdout and "textual-inversion" in result.stdout
    sub = _run("-m", "concept_express.uce_core.cli", "capture", "--help")
    assert "--model" in sub.stdout and "--demo" in sub.stdout and "--resize" in sub.stdout


def test_cli_capture_demo_writes_readable_previews(tmp_path):
    result = _run("-m", "concept_express.uce_core.cli", "capture", "--demo", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "model: world" in result.stdout  # the demo's model: the scene world's
    for name in ("attention_rows.png", "eot.png"):
        with Image.open(tmp_path / name) as im:
            im.load()
            assert im.width > 200 and im.height > 100
            pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
            assert len(np.unique(pixels, axis=0)) > 50  # a real picture, not a blank sheet
    assert (tmp_path / "attention.safetensors").stat().st_size > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_cli_errors_are_one_clear_line(tmp_path):
    bad = tmp_path / "photo.jpg"
    bad.write_text("not a picture")
    result = _run(
        "-m", "concept_express.uce_core.cli", "capture", str(bad), "--model", "tiny-sd1", "--out", str(tmp_path / "o")
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "not an image" in result.stderr
    assert "Traceback" not in result.stderr
    missing_model = _run("-m", "concept_express.uce_core.cli", "capture", str(bad))
    assert missing_model.returncode == 1 and "--model" in missing_model.stderr


@pytest.mark.skipif(not os.access(ROOT, os.W_OK), reason="needs a writable checkout")
def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "concept-express"
    assert exe.exists()
