"""Loading the user's image and sizing it for a diffusion model.

What happens to each kind of input (tested in tests/test_images.py):

* EXIF orientation is applied first, so a portrait photo taken sideways is processed upright.
* Colour modes: RGB is used as is; greyscale (L, LA, I, I;16, F) is replicated to three channels; palette (P)
  and every mode with transparency are converted to RGBA and composited onto a white background (the masked-out
  parts of a cut-out are then plain background, not black shapes the model could mistake for an object); CMYK and
  YCbCr are converted by PIL. 16-bit and 32-bit greyscale are rescaled from their real range, not clipped at 255.
* Size: the short side must be at least ``MIN_SIDE`` pixels and the aspect ratio at most ``MAX_ASPECT`` (a model
  trained on roughly square images has nothing useful to say about a 10:1 strip); otherwise one clear
  ``ConceptExpressError``. Large images are fine: they are reduced to the model's working size.
* Anything PIL cannot read (not an image, truncated, a decompression bomb) gives one ``ConceptExpressError`` naming
  the file.

Resizing (``fit_to_model``): the reference stretches every image to 512x512. We keep the aspect ratio by default
("keep"): the working size has both sides multiples of ``multiple`` pixels (64 = 8 pixels per latent cell x 8, so
that the UNet's three downsamplings divide evenly), an area of about ``resolution**2`` and the aspect ratio closest
to the image's (``working_size``); the image is scaled to cover it and centre-cropped by what remains (a 4:3 photo
at 512 becomes 576x448, cropping 3.6% of its width). A square image gives exactly the reference's 512x512.
``mode="stretch"`` reproduces the reference for non-square images too. Both modes resample with PIL's bilinear
filter (which low-pass filters when it reduces), what the reference's ``torchvision.transforms.Resize`` does to a PIL
image.
"""

from __future__ import annotations

import io
import math
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ConceptExpressError

MIN_SIDE = 64
MAX_ASPECT = 4.0

ImageSource = str | os.PathLike | bytes | Image.Image | np.ndarray | torch.Tensor


def load_image(source: ImageSource) -> Image.Image:
    """Open ``source`` (a path, bytes, a PIL image, an HxWxC uint8/float array or a CxHxW / HxWxC tensor in 0..1)
    and return an upright 8-bit RGB PIL image, or raise ``ConceptExpressError``."""
    name = "image"
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        image = _array_to_pil(source)
    else:
        if isinstance(source, bytes):
            stream = io.BytesIO(source)
        else:
            name = os.fspath(source)
            if not os.path.isfile(name):
                raise ConceptExpressError(
                    f"{name}: no such file. Give the path of an image file (PNG, JPEG, WebP, ...)."
                )
            stream = name
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(stream)
                image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ConceptExpressError(
                f"{name}: the image is too large to open safely ({err}). Downscale it below about 89 megapixels first."
            ) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise ConceptExpressError(
                f"{name}: not an image that can be read ({type(err).__name__}: {err}). "
                "Give a PNG, JPEG, WebP, BMP or TIFF file."
            ) from None
    image = ImageOps.exif_transpose(image) or image
    rgb = to_rgb(image)
    check_size(rgb.width, rgb.height, name)
    return rgb


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB as described in the module docstring."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            values = values / 65535.0
        elif mode == "I":
            top = 65535.0 if values.max(initial=0) <= 65535 else float(values.max())
            values = values / top
        else:  # F: floats, assume 0..1 unless the data says otherwise
            top = max(1.0, float(values.max(initial=0)))
            values = values / top
        grey = np.clip(np.round(values * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB")
    if mode == "P" or "A" in mode or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def check_size(width: int, height: int, name: str = "image") -> None:
    if min(width, height) < MIN_SIDE:
        raise ConceptExpressError(
            f"{name} is {width}x{height} pixels; at least {MIN_SIDE} pixels on each side are needed to find concepts. "
            "Use a larger image."
        )
    aspect = max(width, height) / min(width, height)
    if aspect > MAX_ASPECT:
        raise ConceptExpressError(
            f"{name} is {width}x{height} pixels (aspect ratio {aspect:.1f}:1); at most {MAX_ASPECT:g}:1 is supported. "
            "Crop it to the part with the objects first."
        )


def working_size(width: int, height: int, resolution: int, multiple: int = 64, mode: str = "keep") -> tuple[int, int]:
    """The (width, height) the model works at: sides multiples of ``multiple``, area about resolution**2 and the
    aspect ratio as close to the image's as those allow (of the sizes one rounding step around the ideal one, the
    one with the smallest aspect error, then the smallest area error)."""
    if mode == "stretch":
        return resolution, resolution
    if mode != "keep":
        raise ConceptExpressError(f"resize mode must be 'keep' or 'stretch', not {mode!r}")
    scale = math.sqrt(resolution * resolution / (width * height))
    ideal_w, ideal_h = width * scale / multiple, height * scale / multiple
    options = [
        (max(1, a) * multiple, max(1, b) * multiple)
        for a in {math.floor(ideal_w), math.ceil(ideal_w)}
        for b in {math.floor(ideal_h), math.ceil(ideal_h)}
    ]
    aspect = math.log(width / height)

    def cost(size):
        w, h = size
        return round(abs(math.log(w / h) - aspect), 9), abs(math.log(w * h / resolution**2))

    return min(options, key=cost)


def fit_to_model(image: Image.Image, resolution: int, multiple: int = 64, mode: str = "keep") -> Image.Image:
    """Resize (and centre-crop by less than ``multiple`` pixels) to the working size; see the module docstring."""
    w, h = working_size(image.width, image.height, resolution, multiple, mode)
    if mode == "stretch":  # torchvision's Resize([size, size]) on a PIL image, as the reference: PIL bilinear
        return image.resize((w, h), Image.BILINEAR)
    return ImageOps.fit(image, (w, h), Image.BILINEAR, centering=(0.5, 0.5))


def crop_box(width: int, height: int, target: tuple[int, int]) -> tuple[float, float, float, float]:
    """The region (left, top, right, bottom) of a width x height source that ``fit_to_model`` keeps for a
    ``target`` (w, h) working size: the centred crop with the target's aspect ratio (PIL's ``ImageOps.fit``)."""
    tw, th = target
    if width / height > tw / th:
        kept = height * tw / th
        return ((width - kept) / 2, 0.0, (width + kept) / 2, float(height))
    kept = width * th / tw
    return (0.0, (height - kept) / 2, float(width), (height + kept) / 2)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (1, 3, H, W) in [-1, 1] (what the VAE expects)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0)


def _array_to_pil(array) -> Image.Image:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.ndim == 4:
            array = array[0]
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.permute(1, 2, 0)
        array = array.float().numpy()
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ConceptExpressError(f"an image array must be HxW, HxWx1, HxWx3 or HxWx4; got shape {tuple(array.shape)}")
    if array.dtype != np.uint8:
        array = np.clip(np.round(np.asarray(array, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return Image.fromarray(array, "RGBA" if array.shape[-1] == 4 else "RGB")
