"""Region arithmetic on label images: touching (against a pixel union-find), eq. 5 scores, eq. 6 means, masks."""

import localize_oracle as oracle
import numpy as np
import pytest
import torch

from concept_express.uce_core.regions import areas, eot_scores, masks_of, region_means, relabel, touching


@pytest.mark.parametrize("seed,grid,regions", [(0, (9, 9), 6), (1, (7, 12), 10), (2, (16, 16), 25), (3, (1, 8), 3)])
def test_touching_is_the_reference_component_count_test(seed, grid, regions):
    rng = np.random.default_rng(seed)
    labels = rng.integers(-1, regions, size=grid)  # scattered cells, many regions in several pieces, some gaps
    masks = np.stack([labels == r for r in range(regions)])
    expected = oracle.connect(masks).astype(bool)
    got = touching(torch.from_numpy(labels), regions).numpy()
    np.testing.assert_array_equal(got, expected)
    assert got.any() and not got.all()


def test_touching_is_four_connectivity_only():
    labels = torch.tensor([[0, -1], [-1, 1]])  # diagonal neighbours do not touch
    assert not touching(labels, 2).any()
    labels = torch.tensor([[0, 1], [-1, -1]])
    assert touching(labels, 2).tolist() == [[False, True], [True, False]]


def test_eot_scores_are_eq5_ratios_and_a_full_cover_scores_exactly_one():
    rng = np.random.default_rng(0)
    eot = rng.uniform(size=64)
    labels = rng.integers(-1, 4, size=64)
    got = eot_scores(torch.from_numpy(eot), torch.from_numpy(labels), 4).numpy()
    expected = [eot[labels == r].mean() / eot.mean() for r in range(4)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    thirds = torch.tensor([0.1, 0.7, 0.3, 0.2, 0.9, 0.6, 0.3]).double()  # sums that round differently in any order
    assert float(eot_scores(thirds, torch.zeros(7, dtype=torch.long), 1)[0]) == 1.0


def test_region_means_are_eq6_and_ignore_unlabelled_cells():
    rows = torch.rand(12, 5)
    labels = torch.tensor([0, 0, -1, 1, 1, 1, -1, 2, 0, 2, -1, 1])
    got = region_means(rows, labels, 3)
    for r in range(3):
        torch.testing.assert_close(got[r], rows[labels == r].mean(0))


def test_masks_areas_relabel():
    labels = torch.tensor([0, 1, -1, 1, 2, 2])
    masks = masks_of(labels, 3, (2, 3))
    assert masks.shape == (3, 2, 3) and masks.dtype == torch.bool
    assert masks.sum((1, 2)).tolist() == areas(labels, 3).tolist() == [1, 2, 2]
    assert relabel(labels, torch.tensor([2, -1, 0])).tolist() == [2, -1, -1, -1, 0, 0]
