"""Given masks as concepts and edits of a concept set (uce_core.concept_edits), against hand-computed grids and
float64 oracles computed here from the fixture's rows (not from the module's code)."""

import numpy as np
import pytest
import torch

from concept_express.uce_core.attention import AttentionMaps
from concept_express.uce_core.concept_edits import (
    ConceptEdits,
    concepts_from_masks,
    edit_concepts,
    embedding_names,
    label_image_masks,
    masks_to_grid,
)
from concept_express.uce_core.concepts import Concepts
from concept_express.uce_core.errors import ConceptExpressError

GRID = (4, 6)  # non-square latent grid; the working image is 32 x 48 pixels (8 pixels per cell)


def make_maps(info=None, seed=0):
    rng = np.random.default_rng(seed)
    n = GRID[0] * GRID[1]
    rows = rng.random((n, n)) + 0.05
    rows = (rows / rows.sum(1, keepdims=True)).astype(np.float32)
    eot = rng.random(GRID).astype(np.float32)  # already on the grid: upsampling to the grid is the identity
    image = torch.zeros(32, 48, 3, dtype=torch.uint8)
    return AttentionMaps(torch.from_numpy(rows), torch.from_numpy(eot), GRID, image, dict(info or {}))


def cells(*coords):
    out = np.zeros(GRID, dtype=bool)
    for y, x in coords:
        out[y, x] = True
    return out


def oracle_f(maps, grid_mask):
    rows = maps.self_attention.numpy().astype(np.float64)
    return rows[grid_mask.ravel()].mean(0)


def oracle_score(maps, grid_mask):
    e = maps.eot.numpy().astype(np.float64).ravel()
    e = (e - e.min()) / (e.max() - e.min())
    return e[grid_mask.ravel()].mean() / e.mean()


def pixel_mask(shape, *boxes):
    m = torch.zeros(shape)
    for y0, y1, x0, x1 in boxes:
        m[y0:y1, x0:x1] = 1.0
    return m


# ------------------------------------------------------------------------------------------ masks onto the grid


def test_a_mask_at_image_resolution_on_a_non_square_grid():
    # rows 0..12: cell row 0 fully, row 1 by 4/8 = one half (counts); cols 8..27: cols 1, 2 fully, col 3 by 3/8
    mask = pixel_mask((32, 48), (0, 12, 8, 27))
    got = masks_to_grid(mask[None], GRID)
    np.testing.assert_array_equal(got[0].numpy(), cells((0, 1), (0, 2), (1, 1), (1, 2)))


def test_the_same_mask_at_half_resolution_and_at_a_resolution_that_does_not_divide_the_grid():
    half = pixel_mask((16, 24), (0, 6, 4, 13))  # the same shape: 4 pixels per cell
    np.testing.assert_array_equal(masks_to_grid(half[None], GRID)[0].numpy(), cells((0, 1), (0, 2), (1, 1), (1, 2)))
    # 10 x 15 pixels: a cell is 2.5 x 2.5 pixels. Pixels [0,2) x [0,3): cell (0,0) covered 2/2.5 x 1 = 0.8; cell
    # (0,1) covered 0.8 x 0.5/2.5 = 0.16
    odd = pixel_mask((10, 15), (0, 2, 0, 3))
    np.testing.assert_array_equal(masks_to_grid(odd[None], GRID)[0].numpy(), cells((0, 0)))


def test_a_mask_smaller_than_one_cell_gets_the_cell_it_covers_most():
    dot = pixel_mask((32, 48), (17, 20, 41, 44))  # 9 pixels inside cell (2, 5)
    np.testing.assert_array_equal(masks_to_grid(dot[None], GRID)[0].numpy(), cells((2, 5)))
    straddle = pixel_mask((32, 48), (14, 17, 20, 23))  # 2 rows in cell row 1, 1 row in cell row 2, col 2
    np.testing.assert_array_equal(masks_to_grid(straddle[None], GRID)[0].numpy(), cells((1, 2)))


def test_soft_masks_are_binarised_at_one_half():
    mask = torch.full((32, 48), 0.49)
    mask[0:8, 0:8] = 0.5
    np.testing.assert_array_equal(masks_to_grid(mask[None], GRID)[0].numpy(), cells((0, 0)))


def test_a_mask_of_the_original_image_is_cropped_as_the_capture_cropped_the_image():
    # the source was 60 x 32 (w x h); the capture kept the centred 48 x 32 (crop box 6..54)
    info = {"source_size": [60, 32], "source_crop": [6.0, 0.0, 54.0, 32.0]}
    mask = pixel_mask((32, 60), (0, 8, 6, 14))  # source columns 6..14 = working columns 0..8 = cell column 0
    np.testing.assert_array_equal(masks_to_grid(mask[None], GRID, info, (32, 48))[0].numpy(), cells((0, 0)))
    doubled = pixel_mask((64, 120), (0, 16, 12, 28))  # the same at twice the source's size
    np.testing.assert_array_equal(masks_to_grid(doubled[None], GRID, info, (32, 48))[0].numpy(), cells((0, 0)))
    outside = pixel_mask((32, 60), (0, 32, 0, 5))  # only in the part cropped away
    with pytest.raises(ConceptExpressError, match="cropped away"):
        masks_to_grid(outside[None], GRID, info, (32, 48))
    # a mask of the working image (48 x 32) is also accepted as it is
    working = pixel_mask((32, 48), (0, 8, 0, 8))
    np.testing.assert_array_equal(masks_to_grid(working[None], GRID, info, (32, 48))[0].numpy(), cells((0, 0)))


@pytest.mark.parametrize(
    "masks, message",
    [
        (torch.zeros(1, 32, 48), "mask 1 of 1 is empty"),
        (torch.zeros(3, 32, 48), "mask 1 of 3 is empty"),
        (torch.stack([pixel_mask((32, 48), (0, 8, 0, 8)), torch.zeros(32, 48)]), "mask 2 of 2 is empty"),
        (pixel_mask((32, 32), (0, 8, 0, 8))[None], "aspect ratio differs"),
        (torch.zeros(0, 32, 48), "batch"),
    ],
)
def test_bad_masks_are_one_clear_error(masks, message):
    with pytest.raises(ConceptExpressError, match=message):
        concepts_from_masks(make_maps(), masks)


# ------------------------------------------------------------------------------------------ masks as concepts


def test_given_masks_become_the_concepts_with_eq6_features_and_eot_scores():
    maps = make_maps()
    masks = torch.stack([pixel_mask((32, 48), (0, 12, 8, 27)), pixel_mask((32, 48), (17, 20, 41, 44))])
    concepts = concepts_from_masks(maps, masks)
    expected = [cells((0, 1), (0, 2), (1, 1), (1, 2)), cells((2, 5))]
    assert len(concepts) == 2 and concepts.grid == GRID
    for i, grid_mask in enumerate(expected):
        np.testing.assert_array_equal(concepts.masks[i].numpy(), grid_mask)
        np.testing.assert_allclose(concepts.features[i].numpy(), oracle_f(maps, grid_mask), rtol=1e-6, atol=1e-9)
        assert float(concepts.scores[i]) == pytest.approx(oracle_score(maps, grid_mask), rel=1e-5)
    assert concepts.info["origin"] == ["mask 1", "mask 2"]


def test_overlapping_masks_each_keep_their_own_cells():
    maps = make_maps(seed=3)
    masks = torch.stack([pixel_mask((32, 48), (0, 16, 0, 16)), pixel_mask((32, 48), (8, 24, 8, 24))])
    concepts = concepts_from_masks(maps, masks)
    b = cells((1, 1), (1, 2), (2, 1), (2, 2))
    np.testing.assert_array_equal(concepts.masks[1].numpy(), b)
    np.testing.assert_allclose(concepts.features[1].numpy(), oracle_f(maps, b), rtol=1e-6, atol=1e-9)


def found_concepts(maps):
    a, b, c = cells((0, 0), (0, 1)), cells((2, 0), (2, 1), (3, 0), (3, 1)), cells((0, 4), (0, 5), (1, 4), (1, 5))
    masks = torch.from_numpy(np.stack([a, b, c]))
    features = torch.softmax(torch.randn(3, 24, generator=torch.Generator().manual_seed(1)), 1)
    info = {"candidates": [2, 1, 3], "settings": {"features": "reference"}}
    return Concepts(masks, features, torch.tensor([1.5, 1.2, 1.1]), GRID, maps.image, info, attention=maps)


def test_add_mode_replaces_a_concept_covered_by_more_than_half_and_keeps_the_rest():
    maps = make_maps(seed=5)
    found = found_concepts(maps)
    # mask 1 covers all of found concept 1 and one cell more; mask 2 covers 1 of found concept 3's 4 cells
    masks = torch.stack([pixel_mask((32, 48), (0, 8, 0, 24)), pixel_mask((32, 48), (0, 8, 40, 48))])
    out = concepts_from_masks(maps, masks, "add", found)
    given_1, given_2 = cells((0, 0), (0, 1), (0, 2)), cells((0, 5))
    expected = [given_1, found.masks[1].numpy(), found.masks[2].numpy(), given_2]
    assert len(out) == 4
    for got, want in zip(out.masks.numpy(), expected):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(out.features[0].numpy(), oracle_f(maps, given_1), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(out.features[3].numpy(), oracle_f(maps, given_2), rtol=1e-6, atol=1e-9)
    assert torch.equal(out.features[1:3], found.features[1:3]) and torch.equal(out.scores[1:3], found.scores[1:3])
    assert out.info["origin"] == ["mask 1", "found 2", "found 3", "mask 2"] and out.info["replaced"] == [1]
    assert out.info["candidates"] == [1, 1, 3, 1]


def test_add_mode_a_mask_covering_two_concepts_takes_the_first_ones_number():
    maps = make_maps(seed=5)
    found = found_concepts(maps)
    masks = pixel_mask((32, 48), (0, 32, 0, 16))[None]  # all of found 1 and found 2
    out = concepts_from_masks(maps, masks, "add", found)
    assert out.info["origin"] == ["mask 1", "found 3"] and out.info["replaced"] == [1, 2]


# ------------------------------------------------------------------------------------------ label images


def test_a_label_image_gives_one_mask_per_colour_in_reading_order():
    image = np.zeros((4, 6, 3), dtype=np.uint8)
    image[2:, 0:2] = (255, 0, 0)
    image[0, 3:] = (0, 255, 0)
    image[3, 5] = (0, 255, 0)
    masks = label_image_masks(image).numpy().astype(bool)
    assert masks.shape == (2, 4, 6)
    np.testing.assert_array_equal(masks[0], cells((0, 3), (0, 4), (0, 5), (3, 5)))  # green appears first
    np.testing.assert_array_equal(masks[1], cells((2, 0), (2, 1), (3, 0), (3, 1)))
    rgba = np.concatenate([image, np.full((4, 6, 1), 255, np.uint8)], 2)
    rgba[0, 3:, 3] = 0  # transparent pixels belong to no concept
    transparent = label_image_masks(rgba).numpy().astype(bool)  # now red appears first, green keeps one cell
    np.testing.assert_array_equal(transparent[0], masks[1])
    np.testing.assert_array_equal(transparent[1], cells((3, 5)))


def test_a_label_image_with_300_colours_or_none_is_refused():
    rng = np.random.default_rng(0)
    noisy = np.zeros((20, 15, 3), dtype=np.uint8)
    noisy.reshape(-1, 3)[:] = np.stack(
        [np.arange(300) % 256, np.arange(300) // 256 + 1, rng.integers(0, 256, 300)], 1
    ).astype(np.uint8)
    with pytest.raises(ConceptExpressError, match="300 colours.*PNG"):
        label_image_masks(noisy)
    with pytest.raises(ConceptExpressError, match="all black"):
        label_image_masks(np.zeros((4, 4, 3), np.uint8))


# ------------------------------------------------------------------------------------------ edits


def edit_fixture(features_rule="reference"):
    """Four concepts on the 4 x 6 grid; concept 4 has two pieces of 3 and 2 cells and a 1-cell speck."""
    maps = make_maps(seed=7)
    masks = np.stack(
        [
            cells((0, 0), (0, 1)),
            cells((1, 0), (1, 1)),
            cells((3, 0)),
            cells((0, 3), (0, 4), (0, 5), (3, 4), (3, 5), (2, 2)),
        ]
    )
    rows = maps.self_attention.numpy().astype(np.float64)
    features = torch.from_numpy(np.stack([rows[m.ravel()].mean(0) for m in masks]).astype(np.float32))
    info = {"candidates": [2, 1, 1, 3], "settings": {"features": features_rule}}
    scores = torch.tensor([1.4, 1.3, 1.2, 1.1])
    return maps, Concepts(torch.from_numpy(masks), features, scores, GRID, maps.image, info, attention=maps)


def test_no_edit_passes_the_concepts_through():
    _, concepts = edit_fixture()
    assert edit_concepts(concepts, ConceptEdits()) is concepts
    assert edit_concepts(concepts, ConceptEdits(names=" , ")) is concepts


def test_keep_and_drop_select_by_overlay_number():
    _, concepts = edit_fixture()
    kept = edit_concepts(concepts, ConceptEdits(keep="1, 3"))
    assert torch.equal(kept.masks, concepts.masks[[0, 2]]) and torch.equal(kept.features, concepts.features[[0, 2]])
    assert kept.info["origin"] == ["1", "3"] and kept.info["candidates"] == [2, 1]
    dropped = edit_concepts(concepts, ConceptEdits(drop="2"))
    assert torch.equal(dropped.masks, concepts.masks[[0, 2, 3]]) and torch.equal(
        dropped.scores, concepts.scores[[0, 2, 3]]
    )
    both = edit_concepts(concepts, ConceptEdits(keep="1,2,4", drop="4"))
    assert both.info["origin"] == ["1", "2"]


def test_merge_chains_union_the_masks_and_weight_f_by_candidate_regions():
    maps, concepts = edit_fixture()
    merged = edit_concepts(concepts, ConceptEdits(merge="1+2, 2+4"))
    assert merged.info["origin"] == ["1+2+4", "3"] and merged.info["candidates"] == [6, 1]
    union = concepts.masks[[0, 1, 3]].any(0).numpy()
    np.testing.assert_array_equal(merged.masks[0].numpy(), union)
    f = concepts.features.numpy().astype(np.float64)
    expected = (2 * f[0] + 1 * f[1] + 3 * f[3]) / 6  # the unweighted mean of the 6 candidate regions' rows
    np.testing.assert_allclose(merged.features[0].numpy(), expected, rtol=1e-6, atol=1e-9)
    assert float(merged.scores[0]) == pytest.approx(oracle_score(maps, union), rel=1e-5)
    assert torch.equal(merged.features[1], concepts.features[2])


def test_merge_under_the_paper_rule_is_eq6_over_the_union():
    maps, concepts = edit_fixture("paper")
    merged = edit_concepts(concepts, ConceptEdits(merge="3+1"))
    union = concepts.masks[[0, 2]].any(0).numpy()
    assert merged.info["origin"] == ["1+3", "2", "4"]
    np.testing.assert_allclose(merged.features[0].numpy(), oracle_f(maps, union), rtol=1e-6, atol=1e-9)


def test_keep_and_drop_apply_to_a_merged_concept_through_any_member():
    _, concepts = edit_fixture()
    assert edit_concepts(concepts, ConceptEdits(merge="2+3", keep="3")).info["origin"] == ["2+3"]
    assert edit_concepts(concepts, ConceptEdits(merge="2+3", drop="3")).info["origin"] == ["1", "4"]


def test_split_instances_makes_one_concept_per_large_piece():
    maps, concepts = edit_fixture()
    # limit 2 of 24 cells: concept 4's pieces of 3 and 2 cells are split, its 1-cell speck is left out; concept 3
    # (one cell) and the others (one piece) stay as they are
    out = edit_concepts(concepts, ConceptEdits(split_instances=True, split_min_area=2 / 24))
    assert out.info["origin"] == ["1", "2", "3", "4.1", "4.2"]
    pieces = [cells((0, 3), (0, 4), (0, 5)), cells((3, 4), (3, 5))]
    for k, piece in enumerate(pieces):
        np.testing.assert_array_equal(out.masks[3 + k].numpy(), piece)
        np.testing.assert_allclose(out.features[3 + k].numpy(), oracle_f(maps, piece), rtol=1e-6, atol=1e-9)
        assert float(out.scores[3 + k]) == pytest.approx(oracle_score(maps, piece), rel=1e-5)
    assert torch.equal(out.masks[:3], concepts.masks[:3])
    # a larger minimum: only one piece reaches it, so nothing is split
    assert edit_concepts(concepts, ConceptEdits(split_instances=True, split_min_area=3 / 24)).info["origin"] == [
        "1",
        "2",
        "3",
        "4",
    ]


def test_split_without_the_attention_is_a_clear_error():
    _, concepts = edit_fixture()
    concepts.attention = None
    with pytest.raises(ConceptExpressError, match="captured attention"):
        edit_concepts(concepts, ConceptEdits(split_instances=True, split_min_area=0.05))


def test_names_are_sanitised_numbered_as_the_new_overlay_and_kept_beside_the_default():
    _, concepts = edit_fixture()
    out = edit_concepts(concepts, ConceptEdits(keep="2,3,4", names="dog, ../tea pot/, "))
    assert out.info["names"] == ["dog", "tea_pot", None]
    assert embedding_names(out, "cat") == ["dog", "tea_pot", "cat_3"]
    assert embedding_names(concepts, "cat") == ["cat_1", "cat_2", "cat_3", "cat_4"]


@pytest.mark.parametrize(
    "edits, message",
    [
        (ConceptEdits(names="dog, Dog"), "concepts 1 and 2 would both be called 'Dog'|'dog'"),
        (ConceptEdits(names="a/b, a_b"), "concepts 1 and 2 would both"),
        (ConceptEdits(names="a, b, c, d, e"), "5 names for 4 concept"),
        (ConceptEdits(names="///"), "no usable characters"),
        (ConceptEdits(keep="5"), "no concept 5.*1 to 4"),
        (ConceptEdits(drop="0"), "no concept 0"),
        (ConceptEdits(merge="1+9"), "no concept 9"),
        (ConceptEdits(keep="one"), "not a concept number"),
        (ConceptEdits(merge="1 2"), 'has no "\\+"'),
        (ConceptEdits(keep="1", drop="1"), "leaves no concept"),
        (ConceptEdits(drop="1,2,3,4"), "leaves no concept"),
    ],
)
def test_bad_edits_are_one_clear_error(edits, message):
    _, concepts = edit_fixture()
    with pytest.raises(ConceptExpressError, match=message):
        edit_concepts(concepts, edits)


def test_a_name_that_collides_with_a_default_name_is_refused():
    _, concepts = edit_fixture()
    out = edit_concepts(concepts, ConceptEdits(names="concept_2"))
    with pytest.raises(ConceptExpressError, match="concepts 1 and 2 would both be saved as"):
        embedding_names(out, "concept")


def test_localization_records_how_many_candidate_regions_each_concept_holds_and_its_attention():
    from test_localize import scene

    from concept_express.uce_core.localize import localize_concepts

    maps, _, _ = scene(6)
    concepts = localize_concepts(maps)
    assert concepts.attention is maps
    assert sum(concepts.info["candidates"]) == len(concepts.info["kept_pre_clusters"])
    assert len(concepts.info["candidates"]) == len(concepts) and min(concepts.info["candidates"]) >= 1
    # merging everything under the reference rule gives the unweighted mean of all kept candidates' rows
    rows = maps.self_attention.numpy().astype(np.float64)
    level = concepts.info["chosen_level"]
    from concept_express.uce_core.finch import finch

    labels = finch(maps.self_attention).levels[level].labels.numpy()
    expected = np.mean([rows[labels == c].mean(0) for c in concepts.info["kept_pre_clusters"]], axis=0)
    everything = "+".join(str(i + 1) for i in range(len(concepts)))
    if len(concepts) > 1:
        merged = edit_concepts(concepts, ConceptEdits(merge=everything))
        np.testing.assert_allclose(merged.features[0].numpy(), expected, rtol=1e-5, atol=1e-8)


def test_export_uses_the_given_names_and_the_manifest_keeps_number_and_name(tmp_path):
    import json

    from concept_express.uce_core.export import export_tokens, load_exported
    from concept_express.uce_core.tokens import ConceptTokens

    masks = torch.from_numpy(np.stack([cells((0, 0)), cells((1, 1)), cells((2, 2))]))
    tokens = ConceptTokens(
        [torch.randn(3, 8)],
        ["clip_l"],
        "sd1",
        ["concept_1", "concept_2", "concept_3"],
        masks,
        torch.zeros(32, 48, 3, dtype=torch.uint8),
        {"loss": [1.0]},
        {"localization": {"names": ["dog", None, "tea_pot"]}},
    )
    export_tokens(tokens, tmp_path / "set", prefix="set")
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    entries = [(c["number"], c["name"], c["file"]) for c in manifest["concepts"]]
    assert entries == [
        (1, "dog", "dog.safetensors"),
        (2, "set_2", "set_2.safetensors"),
        (3, "tea_pot", "tea_pot.safetensors"),
    ]
    assert load_exported(tmp_path / "set").names == ["dog", "set_2", "tea_pot"]
    tokens.info["localization"]["names"] = ["set_2", None, None]  # clashes with concept 2's default name
    with pytest.raises(ConceptExpressError, match="concepts 1 and 2 would both be saved as 'set_2'"):
        export_tokens(tokens, tmp_path / "clash", prefix="set")
    assert not (tmp_path / "clash").exists()


def test_names_are_part_of_the_run_fingerprint_and_no_names_leave_it_as_it_was():
    from types import SimpleNamespace

    from concept_express.uce_core.train import TrainSettings, run_fingerprint

    _, concepts = edit_fixture()
    model = SimpleNamespace(family="sd1", widths=(32,), prediction_type="epsilon")
    plain = run_fingerprint(model, concepts, TrainSettings())
    passed = edit_concepts(concepts, ConceptEdits())
    assert run_fingerprint(model, passed, TrainSettings()) == plain
    named = edit_concepts(concepts, ConceptEdits(names="dog"))
    renamed = edit_concepts(concepts, ConceptEdits(names="cat"))
    assert (
        len({plain, run_fingerprint(model, named, TrainSettings()), run_fingerprint(model, renamed, TrainSettings())})
        == 3
    )
