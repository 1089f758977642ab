"""Pictures for people: attention heat maps, the EOT map, concept overlays, loss curves. PIL and numpy only."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

# A perceptually ordered dark-to-bright ramp (black, purple, red, orange, pale yellow), interpolated linearly.
_RAMP = np.array([[0, 0, 4], [80, 18, 123], [182, 54, 121], [251, 136, 97], [252, 253, 191]], dtype=np.float64)

# Distinct colours for concept overlays (cycled).
PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
    (128, 0, 0),
]


def colorize(values: torch.Tensor | np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """(h, w) values -> (h, w, 3) uint8 through the ramp, min-max scaled unless ``lo``/``hi`` are given."""
    v = np.asarray(values.detach().cpu().float() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    lo = float(np.min(v)) if lo is None else lo
    hi = float(np.max(v)) if hi is None else hi
    t = np.clip((v - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(v)
    pos = t * (len(_RAMP) - 1)
    i = np.minimum(pos.astype(int), len(_RAMP) - 2)
    frac = (pos - i)[..., None]
    return np.round(_RAMP[i] * (1 - frac) + _RAMP[i + 1] * frac).astype(np.uint8)


def heatmap(values, size: tuple[int, int], image: Image.Image | None = None, alpha: float = 0.6) -> Image.Image:
    """Heat map of (h, w) ``values`` at ``size`` (w, h), nearest-upsampled so grid cells stay visible,
    optionally blended over ``image``."""
    picture = Image.fromarray(colorize(values)).resize(size, Image.NEAREST)
    if image is not None:
        picture = Image.blend(image.convert("RGB").resize(size), picture, alpha)
    return picture


def grid_of_pictures(tiles: list[Image.Image], labels: list[str], columns: int, tile: int = 192) -> Image.Image:
    """Tiles in a grid with a caption under each."""
    rows = (len(tiles) + columns - 1) // columns
    caption = 16
    sheet = Image.new("RGB", (columns * tile, rows * (tile + caption)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (picture, label) in enumerate(zip(tiles, labels)):
        x, y = (k % columns) * tile, (k // columns) * (tile + caption)
        fitted = picture.copy()
        fitted.thumbnail((tile, tile))
        sheet.paste(fitted, (x + (tile - fitted.width) // 2, y + (tile - fitted.height) // 2))
        draw.text((x + 4, y + tile + 2), label, fill=(0, 0, 0))
    return sheet


def attention_rows_preview(maps, count: int = 8) -> Image.Image:
    """The image and ``count`` self-attention rows (query positions on a regular lattice, marked with a dot)."""
    image = Image.fromarray(maps.image.numpy())
    h, w = maps.grid
    side = max(1, int(round(count**0.5)))
    ys = np.linspace(0, h - 1, side + 2)[1:-1].round().astype(int)
    xs = np.linspace(0, w - 1, (count + side - 1) // side + 2)[1:-1].round().astype(int)
    tiles, labels = [image], ["image"]
    for y in ys:
        for x in xs:
            tile = heatmap(maps.row_map(int(y * w + x)), image.size, image)
            cx, cy = (x + 0.5) * image.width / w, (y + 0.5) * image.height / h
            r = max(3, image.width // 64)
            ImageDraw.Draw(tile).ellipse([cx - r, cy - r, cx + r, cy + r], fill=(0, 255, 255), outline=(0, 0, 0))
            tiles.append(tile)
            labels.append(f"row ({y},{x})")
    return grid_of_pictures(tiles, labels, columns=min(len(tiles), 5))


def eot_preview(maps) -> Image.Image:
    """The image, the end-of-text attention map, and the map over the image."""
    image = Image.fromarray(maps.image.numpy())
    eot = maps.eot
    tiles = [image, heatmap(eot, image.size), heatmap(eot, image.size, image)]
    grid = "x".join(str(s) for s in eot.shape)
    return grid_of_pictures(tiles, ["image", f"EOT attention {grid}", "EOT over image"], columns=3)


def loss_curve(history: dict[str, list[float]], size: tuple[int, int] = (640, 320)) -> Image.Image:
    """A line plot of the training losses per step ("loss" and, when present, "denoise"), with a moving average."""
    width, height = size
    margin = 44
    picture = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    series = [(k, history[k], c) for k, c in (("loss", (200, 40, 40)), ("denoise", (40, 90, 200))) if history.get(k)]
    draw.rectangle([margin, 10, width - 10, height - margin], outline=(0, 0, 0))
    if not series:
        draw.text((margin + 8, 20), "no training steps", fill=(0, 0, 0))
        return picture
    values = np.concatenate([np.asarray(v, dtype=np.float64) for _, v, _ in series])
    values = values[np.isfinite(values)]
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    steps = max(len(v) for _, v, _ in series)

    def xy(i, value):
        x = margin + (width - 10 - margin) * (i / max(1, steps - 1))
        y = height - margin - (height - margin - 10) * ((value - lo) / (hi - lo))
        return x, y

    for legend, (name, v, colour) in enumerate(series):
        v = np.asarray(v, dtype=np.float64)
        window = max(1, len(v) // 25)
        smooth = np.convolve(v, np.ones(window) / window, mode="valid") if len(v) >= window else v
        faint = tuple(int(c + (255 - c) * 0.7) for c in colour)
        if len(v) > 1:
            draw.line([xy(i, x) for i, x in enumerate(v)], fill=faint, width=1)
            draw.line([xy(i + window - 1, x) for i, x in enumerate(smooth)], fill=colour, width=2)
        draw.text((width - 120, 14 + 14 * legend), name, fill=colour)
    draw.text((4, 6), f"{hi:.3g}", fill=(0, 0, 0))
    draw.text((4, height - margin - 8), f"{lo:.3g}", fill=(0, 0, 0))
    draw.text((margin, height - margin + 6), "step 1", fill=(0, 0, 0))
    draw.text((width - 70, height - margin + 6), f"step {steps}", fill=(0, 0, 0))
    return picture


def label_colour(label: str) -> tuple[int, int, int]:
    """The colour of a concept's number in the overlay (``PALETTE``, cycled); grey for anything that is not a
    concept number (e.g. "all")."""
    return PALETTE[(int(label) - 1) % len(PALETTE)] if label.isdigit() and int(label) > 0 else (90, 90, 90)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _badge(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, size: int) -> None:
    """``text`` in a box of its label colour, the box's top-left corner at ``xy``."""
    colour = label_colour(text)
    font = _font(size)
    left, top, right, bottom = draw.textbbox(xy, text, font=font, anchor="lt")
    pad = max(3, size // 4)
    box = [xy[0], xy[1], xy[0] + (right - left) + 2 * pad, xy[1] + (bottom - top) + 2 * pad]
    draw.rectangle(box, fill=colour, outline=(255, 255, 255), width=max(1, size // 12))
    dark = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 140
    draw.text((xy[0] + pad, xy[1] + pad), text, fill=(0, 0, 0) if dark else (255, 255, 255), font=font, anchor="lt")


def contact_sheet(
    renders: list[Image.Image],
    labels: list[str],
    overlay: Image.Image | None = None,
    tile: int = 256,
    columns: int = 4,
) -> Image.Image:
    """The renders in a grid, each fitted into a ``tile`` square with its label (the concept number, in the colour
    the overlay gives that concept) over its top-left corner; the concepts' overlay, when given, on the left at the
    grid's height."""
    if not renders:
        raise ValueError("contact_sheet needs at least one render")
    if len(labels) != len(renders):
        raise ValueError(f"{len(labels)} labels for {len(renders)} renders")
    gap = max(4, tile // 32)
    columns = max(1, min(columns, len(renders)))
    rows = (len(renders) + columns - 1) // columns
    grid_w, grid_h = columns * tile + (columns - 1) * gap, rows * tile + (rows - 1) * gap
    left = 0
    fitted_overlay = None
    if overlay is not None:
        fitted_overlay = overlay.convert("RGB")
        scale = min(grid_h / fitted_overlay.height, 2 * tile / fitted_overlay.width)
        size = (max(1, round(fitted_overlay.width * scale)), max(1, round(fitted_overlay.height * scale)))
        fitted_overlay = fitted_overlay.resize(size, Image.LANCZOS)
        left = fitted_overlay.width + 2 * gap
    sheet = Image.new("RGB", (left + grid_w + 2 * gap, grid_h + 2 * gap), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    if fitted_overlay is not None:
        sheet.paste(fitted_overlay, (gap, gap + (grid_h - fitted_overlay.height) // 2))
    size = max(12, tile // 9)
    for k, (render, label) in enumerate(zip(renders, labels)):
        x = left + gap + (k % columns) * (tile + gap)
        y = gap + (k // columns) * (tile + gap)
        picture = render.convert("RGB")
        scale = tile / max(picture.size)  # fitted into the tile, small renders scaled up
        picture = picture.resize(
            (max(1, round(picture.width * scale)), max(1, round(picture.height * scale))), Image.LANCZOS
        )
        px, py = x + (tile - picture.width) // 2, y + (tile - picture.height) // 2
        sheet.paste(picture, (px, py))
        _badge(draw, (px + gap, py + gap), label, size)
    return sheet
