"""Localization metrics (paper eqs. 18-20) on hand-built masks with known answers, the k-means baseline, the EOT
filter for baselines, the synthetic scenes and the benchmark harness."""

import numpy as np
import pytest
import torch

from concept_express.uce_core.evaluate import (
    SUITE,
    eot_filtered_masks,
    format_table,
    iou_matrix,
    kmeans,
    run_benchmark,
    score_masks,
)
from concept_express.uce_core.synthetic import SceneSpec, make_scene


def square(y, x, size, grid=(12, 12)):
    m = torch.zeros(grid, dtype=torch.bool)
    m[y : y + size, x : x + size] = True
    return m


def test_iou_of_shifted_squares():
    a, b = square(0, 0, 4), square(0, 2, 4)  # overlap 8, union 24
    assert iou_matrix(a[None], b[None])[0, 0] == pytest.approx(1 / 3)
    assert iou_matrix(a[None], torch.zeros(1, 12, 12, dtype=torch.bool))[0, 0] == 0.0


def test_perfect_prediction_in_any_order():
    truth = torch.stack([square(0, 0, 3), square(5, 5, 3), square(0, 8, 4)])
    s = score_masks(truth[[2, 0, 1]], truth)
    assert (s.iou, s.recall, s.precision) == (1.0, 1.0, 1.0)
    assert sorted((p, t) for p, t, _ in s.matches) == [(0, 2), (1, 0), (2, 1)]


def test_extra_prediction_costs_iou_and_precision_not_recall():
    truth = torch.stack([square(0, 0, 4), square(6, 6, 4)])
    predicted = torch.stack([square(0, 0, 4), square(6, 6, 4), square(0, 8, 2)])  # N = 3 > M = 2
    s = score_masks(predicted, truth)
    assert s.iou == pytest.approx(2 / 3)  # eq. 18 divides by N
    assert s.recall == 1.0 and s.precision == pytest.approx(2 / 3)


def test_missing_concept_costs_recall():
    truth = torch.stack([square(0, 0, 4), square(6, 6, 4), square(0, 8, 3)])
    predicted = torch.stack([square(0, 0, 4), square(6, 6, 2)])  # N = 2 < M = 3; second IoU = 4/16
    s = score_masks(predicted, truth)
    assert s.iou == pytest.approx((1 + 0.25) / 2)
    assert s.recall == pytest.approx(2 / 3) and s.precision == 1.0


def test_a_matched_pair_with_zero_iou_is_not_a_true_positive():
    truth = torch.stack([square(0, 0, 3), square(8, 8, 3)])
    predicted = torch.stack([square(0, 0, 3), square(0, 8, 3)])  # the second prediction touches no truth
    s = score_masks(predicted, truth)
    assert len(s.matches) == 2  # M' = 2 pairs are assigned ...
    assert s.recall == 0.5 and s.precision == 0.5  # ... but R counts only the one with IoU > 0
    assert s.iou == pytest.approx(0.5)


def test_assignment_is_optimal_not_greedy():
    """On a strip of 100 cells: t0 = [0, 50), t1 = [50, 95), p0 = [0, 90), p1 = [0, 25). IoU(p0, t0) = 50/90 is the
    largest entry, but taking it leaves p1 with t1 (IoU 0); the optimum pairs p0-t1 (40/95) and p1-t0 (25/50)."""

    def strip(a, b):
        m = torch.zeros(100, dtype=torch.bool)
        m[a:b] = True
        return m.view(10, 10)

    truth = torch.stack([strip(0, 50), strip(50, 95)])
    predicted = torch.stack([strip(0, 90), strip(0, 25)])
    ious = iou_matrix(predicted, truth)
    np.testing.assert_allclose(ious, [[50 / 90, 40 / 95], [25 / 50, 0.0]])
    s = score_masks(predicted, truth)
    assert sorted((p, t) for p, t, _ in s.matches) == [(0, 1), (1, 0)]
    assert s.iou == pytest.approx((40 / 95 + 25 / 50) / 2)
    assert (s.recall, s.precision) == (1.0, 1.0)


def test_no_prediction_scores_zero_and_no_truth_is_an_error():
    truth = square(0, 0, 3)[None]
    s = score_masks(torch.zeros(0, 12, 12, dtype=torch.bool), truth)
    assert (s.iou, s.recall, s.precision, s.num_predicted) == (0.0, 0.0, 0.0, 0)
    with pytest.raises(ValueError):
        score_masks(truth, torch.zeros(0, 12, 12, dtype=torch.bool))


def test_kmeans_recovers_separated_blobs_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0]])
    truth = torch.arange(4).repeat_interleave(25)
    rows = centres[truth] + 0.3 * torch.randn(100, 3, generator=g)
    labels = kmeans(rows, 4, seed=1)
    assert torch.equal(labels, truth)  # numbered by first occurrence, so equal to the truth as written
    assert torch.equal(kmeans(rows, 3, seed=5), kmeans(rows, 3, seed=5))
    assert int(kmeans(rows[:3], 10).max()) + 1 == 3  # k above n is clamped


def test_baseline_filter_keeps_exactly_the_salient_clusters():
    scene = make_scene(SceneSpec(grid=(16, 16), objects=(2, 2)), seed=0)
    truth = scene.truth
    labels = torch.full((256,), 0, dtype=torch.long)  # cluster 0: background, 1 and 2: the two objects
    for k, mask in enumerate(truth):
        labels[mask.reshape(-1)] = k + 1
    masks = eot_filtered_masks(scene, labels, 3)
    assert torch.equal(masks, truth)


def test_synthetic_scenes_are_seeded_distributions_with_ground_truth():
    a, b = make_scene(SUITE["parts"], 3), make_scene(SUITE["parts"], 3)
    assert torch.equal(a.maps.self_attention, b.maps.self_attention) and torch.equal(a.truth, b.truth)
    rows = a.maps.self_attention
    assert rows.shape == (4096, 4096) and torch.isfinite(rows).all()
    torch.testing.assert_close(rows.sum(1), torch.ones(4096), rtol=0, atol=1e-5)
    assert a.maps.eot.shape == (16, 16)
    assert 3 <= len(a.truth) <= 5 and not (a.truth.sum(0) > 1).any()
    c = make_scene(SceneSpec(grid=(16, 16), lookalikes=2, objects=(3, 3)), 0)
    assert len(c.truth) == 3


def test_ours_finds_every_object_on_part_structured_scenes():
    """A behaviour check of the whole method on synthetic attention (fixed seeds): every object made of two parts is
    found (recall 1), and on at least one scene exactly, one concept per object and nothing else."""
    spec = SceneSpec(**{**SUITE["parts"].__dict__, "grid": (32, 32)})
    result = run_benchmark({"parts": spec}, seeds=range(3), counts=(4,))
    scores = [row["ours"] for row in result.per_scene]
    assert all(s.recall == 1.0 for s in scores), scores
    assert any((s.iou, s.precision) == (1.0, 1.0) for s in scores), scores
    table = format_table(result)
    assert table.splitlines()[0] == "| metric | kmeans-4 | finch-4 | ours |"
    assert "| IoU | " in table and "| Recall | " in table and "| Precision | " in table
