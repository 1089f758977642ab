"""Attention aggregation against a float64 re-computation written here from the reference spec (section 1.3):
bilinear interpolation of key dims (align_corners=False), nearest duplication of query dims, weight r/R, sum,
divide by the sum of weights, row renormalisation."""

import numpy as np
import pytest
import torch
from oracles import aggregate_oracle as oracle

from concept_express.uce_core.attention import (
    CaptureRecorder,
    aggregate_self_attention,
    attention_with_probs,
    grid_of,
    normalise_rows,
)
from concept_express.uce_core.backends.base import AttentionLayer


def random_attention(rng, grid, sharp=3.0):
    n = grid[0] * grid[1]
    logits = rng.normal(size=(n, n)) * sharp
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(
    "target,grids",
    [
        ((16, 16), [(16, 16), (8, 8), (4, 4), (2, 2), (8, 8), (16, 16)]),  # square, SD-like pyramid
        ((12, 16), [(12, 16), (6, 8), (3, 4), (6, 8)]),  # non-square latent (3:4)
        ((8, 8), [(16, 16), (8, 8), (4, 4)]),  # target coarser than the finest layer
    ],
)
def test_aggregation_matches_float64_oracle(target, grids):
    rng = np.random.default_rng(0)
    layers = [(random_attention(rng, g), g) for g in grids]
    n = target[0] * target[1]
    acc = torch.zeros(n, n)
    weight = sum(aggregate_self_attention(acc, torch.from_numpy(p), g, target) for p, g in layers)
    ours = normalise_rows(acc / weight).double().numpy()
    expected = oracle(layers, target)
    np.testing.assert_allclose(ours, expected, rtol=2e-5, atol=1e-9)
    np.testing.assert_allclose(ours.sum(1), 1.0, atol=1e-6)


def test_reference_weights_favour_coarse_layers_after_normalisation():
    """Spec 1.3: with r/R weights and row renormalisation, a 4x4 layer's rows end up with about 4x the effective
    weight of a 16x16 layer's (bilinear keeps values, not mass). Two layers of uniform attention show it."""
    target = (16, 16)
    fine = np.full((256, 256), 1 / 256, np.float32)
    coarse = np.full((16, 16), 1 / 16, np.float32)
    acc = torch.zeros(256, 256)
    aggregate_self_attention(acc, torch.from_numpy(fine), (16, 16), target)
    fine_mass = acc.sum(1).mean().item()
    acc.zero_()
    aggregate_self_attention(acc, torch.from_numpy(coarse), (4, 4), target)
    coarse_mass = acc.sum(1).mean().item()
    assert coarse_mass / fine_mass == pytest.approx(4.0, rel=1e-5)


def test_zero_and_nan_rows_become_uniform_and_nothing_is_nan():
    m = torch.rand(5, 7)
    m[1] = 0
    m[3, 2] = float("nan")
    m[4, 0] = -1.0
    out = normalise_rows(m.clone())
    assert torch.isfinite(out).all() and (out >= 0).all()
    torch.testing.assert_close(out.sum(1), torch.ones(5))
    torch.testing.assert_close(out[1], torch.full((7,), 1 / 7))


def test_attention_with_probs_matches_naive_softmax_in_float64():
    g = torch.Generator().manual_seed(0)
    b, nq, nk, heads, dh = 2, 37, 11, 3, 4
    q, k, v = (torch.randn(b, n, heads * dh, generator=g) for n in (nq, nk, nk))
    qd, kd, vd = (t.double().view(b, -1, heads, dh).transpose(1, 2) for t in (q, k, v))
    p = torch.softmax(qd @ kd.transpose(-1, -2) * dh**-0.5, dim=-1)
    expected_out = (p @ vd).transpose(1, 2).reshape(b, nq, -1)
    chunk = 4 * b * heads * nk * 8  # 8 query rows per chunk: exercises the chunk loop
    with torch.no_grad():  # in-place path
        out, probs = attention_with_probs(q, k, v, heads, scale=dh**-0.5, chunk_bytes=chunk)
    torch.testing.assert_close(out.double(), expected_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.double(), p.mean(1), rtol=1e-5, atol=1e-7)
    qg = q.clone().requires_grad_(True)  # autograd path
    out_g, probs_g = attention_with_probs(qg, k, v, heads, scale=dh**-0.5, chunk_bytes=chunk)
    torch.testing.assert_close(out_g.double(), expected_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs_g.double(), p.mean(1), rtol=1e-5, atol=1e-7)
    (out_g.sum() + probs_g[:, :, 0].sum()).backward()
    qd_g = q.double().clone().requires_grad_(True)
    pd = torch.softmax(qd_g.view(b, -1, heads, dh).transpose(1, 2) @ kd.transpose(-1, -2) * dh**-0.5, dim=-1)
    ((pd @ vd).sum() + pd.mean(1)[:, :, 0].sum()).backward()
    torch.testing.assert_close(qg.grad.double(), qd_g.grad, rtol=1e-4, atol=1e-6)


def test_grid_of():
    assert grid_of(4096, (64, 64)) == (64, 64)
    assert grid_of(256, (64, 64)) == (16, 16)
    assert grid_of(12, (12, 16)) == (3, 4)
    with pytest.raises(ValueError):
        grid_of(100, (64, 64))


def test_recorder_eot_prefers_quarter_grid_and_averages_layers():
    rec = CaptureRecorder((16, 16), eot_position=1)
    a = torch.zeros(1, 16, 77)
    a[0, :, 1] = torch.arange(16.0)
    b = torch.zeros(1, 16, 77)
    b[0, :, 1] = 2.0
    rec.record(AttentionLayer("cross", (4, 4), "down"), a)
    rec.record(AttentionLayer("cross", (4, 4), "up"), b)
    rec.record(AttentionLayer("cross", (8, 8), "up"), torch.ones(1, 64, 77))
    assert not rec.wants(AttentionLayer("cross", (4, 4), "mid"))  # the reference reads (up, down) only
    eot, grid = rec.eot_map((16, 16))
    assert grid == (4, 4)
    torch.testing.assert_close(eot, ((torch.arange(16.0) + 2) / 2).view(4, 4))
