"""Draws docs/images/world-demo.png, the README's picture of the demo: the demo scene, the ``concepts.png`` that
``concept-express extract --demo`` writes, and two renders of "a photo of {i}" for each learned token, in rows of
six pictures, made with the README's own commands (on the CPU: a few minutes).

    python docs/images/make_world_demo.py [--out demo-output]
"""

import argparse
import subprocess
import sys
from pathlib import Path

from PIL import Image

from concept_express.uce_core.cli_options import DEMO_IMAGE

TILE, COLUMNS = 256, 6


def concept_count(folder: Path) -> int:
    return len(sorted(folder.glob("concept_*_mask.png")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="demo-output", help="the demo's output folder (made if absent)")
    args = parser.parse_args()
    out = Path(args.out)
    command = [sys.executable, "-m", "concept_express.uce_core.cli"]
    if not (out / "manifest.json").is_file():
        subprocess.run([*command, "extract", "--demo", "--out", str(out)], check=True)
    tiles = [Image.open(DEMO_IMAGE).convert("RGB"), Image.open(out / "concepts.png").convert("RGB")]
    for i in range(1, concept_count(out) + 1):
        renders = out / "renders" / str(i)
        subprocess.run([*command, "generate", "--concepts", str(out), "--prompt", f"a photo of {{{i}}}",
                        "--count", "2", "--out", str(renders)], check=True)  # fmt: skip
        tiles += [Image.open(p).convert("RGB") for p in sorted(renders.glob("*.png"))]
    columns, rows = min(COLUMNS, len(tiles)), -(-len(tiles) // COLUMNS)
    sheet = Image.new("RGB", (columns * (TILE + 4) - 4, rows * (TILE + 4) - 4), "white")
    for k, tile in enumerate(tiles):
        row, column = divmod(k, COLUMNS)
        sheet.paste(tile.resize((TILE, TILE), Image.Resampling.LANCZOS), (column * (TILE + 4), row * (TILE + 4)))
    target = Path(__file__).with_name("world-demo.png")
    sheet.quantize(colors=256).save(target, optimize=True)  # a palette keeps the repository small
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
