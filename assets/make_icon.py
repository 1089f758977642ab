"""Draws assets/icon.png, the pack's Comfy Registry icon: the example still life with its three objects numbered in
the colours the concept overlay uses.

    python assets/make_icon.py
"""

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
SIZE = 256
COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200)]  # uce_core.previews.PALETTE[:3]


def main() -> None:
    example = Image.open(HERE / "example.png").convert("RGB")  # 640 x 480
    icon = example.crop((80, 0, 80 + 480, 480)).resize((SIZE, SIZE), Image.LANCZOS)
    draw = ImageDraw.Draw(icon)
    try:
        font = ImageFont.load_default(size=30)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    # the ball, the mug and the lamp in the crop's coordinates
    for number, (x, y) in enumerate([(48, 175), (128, 150), (226, 86)], start=1):
        colour = COLOURS[number - 1]
        draw.rounded_rectangle(
            [x - 19, y - 19, x + 19, y + 19], radius=6, fill=colour, outline=(255, 255, 255), width=3
        )
        draw.text((x, y), str(number), fill=(255, 255, 255), font=font, anchor="mm")
    icon.save(HERE / "icon.png", optimize=True)


if __name__ == "__main__":
    main()
