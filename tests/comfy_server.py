"""Test support: a real ComfyUI server with this pack, started in a subprocess on 127.0.0.1, and a small client.

The server gets its own temporary folders (custom_nodes with a link to this repository, checkpoints, embeddings,
input, output, user) through ``--extra-model-paths-config`` and the directory options, so it never touches the
ComfyUI tree's own models or outputs. It runs under ``timeout`` so that it ends by itself even if the test process
is killed; the fixture that starts it always stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACK_NAME = "comfyui-concept-express"  # the folder name a user's clone gets in custom_nodes
SERVER_LIFETIME_S = 3 * 3600  # hard limit for one server process (one serves the whole real-ComfyUI suite)
TERMINAL = {"execution_success", "execution_error", "execution_interrupted"}


def comfyui_path() -> Path | None:
    value = os.environ.get("COMFYUI_PATH")
    return Path(value) if value else None


def comfyui_marks(*extra) -> list:
    """A module's pytestmark when its tests run against a real ComfyUI: the comfyui mark, ``extra`` marks, and the
    skip without COMFYUI_PATH (counted as a failure in CI: CONCEPT_EXPRESS_REQUIRE_ALL)."""
    import pytest

    needs = pytest.mark.skipif(
        comfyui_path() is None, reason="needs COMFYUI_PATH (a ComfyUI tree; run pytest with ComfyUI's Python)"
    )
    return [pytest.mark.comfyui, *extra, needs]


def checkpoint_cache() -> Path:
    """Where the random-weight test checkpoints are kept between runs (outside the repository)."""
    value = os.environ.get("CONCEPT_EXPRESS_TEST_CACHE")
    path = Path(value) if value else Path.home() / ".cache" / "concept-express-tests"
    path.mkdir(parents=True, exist_ok=True)
    return path


# File names of the test checkpoints (a new name whenever comfy_checkpoints changes an architecture, so that a cache
# never serves an old one).
CHECKPOINTS = {"sd15": "concept-express-test-sd15-v2.safetensors", "sdxl": "concept-express-test-sdxl.safetensors"}


def ensure_checkpoint(kind: str) -> Path:
    """The cached ``kind`` ("sd15" or "sdxl") checkpoint that ComfyUI's loader detects as that family."""
    from comfy_checkpoints import save_comfy_checkpoint

    return save_comfy_checkpoint(kind, checkpoint_cache() / CHECKPOINTS[kind])


def ensure_instruct_pix2pix_unet() -> Path:
    """A diffusion-model file (UNet only, for Load Diffusion Model) that ComfyUI detects as SD1.5 InstructPix2Pix:
    the SD1.5 test UNet with 8 input channels. ConceptExpress does not support that model type."""
    import torch
    from safetensors.torch import load_file, save_file

    path = checkpoint_cache() / "concept-express-test-sd15-v2-ip2p-unet.safetensors"
    if not path.exists():
        prefix = "model.diffusion_model."
        state = {k[len(prefix) :]: v for k, v in load_file(ensure_checkpoint("sd15")).items() if k.startswith(prefix)}
        conv = state["input_blocks.0.0.weight"]
        state["input_blocks.0.0.weight"] = torch.cat([conv, torch.zeros_like(conv)], dim=1).contiguous()
        tmp = path.with_suffix(".partial")
        save_file(state, str(tmp))
        tmp.rename(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``main.py --cpu`` on a free loopback port with its own folders under ``base``."""

    def __init__(self, comfyui: Path, base: Path):
        self.comfyui, self.base = Path(comfyui), Path(base)
        self.python = sys.executable  # the tests import comfy themselves, so they already run on ComfyUI's Python
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None
        for sub in (
            "custom_nodes",
            "models/checkpoints",
            "models/embeddings",
            "models/diffusion_models",
            "input",
            "output",
            "user",
            "temp",
        ):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_NAME
        if not link.exists():
            link.symlink_to(ROOT, target_is_directory=True)
        self.embeddings = self.base / "models" / "embeddings"
        self.output = self.base / "output"
        self.input = self.base / "input"
        self.log_path = self.base / "server.log"
        (self.base / "extra_model_paths.yaml").write_text(
            "concept_express_tests:\n"
            f"    base_path: {self.base}\n"
            "    is_default: true\n"
            "    custom_nodes: custom_nodes\n"
            "    checkpoints: models/checkpoints\n"
            "    embeddings: models/embeddings\n"
            "    diffusion_models: models/diffusion_models\n",
            encoding="utf-8",
        )

    def add_checkpoint(self, path: Path, folder: str = "checkpoints", name: str | None = None) -> str:
        name = name or path.name
        target = self.base / "models" / folder / name
        if not target.exists():
            target.symlink_to(Path(path).resolve())
        return name

    def start(self, timeout: float = 180) -> ComfyServer:
        command = [
            self.python,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--extra-model-paths-config",
            str(self.base / "extra_model_paths.yaml"),
            "--disable-all-custom-nodes",
            "--whitelist-custom-nodes",
            PACK_NAME,
            "--input-directory",
            str(self.input),
            "--output-directory",
            str(self.output),
            "--user-directory",
            str(self.base / "user"),
            "--temp-directory",
            str(self.base / "temp"),
            "--database-url",
            "sqlite:///:memory:",
            "--disable-auto-launch",
        ]
        if shutil.which("timeout"):
            command = ["timeout", "--kill-after=10", str(SERVER_LIFETIME_S)] + command
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.log_file = open(self.log_path, "w", encoding="utf-8")
        self.process = subprocess.Popen(
            command, cwd=self.comfyui, stdout=self.log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()[-5000:]}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout} s:\n{self.log()[-5000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=20)
        if getattr(self, "log_file", None):
            self.log_file.close()

    def peak_memory_gib(self) -> float:
        """The server process's peak resident memory so far (Linux VmHWM), GiB."""
        pid = self.process.pid
        for candidate in [pid, *_children(pid)]:
            status = Path(f"/proc/{candidate}/status")
            if status.exists() and "main.py" in Path(f"/proc/{candidate}/cmdline").read_text(errors="replace"):
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 2**20
        raise RuntimeError("cannot read the server's memory")

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    # -- HTTP -------------------------------------------------------------------------------------------------------
    def request(self, path: str, data=None, timeout: float = 60):
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(
            self.url + path,
            data=body,
            headers={"Content-Type": "application/json"},
            method="GET" if data is None else "POST",
        )
        with urllib.request.urlopen(req, timeout=timeout) as response:
            raw = response.read()
            kind = response.headers.get("Content-Type", "")
            return json.loads(raw) if "json" in kind else raw

    def get(self, path: str, timeout: float = 60):
        return self.request(path, timeout=timeout)

    def post(self, path: str, data, timeout: float = 60):
        return self.request(path, data=data, timeout=timeout)

    def object_info(self, name: str | None = None) -> dict:
        return self.get("/object_info" + (f"/{name}" if name else ""))

    def view(self, image: dict) -> bytes:
        query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
        return self.get(f"/view?{query}")

    def run(self, prompt: dict, timeout: float = 600, on_message=None) -> Run:
        """Queue ``prompt`` and follow it on the websocket until it ends; ``on_message(run, message)`` (async) is
        called for each message of this prompt."""
        return asyncio.run(asyncio.wait_for(self._run(prompt, on_message), timeout))

    async def _run(self, prompt, on_message):
        import aiohttp

        client_id = uuid.uuid4().hex
        run = Run(self)
        start = time.monotonic()
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{self.url}/ws?clientId={client_id}", max_msg_size=0) as ws:
                async with session.post(f"{self.url}/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
                    answer = await r.json()
                    if r.status != 200:
                        raise PromptRejected(answer)
                run.prompt_id = answer["prompt_id"]
                async for raw in ws:
                    if raw.type != aiohttp.WSMsgType.TEXT:
                        continue
                    message = json.loads(raw.data)
                    data = message.get("data") or {}
                    if data.get("prompt_id") not in (None, run.prompt_id):
                        continue
                    message["t"] = time.monotonic() - start
                    run.messages.append(message)
                    if on_message is not None:
                        await on_message(run, message, session)
                    if message["type"] in TERMINAL and data.get("prompt_id") == run.prompt_id:
                        run.status = message["type"]
                        break
        for _ in range(50):  # the history entry is written right after the last message
            history = self.get(f"/history/{run.prompt_id}")
            if run.prompt_id in history:
                run.history = history[run.prompt_id]
                break
            time.sleep(0.1)
        return run


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


class PromptRejected(Exception):
    """POST /prompt answered with an error (validation); ``args[0]`` is the server's JSON."""


@dataclass
class Run:
    server: ComfyServer
    prompt_id: str = ""
    status: str = ""
    messages: list = field(default_factory=list)
    history: dict = field(default_factory=dict)

    def of_type(self, kind: str) -> list[dict]:
        return [m["data"] for m in self.messages if m["type"] == kind]

    def error(self) -> dict:
        (error,) = self.of_type("execution_error")
        return error

    def executed_nodes(self) -> set[str]:
        """Nodes that ran in this prompt (not served from the cache)."""
        return {m["node"] for m in self.of_type("executing") if m.get("node") is not None}

    def cached_nodes(self) -> set[str]:
        return {n for m in self.of_type("execution_cached") for n in m["nodes"]}

    def node_seconds(self, node: str) -> float:
        """From the node's "executing" message to the next one (how long the node ran)."""
        times = [
            (m["t"], m["data"].get("node")) for m in self.messages if m["type"] == "executing" or m["type"] in TERMINAL
        ]
        for (t, n), (t_next, _) in zip(times, times[1:]):
            if n == node:
                return t_next - t
        raise KeyError(f"node {node} did not run")

    def progress(self, node: str) -> list[int]:
        return [m["value"] for m in self.of_type("progress") if m.get("node") == node]

    def images(self, node: str) -> list[dict]:
        return self.history.get("outputs", {}).get(node, {}).get("images", [])


def artifacts_dir(tmp_path_factory) -> Path:
    """Where the real-ComfyUI tests leave screenshots and server logs: $CONCEPT_EXPRESS_ARTIFACTS, else a folder in
    pytest's temporary directory (printed by the tests that write there)."""
    value = os.environ.get("CONCEPT_EXPRESS_ARTIFACTS")
    path = Path(value) if value else tmp_path_factory.getbasetemp() / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def running_server(tmp_path_factory, name: str, checkpoints=("sd15",)):
    """A started server with the test checkpoints and an empty input folder (the pack puts its example image there
    when ComfyUI loads it); stopped on exit, its log kept in the artifacts as ``<name>-server.log``."""
    comfyui = comfyui_path()
    server = ComfyServer(comfyui, tmp_path_factory.mktemp(f"comfyui-{name}"))
    for kind in checkpoints:
        server.add_checkpoint(ensure_checkpoint(kind))
    try:
        yield server.start()
    finally:
        server.stop()
        if server.log_path.exists():
            shutil.copy(server.log_path, artifacts_dir(tmp_path_factory) / f"{name}-server.log")
