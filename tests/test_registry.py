"""The pack as the Comfy Registry publishes it: comfy-cli (the registry's own client, COMFY_CLI or `comfy` on PATH)
validates pyproject.toml offline and packs the git-tracked files less .comfyignore (plus `includes`); that package,
unpacked into a custom_nodes folder, is loaded by ComfyUI's own loader (COMFYUI_PATH, ComfyUI's Python) and
registers every node, and ComfyUI's own pyproject parser reads the registry metadata."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from comfy_server import PACK_NAME, comfyui_marks, comfyui_path

from concept_express.nodes import NODE_CLASS_MAPPINGS

ROOT = Path(__file__).resolve().parent.parent
COMFY_CLI = os.environ.get("COMFY_CLI") or shutil.which("comfy")

pytestmark = comfyui_marks(
    pytest.mark.skipif(COMFY_CLI is None, reason="needs comfy-cli (pip install comfy-cli; or COMFY_CLI=path/to/comfy)")
)

# Loads the unpacked package the way ComfyUI's server does (nodes.load_custom_node), with the installed
# `concept_express` made unimportable so nothing can come from outside the package.
LOADER = """
import asyncio, json, sys
sys.modules["concept_express"] = None
sys.path.insert(0, sys.argv[1])
from comfy.cli_args import args
args.cpu = True
import folder_paths
folder_paths.set_input_directory(sys.argv[3])
import nodes
ok = asyncio.run(nodes.load_custom_node(sys.argv[2]))
from comfy_config import config_parser
config = config_parser.extract_node_configuration(sys.argv[2])
ours = {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if sys.modules[v.__module__].__file__.startswith(sys.argv[2])}
print(json.dumps({"ok": ok, "nodes": sorted(ours), "files": sorted({sys.modules[v.__module__].__file__ for v in ours.values()}),
                  "name": config.project.name, "version": config.project.version,
                  "requires_comfyui": config.project.supported_comfyui_version, "icon": config.tool_comfy.icon,
                  "publisher": config.tool_comfy.publisher_id, "repository": config.project.urls.repository}))
"""


def _git_tree(target: Path) -> Path:
    """The repository's tracked files as they are now (committed or not), in a fresh git repository."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
    for name in filter(None, files.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    for command in (["init", "-q"], ["add", "-A"]):
        subprocess.run(["git", *command], cwd=target, check=True, timeout=60, capture_output=True)
    return target


def _comfy(*args, cwd):
    return subprocess.run(
        [COMFY_CLI, "--skip-prompt", "--no-enable-telemetry", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    tree = _git_tree(tmp_path_factory.mktemp("tree"))
    result = _comfy("node", "pack", cwd=tree)
    assert result.returncode == 0, result.stdout + result.stderr
    return tree / "node.zip"


def test_comfy_cli_validates_the_pyproject(tmp_path):
    tree = _git_tree(tmp_path / "tree")
    result = _comfy("node", "validate", cwd=tree)
    assert result.returncode == 0 and "passed" in result.stdout + result.stderr, result.stdout + result.stderr
    # control: the same check refuses a pyproject without a version
    pyproject = tree / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('version = "', 'unversioned = "', 1))
    assert _comfy("node", "validate", cwd=tree).returncode != 0


def test_the_package_ships_what_comfyui_needs_and_nothing_else(package):
    names = zipfile.ZipFile(package).namelist()
    top = {n.split("/")[0] for n in names}
    assert {"__init__.py", "pyproject.toml", "requirements.txt", "nodes", "uce_core", "uce_kernels", "workflows"} <= top
    assert not top & {"tests", "benchmarks", ".ci", ".github", "docs"}
    assert "assets/example.png" in names  # copied into ComfyUI's input folder for the templates
    assert not [n for n in names if n.startswith("assets/") and n != "assets/example.png"]
    assert not [n for n in names if n.startswith("uce_core/world/weights/")]  # the CLI demo's model, 25 MB
    assert {n for n in names if n.startswith("workflows/")} == {
        str(p.relative_to(ROOT)) for p in (ROOT / "workflows").iterdir()
    }


def test_the_package_loads_in_comfyui_and_registers_every_node(package, tmp_path):
    pack = tmp_path / "custom_nodes" / PACK_NAME
    zipfile.ZipFile(package).extractall(pack)
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(comfyui_path()), str(pack), str(tmp_path / "input")],
        cwd=comfyui_path(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["ok"] is True, result.stderr[-3000:]
    assert loaded["nodes"] == sorted(NODE_CLASS_MAPPINGS)
    assert all(f.startswith(str(pack)) for f in loaded["files"])
    assert (tmp_path / "input" / "concept-express-example.png").is_file()
    # the registry metadata, as ComfyUI's own parser reads it
    assert loaded["name"] == "concept-express" and loaded["publisher"] == "concept-express"
    assert loaded["requires_comfyui"] == ">=0.8.0"
    assert loaded["repository"].startswith("https://github.com/")
    icon = loaded["icon"]
    assert icon.startswith("https://raw.githubusercontent.com/") and icon.endswith("/main/assets/icon.png")
    assert (ROOT / "assets" / "icon.png").is_file()
