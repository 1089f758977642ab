"""Bad and unusual image inputs: each works (as documented in uce_core/images.py) or fails with one clear error."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from concept_express.uce_core.errors import ConceptExpressError
from concept_express.uce_core.images import MIN_SIDE, fit_to_model, load_image, to_tensor, working_size


def _save(tmp_path, image, name, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def test_rgba_is_composited_on_white(tmp_path):
    pixels = np.zeros((80, 96, 4), np.uint8)
    pixels[..., 0] = 200  # red, fully transparent on the left half, opaque on the right
    pixels[:, 48:, 3] = 255
    out = np.asarray(load_image(_save(tmp_path, Image.fromarray(pixels, "RGBA"), "a.png")))
    assert out.shape == (80, 96, 3)
    assert (out[:, :48] == 255).all()  # transparent -> white background
    assert (out[:, 48:] == [200, 0, 0]).all()


def test_greyscale_becomes_three_equal_channels(tmp_path):
    grey = np.tile(np.arange(96, dtype=np.uint8), (70, 1))
    out = np.asarray(load_image(_save(tmp_path, Image.fromarray(grey, "L"), "g.png")))
    assert out.shape == (70, 96, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


def test_palette_image_keeps_its_colours(tmp_path):
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[:, :32] = [10, 200, 30]
    rgb[:, 32:] = [250, 250, 0]
    palette = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=4)
    out = np.asarray(load_image(_save(tmp_path, palette, "p.png")))
    assert (out[:, :32] == [10, 200, 30]).all() and (out[:, 32:] == [250, 250, 0]).all()


def test_sixteen_bit_greyscale_uses_its_full_range(tmp_path):
    values = np.tile(np.linspace(0, 65535, 100).astype(np.uint16), (80, 1))
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    out = np.asarray(load_image(_save(tmp_path, image, "sixteen.png")))
    expected = np.round(values / 65535.0 * 255).astype(np.uint8)
    assert np.abs(out[..., 0].astype(int) - expected).max() <= 1
    assert out.max() == 255 and out.min() == 0  # not clipped at 255 of 65535


def test_exif_rotation_is_applied(tmp_path):
    pixels = np.zeros((70, 100, 3), np.uint8)
    pixels[:, :10] = [255, 0, 0]  # a red stripe on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(tmp_path, Image.fromarray(pixels), "rot.jpg", exif=exif, quality=95)
    out = np.asarray(load_image(path))
    assert out.shape == (100, 70, 3)  # portrait after rotation
    top = out[:10].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[1] < 60  # the stripe is now along the top edge


def test_too_small_fails_clearly(tmp_path):
    path = _save(tmp_path, Image.new("RGB", (MIN_SIDE - 1, 200)), "small.png")
    with pytest.raises(ConceptExpressError, match=r"at least 64 pixels"):
        load_image(path)


def test_extreme_aspect_ratio_fails_clearly(tmp_path):
    with pytest.raises(ConceptExpressError, match="aspect ratio"):
        load_image(_save(tmp_path, Image.new("RGB", (1000, 100)), "strip.png"))


def test_large_image_is_reduced_to_the_working_size(tmp_path):
    big = Image.new("RGB", (6000, 4000), (30, 60, 90))
    image = load_image(_save(tmp_path, big, "big.png"))
    fitted = fit_to_model(image, 512)
    assert fitted.size == working_size(6000, 4000, 512) == (576, 384)  # 3:2 exactly, area 0.84 x 512^2
    assert np.asarray(fitted)[200, 300].tolist() == [30, 60, 90]


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    path = _save(tmp_path, Image.new("RGB", (200, 200)), "bomb.png")
    with pytest.raises(ConceptExpressError, match="too large"):
        load_image(path)


@pytest.mark.parametrize("content", [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b""])
def test_non_image_files_fail_with_one_clear_error(tmp_path, content):
    path = tmp_path / "photo.png"
    path.write_bytes(content)
    with pytest.raises(ConceptExpressError, match="photo.png: not an image"):
        load_image(path)


def test_truncated_jpeg_fails_clearly(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[:2000])
    with pytest.raises(ConceptExpressError, match="cut.jpg: not an image"):
        load_image(path)


def test_missing_file():
    with pytest.raises(ConceptExpressError, match="no such file"):
        load_image("/nonexistent/picture.png")


def test_arrays_and_tensors_are_accepted():
    array = np.random.default_rng(1).random((64, 80, 3))
    a = np.asarray(load_image(array))
    b = np.asarray(load_image(torch.from_numpy(array).permute(2, 0, 1)))
    expected = np.round(array * 255).astype(np.uint8)
    np.testing.assert_array_equal(a, expected)
    np.testing.assert_array_equal(b, expected)


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (512, 512), (1920, 1080), (300, 1000), (777, 555)])
@pytest.mark.parametrize("resolution", [128, 512, 768, 1024])
def test_working_size_keeps_aspect_area_and_multiples(size, resolution):
    w, h = working_size(*size, resolution)
    assert w % 64 == 0 and h % 64 == 0
    # the chosen size has the smallest aspect error among all multiples-of-64 sizes with a similar area
    best = min(
        abs(math.log((a * 64) / (b * 64)) - math.log(size[0] / size[1]))
        for a in range(1, 40)
        for b in range(1, 40)
        if 0.5 <= (a * b * 4096) / resolution**2 <= 2
        and abs(a * 64 - size[0] * resolution / math.sqrt(size[0] * size[1])) < 64
        and abs(b * 64 - size[1] * resolution / math.sqrt(size[0] * size[1])) < 64
    )
    assert abs(math.log(w / h) - math.log(size[0] / size[1])) <= best + 1e-9


def test_square_image_matches_the_reference_512():
    assert working_size(1000, 1000, 512) == (512, 512)
    assert working_size(300, 200, 512, mode="stretch") == (512, 512)


def test_to_tensor_range_and_layout():
    image = Image.fromarray(np.array([[[0, 255, 128]]], np.uint8).repeat(64, 0).repeat(64, 1))
    t = to_tensor(image)
    assert t.shape == (1, 3, 64, 64)
    assert t[0, :, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)


@pytest.mark.parametrize(
    "size,target",
    [((640, 480), (576, 448)), ((480, 640), (448, 576)), ((300, 300), (128, 128)), ((1000, 400), (768, 320))],
)
def test_crop_box_is_the_region_fit_keeps(size, target):
    from concept_express.uce_core.images import crop_box

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    fitted = np.asarray(ImageOps.fit(image, target, Image.BILINEAR), dtype=float)  # what fit_to_model does
    box = crop_box(*size, target)
    manual = np.asarray(image.resize(target, Image.BILINEAR, box=box), dtype=float)
    assert np.abs(fitted - manual).mean() < 1.0


def test_stretch_resamples_like_the_reference_torchvision_resize():
    """The reference's transforms.Resize([512, 512]) on a PIL image is PIL's resize with the bilinear filter."""
    from concept_express.uce_core.images import fit_to_model

    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (300, 700, 3), dtype=np.uint8))
    stretched = np.asarray(fit_to_model(image, 512, mode="stretch"))
    assert np.array_equal(stretched, np.asarray(image.resize((512, 512), Image.BILINEAR)))
    assert not np.array_equal(stretched, np.asarray(image.resize((512, 512), Image.BICUBIC)))
