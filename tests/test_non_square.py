"""Non-square grids, both orientations (h x w = 12 x 16 and 16 x 12), through every stage, against the float64
oracles (oracles.py, localize_oracle.py) and independent pixel-level computations.

Most photos give a non-square latent grid (the default keeps the aspect ratio: 576x448 px -> 72x56). A grid whose
height and width are swapped somewhere still has h*w cells, so a reshape does not fail: only a test on a non-square
grid, in both orientations, against an independent computation sees it. Each stage is checked: the capture's
aggregation and EOT map (synthetic layers and a real tiny UNet), the EOT map on the attention grid, pre-clustering,
post-clustering (whose touching test reads the label image), the masks, and the masks on the user's image.
"""

import localize_oracle as oracle
import numpy as np
import pytest
import torch
from oracles import aggregate_oracle, bilinear_axis
from test_aggregation import random_attention
from test_localize import scene

from concept_express.uce_core.attention import AttentionMaps, CaptureRecorder, capture_attention, grid_of
from concept_express.uce_core.backends.base import AttentionLayer
from concept_express.uce_core.concepts import Concepts
from concept_express.uce_core.finch import finch
from concept_express.uce_core.localize import localize_concepts, normalised_eot

WIDE_OBJECTS = ((1, 2, 5, 7), (6, 9, 10, 14), (7, 1, 11, 5))  # (y0, x0, y1, x1) on a 12 x 16 grid
TALL_OBJECTS = tuple((x0, y0, x1, y1) for (y0, x0, y1, x1) in WIDE_OBJECTS)  # the same, transposed, on 16 x 12
# seeds whose post-clustering merges regions over several levels (so the touching test on the label image decides
# the masks; these pick level 0, where the oracle uses concept_express's level-0 delta), and one per orientation
# that picks level 1 (the reference's delta); every one passes the no-near-tie precondition below
SCENES = [((12, 16), WIDE_OBJECTS, s) for s in (3, 6, 10)] + [((16, 12), TALL_OBJECTS, s) for s in (0, 3, 7)]


def _pyramid(target):
    h, w = target
    return [(h, w), (h // 2, w // 2), (h // 4, w // 4), (h // 2, w // 2), (h, w)]


@pytest.mark.parametrize("target", [(12, 16), (16, 12)])
def test_capture_recorder_aggregates_and_keeps_the_eot_grid_orientation(target):
    """CaptureRecorder fed an SD-like pyramid of layers on a non-square latent: the aggregate equals the float64
    oracle and the EOT map is the mean column at the quarter grid, in (h, w) order."""
    rng = np.random.default_rng(sum(target))
    recorder = CaptureRecorder(target, eot_position=1)
    layers = []
    for grid in _pyramid(target):
        probs = random_attention(rng, grid)
        layers.append((probs, grid))
        recorder.record(AttentionLayer("self", grid, "down"), torch.from_numpy(probs)[None])
    quarter = (target[0] // 4, target[1] // 4)
    columns = [rng.uniform(size=quarter[0] * quarter[1]) for _ in range(3)]
    for column, place in zip(columns, ("down", "up", "up")):
        cross = torch.zeros(1, quarter[0] * quarter[1], 77)
        cross[0, :, 1] = torch.from_numpy(column)
        recorder.record(AttentionLayer("cross", quarter, place), cross)
    np.testing.assert_allclose(
        recorder.self_attention().double().numpy(), aggregate_oracle(layers, target), rtol=2e-5, atol=1e-9
    )
    eot, grid = recorder.eot_map(target)
    assert grid == quarter and tuple(eot.shape) == quarter
    expected = np.mean(columns, axis=0).reshape(quarter)  # row-major (h, w): cell (y, x) is column entry y*w + x
    np.testing.assert_allclose(eot.double().numpy(), expected, rtol=1e-6)
    assert grid_of(quarter[0] * quarter[1], target) == quarter


@pytest.mark.parametrize("size,grid", [((300, 200), (16, 24)), ((200, 300), (24, 16))])
def test_capture_on_a_tiny_unet_matches_the_oracle_in_both_orientations(sd1_backend, monkeypatch, size, grid):
    """A landscape and a portrait image through a real (random-weight) UNet: the grid is (h, w), and the aggregate
    and the EOT map equal the independent float64 aggregation of diffusers' own attention probabilities."""
    from PIL import Image
    from test_capture import _diffusers_probabilities

    width, height = size
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    pixels[: height // 2, : width // 3] = (250, 30, 30)  # a corner block: the picture is not symmetric
    image = Image.fromarray(pixels)
    maps = capture_attention(sd1_backend, image)
    assert maps.grid == grid and tuple(maps.info["latent_grid"]) == grid
    assert tuple(maps.image.shape[:2]) == (grid[0] * 8, grid[1] * 8)
    latent_hw, probs, eot_position = _diffusers_probabilities(sd1_backend, image, monkeypatch)
    assert latent_hw == grid

    def grid_from(n):
        f = int(round((grid[0] * grid[1] / n) ** 0.5))
        return grid[0] // f, grid[1] // f

    self_layers = [(p.numpy(), grid_from(p.shape[0])) for _, p in probs if p.shape[0] == p.shape[1]]
    np.testing.assert_allclose(
        maps.self_attention.double().numpy(), aggregate_oracle(self_layers, grid), rtol=1e-4, atol=1e-8
    )
    quarter = (grid[0] // 4, grid[1] // 4)
    cross = [p[:, eot_position] for where, p in probs if p.shape[0] != p.shape[1] and where != "mid_block"]
    expected = torch.stack([c for c in cross if grid_from(c.shape[0]) == quarter]).mean(0).view(quarter)
    assert tuple(maps.eot.shape) == quarter
    torch.testing.assert_close(maps.eot.double(), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("grid", [(12, 16), (16, 12)])
def test_eot_map_on_the_grid_is_bilinear_in_h_and_w(grid):
    rng = np.random.default_rng(1)
    coarse = rng.uniform(size=(grid[0] // 4, grid[1] // 4))
    maps = AttentionMaps(
        torch.full((grid[0] * grid[1],) * 2, 1.0 / (grid[0] * grid[1])),
        torch.from_numpy(coarse.astype(np.float32)),
        grid,
        torch.zeros(grid[0] * 8, grid[1] * 8, 3, dtype=torch.uint8),
    )
    up = bilinear_axis(coarse.shape[0], grid[0]) @ coarse @ bilinear_axis(coarse.shape[1], grid[1]).T
    on_grid = maps.eot_on_grid()
    assert tuple(on_grid.shape) == grid
    np.testing.assert_allclose(on_grid.double().numpy(), up, rtol=1e-5, atol=1e-7)
    normalised = normalised_eot(maps, torch.device("cpu"))
    np.testing.assert_allclose(normalised.double().numpy(), oracle.eot_on_grid(coarse, grid), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grid,objects,seed", SCENES)
def test_whole_stage_on_non_square_grids_matches_the_float64_oracle(grid, objects, seed):
    maps, rows, eot = scene(seed, grid, objects)
    assert tuple(maps.eot.shape) == (grid[0] // 4, grid[1] // 4)
    masks, feats, info = oracle.localize(rows, eot, grid, level_zero=True)
    levels, _, _ = oracle.finch(rows)
    nodes = rows.astype(np.float64)
    for labels in [None] + levels[:-1]:  # fixture precondition: no near ties anywhere
        assert oracle.nearest_gap(nodes if labels is None else oracle.means(nodes, labels)) > 1e-4
    assert oracle.nearest_gap(np.stack([nodes[levels[info["index"]] == c].mean(0) for c in info["kept"]])) > 1e-4

    # pre-clustering: every level's labels, cell by cell
    hierarchy = finch(torch.from_numpy(rows))
    assert hierarchy.counts == info["counts"]
    for ours, theirs in zip(hierarchy.levels, levels):
        np.testing.assert_array_equal(oracle.canonical(ours.labels.numpy()), oracle.canonical(theirs))

    concepts = localize_concepts(maps)
    assert concepts.grid == grid and tuple(concepts.masks.shape[1:]) == grid
    assert concepts.info["kept_pre_clusters"] == info["kept"]
    assert concepts.info["post_levels"] == info["post_counts"]  # post-clustering, with the touching constraint
    np.testing.assert_array_equal(concepts.masks.numpy(), masks)
    np.testing.assert_allclose(concepts.features.numpy(), feats, rtol=1e-5, atol=2.0**-24)
    e = oracle.eot_on_grid(eot, grid).ravel()
    np.testing.assert_allclose(concepts.scores.numpy(), [e[m.ravel()].mean() / e.mean() for m in masks], rtol=1e-5)


def _source_oracle(masks, source_size, box):
    """Masks on the source image, pixel by pixel: pixel (x, y) inside the crop box takes the grid cell its position
    falls in (nearest: floor of the relative position times the grid side), zero outside the box."""
    width, height = source_size
    left, top, right, bottom = (int(round(v)) for v in box)
    n, h, w = masks.shape
    out = np.zeros((n, height, width))
    for y in range(top, bottom):
        cy = (y - top) * h // (bottom - top)
        for x in range(left, right):
            out[:, y, x] = masks[:, cy, (x - left) * w // (right - left)]
    return out


@pytest.mark.parametrize(
    "grid,source,box", [((12, 16), (90, 60), (5.0, 0.0, 85.0, 60.0)), ((16, 12), (48, 80), (0.0, 8.0, 48.0, 72.0))]
)
def test_masks_on_the_source_image_keep_the_orientation(grid, source, box):
    h, w = grid
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, : h // 3, : w // 4] = True  # top-left block: wider than high on a wide grid, and vice versa
    masks[1, h // 2 :, w - 3 :] = True  # a strip at the right edge
    concepts = Concepts(
        masks,
        torch.full((2, h * w), 1.0 / (h * w)),
        torch.ones(2),
        grid,
        torch.zeros(h * 8, w * 8, 3, dtype=torch.uint8),
        {"source_size": list(source), "source_crop": list(box)},
    )
    on_source = concepts.masks_on_source()
    assert tuple(on_source.shape) == (2, source[1], source[0])
    np.testing.assert_array_equal(on_source.numpy(), _source_oracle(masks.numpy(), source, box))
    at_image = concepts.masks_at((h * 8, w * 8))
    assert tuple(at_image.shape) == (2, h * 8, w * 8)
    np.testing.assert_array_equal(at_image.numpy(), masks.numpy().repeat(8, 1).repeat(8, 2))


@pytest.mark.parametrize("size", [(310, 190), (190, 310)])
def test_capture_to_masks_on_the_source_keeps_the_orientation_end_to_end(sd1_backend, size):
    """Capture a cropped non-square image, localize, and map the masks back onto the user's image."""
    from PIL import Image

    from concept_express.uce_core.images import crop_box

    width, height = size
    pixels = np.random.default_rng(2).integers(0, 255, (height, width, 3), dtype=np.uint8)
    pixels[height // 4 : height // 2, width // 5 : width // 2] = (20, 200, 40)
    maps = capture_attention(sd1_backend, Image.fromarray(pixels))
    grid = maps.grid
    assert (grid[0] < grid[1]) == (height < width)
    concepts = localize_concepts(maps)
    assert tuple(concepts.masks.shape[1:]) == grid
    box = crop_box(width, height, (grid[1] * 8, grid[0] * 8))
    assert concepts.info["source_crop"] == pytest.approx(list(box))
    np.testing.assert_array_equal(
        concepts.masks_on_source().numpy(), _source_oracle(concepts.masks.numpy(), (width, height), box)
    )


@pytest.mark.parametrize("size", [(300, 200), (200, 300)])
def test_training_targets_keep_the_orientation(sd1_backend, size):
    """Token learning on a landscape and a portrait capture: the latent, the masks, the cross-attention grid and the
    alignment targets f_i (nearest downsampling by 4 keeps cells 0, 4, 8, ... as the reference; flipped with the
    image) are all (h, w)."""
    from conftest import hand_made_concepts
    from PIL import Image

    from concept_express.uce_core.train import TrainSettings, _Run

    width, height = size
    pixels = np.random.default_rng(3).integers(0, 255, (height, width, 3), dtype=np.uint8)
    maps = capture_attention(sd1_backend, Image.fromarray(pixels))
    h, w = maps.grid
    assert (h < w) == (height < width)
    concepts = hand_made_concepts(maps, [(2, 10, 1, 5), (12, 16, 6, 14)])
    run = _Run(sd1_backend, concepts, TrainSettings())
    assert run.latent_hw == (h, w) and run.cross_grid == (h // 4, w // 4)
    assert torch.equal(run.masks.bool(), concepts.masks)
    f = concepts.features.view(2, h, w)
    torch.testing.assert_close(run.feature_targets, f[:, ::4, ::4].reshape(2, -1))
    torch.testing.assert_close(run.feature_targets_flipped, f.flip(-1)[:, ::4, ::4].reshape(2, -1))
