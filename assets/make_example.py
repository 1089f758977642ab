"""Draws assets/example.png: a still life (a red ball, a blue mug and a yellow lamp on a wooden table)
made only of shaded primitives, so the project has an example image that is its own work.

    python assets/make_example.py
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

W, H = 640, 480


def main() -> None:
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    rng = np.random.default_rng(7)
    wall = np.stack([232 - 20 * y / H, 226 - 22 * y / H, 214 - 25 * y / H], axis=-1)
    table_top = 300
    grain = 12 * np.sin(x / 9.0 + 3 * np.sin(y / 23.0)) + rng.normal(0, 3, (H, W))
    wood = np.stack([150 + grain, 98 + 0.7 * grain, 58 + 0.4 * grain], axis=-1)
    canvas = np.where((y >= table_top)[..., None], wood, wall)

    # red ball with a highlight
    cx, cy, r = 170, 330, 70
    d = np.hypot(x - cx, y - cy)
    light = np.clip(1.15 - np.hypot(x - (cx - 25), y - (cy - 30)) / (1.6 * r), 0.25, 1.0)
    ball = np.stack([225 * light, 40 * light, 45 * light], axis=-1)
    canvas = np.where((d <= r)[..., None], ball, canvas)

    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    # blue mug with handle
    draw.rounded_rectangle([300, 230, 400, 370], radius=12, fill=(40, 90, 190))
    draw.ellipse([300, 220, 400, 245], fill=(25, 60, 140))
    draw.arc([380, 260, 440, 330], start=270, end=90, fill=(40, 90, 190), width=14)
    draw.rectangle([310, 240, 325, 360], fill=(80, 130, 225))
    # yellow lamp: base, stand, shade
    draw.ellipse([470, 355, 590, 385], fill=(60, 60, 60))
    draw.rectangle([523, 200, 537, 370], fill=(90, 90, 90))
    draw.polygon([(470, 210), (590, 210), (560, 110), (500, 110)], fill=(245, 200, 40))
    draw.polygon([(500, 110), (560, 110), (553, 130), (507, 130)], fill=(255, 225, 90))
    image = image.filter(ImageFilter.GaussianBlur(0.8))
    image.save(Path(__file__).with_name("example.png"), optimize=True)


if __name__ == "__main__":
    main()
