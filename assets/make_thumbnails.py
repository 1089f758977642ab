"""Makes the templates' thumbnails (workflows/<title>.jpg, what the Templates dialog shows on each card) from what
the templates produced in a real ComfyUI run: the artifacts folder of the real-ComfyUI tests (.ci/run writes
artifacts/). The extract template's card shows its contact sheet (the numbered concepts beside every render); the
reuse template's card shows the concept set's overlay beside its render, and the masks template's card the painted
concept beside its render.

    python assets/make_thumbnails.py artifacts/
"""

import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT.parent))
WIDTH, HEIGHT = 800, 450  # landscape, like the cards


def fit(picture: Image.Image) -> Image.Image:
    """``picture`` scaled into WIDTH x HEIGHT on the sheet's dark background."""
    picture = picture.convert("RGB")
    scale = min(WIDTH / picture.width, HEIGHT / picture.height)
    picture = picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.LANCZOS)
    card = Image.new("RGB", (WIDTH, HEIGHT), (24, 24, 24))
    card.paste(picture, ((WIDTH - picture.width) // 2, (HEIGHT - picture.height) // 2))
    return card


def main(artifacts: Path) -> None:
    from importlib import util

    spec = util.spec_from_file_location("previews", ROOT / "uce_core" / "previews.py")
    previews = util.module_from_spec(spec)
    spec.loader.exec_module(previews)
    extract = Image.open(artifacts / "extract-contact-sheet.png")
    fit(extract).save(ROOT / "workflows" / "Extract every concept from one image.jpg", quality=88)
    reuse = previews.contact_sheet(
        [Image.open(artifacts / "reuse-render.png")], ["all"], overlay=Image.open(artifacts / "reuse-concepts.png")
    )
    fit(reuse).save(ROOT / "workflows" / "Reuse extracted concepts in a new prompt.jpg", quality=88)
    masks = previews.contact_sheet(
        [Image.open(artifacts / "masks-render.png")], ["1"], overlay=Image.open(artifacts / "masks-concepts.png")
    )
    fit(masks).save(ROOT / "workflows" / "Extract concepts painted in the mask editor.jpg", quality=88)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
