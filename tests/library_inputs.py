"""Inputs for the concept-library tests: four images whose outcome with the random-weight tiny-sd1 at ``--min-area
0.25`` is known (measured once, and it is deterministic: the tiny model is built from a fixed seed).

* ``a_gray.png``: a flat grey picture; one region covers 47 % of the grid -> one concept;
* ``b_discs.png``: three discs on a red ground; one region covers 50 % -> one concept;
* ``c_busy.png``: five discs; no region reaches 25 % of the grid -> no concept (every one is smaller than min_area);
* ``d_broken.png``: not an image at all.
"""

import subprocess
import sys

import numpy as np
from PIL import Image, ImageDraw

SETTINGS = ["--model", "tiny-sd1", "--steps", "2", "--merge-step", "1", "--min-area", "0.25"]
DONE = ["a_gray", "b_discs"]
FAILED = {"c_busy": "less than min_area=0.25", "d_broken": "d_broken.png: not an image that can be read"}


def discs(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (128, 128), tuple(int(x) for x in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = rng.integers(0, 90, 2)
        r = rng.integers(15, 40)
        draw.ellipse([x, y, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return image


def write_inputs(folder):
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (128, 128), (128, 128, 128)).save(folder / "a_gray.png")
    discs(2).save(folder / "b_discs.png")
    discs(3).save(folder / "c_busy.png")
    (folder / "d_broken.png").write_bytes(b"not a picture, whatever the name says")
    return folder


def run_main(*args) -> tuple[int, str, str]:
    """The command in this process (the model-free imports are paid once): exit code, stdout, stderr."""
    import contextlib
    import io

    from concept_express.uce_core import cli as cli_module

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_module.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def cli(*args, env=None, timeout=600):
    """The command in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "concept_express.uce_core.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def tree(root):
    """Relative path -> (size, mtime_ns) of every file under ``root``."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}
