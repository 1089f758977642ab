"""The pack in a folder named the way users get it (``git clone`` into custom_nodes gives
``comfyui-concept-express``, not a Python name): ComfyUI's way of importing it works, and so does this test suite."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDER = "comfyui-concept-express"


def _copy_tracked_tree(target: Path) -> None:
    """The repository's files (not its build outputs) under ``target``."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
    for name in filter(None, files.decode().split("\0")):
        source = ROOT / name
        if source.is_file() and not name.startswith("workflows/"):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(source.read_bytes())


def test_comfyui_style_import_from_a_dashed_folder(tmp_path):
    """What ComfyUI's load_custom_node does: the folder's __init__.py imported under its path-derived name."""
    pack = tmp_path / "custom_nodes" / FOLDER
    _copy_tracked_tree(pack)
    name = str(pack).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, pack / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        assert set(module.NODE_CLASS_MAPPINGS) >= {"CaptureAttention", "TrainConceptTokens", "LoadConceptTokens"}
        assert module.NODE_CLASS_MAPPINGS["CaptureAttention"].__module__.startswith(name)
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def test_pytest_collects_the_suite_in_a_dashed_folder(tmp_path):
    """pytest imports the root __init__.py on its own (setting up the root package) when the folder is not a Python
    name; that must not fail."""
    checkout = tmp_path / FOLDER
    _copy_tracked_tree(checkout)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_nodes.py", "-k", "compose_text"],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 passed" in result.stdout
