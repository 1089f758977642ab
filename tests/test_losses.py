"""The three training losses against independent float64 computations written here from the paper and the spec."""

import math

import numpy as np
import ot
import pytest
import torch

from concept_express.uce_core.backends.base import NoiseSchedule
from concept_express.uce_core.losses import (
    contrastive_loss,
    emd_alignment_loss,
    grid_cost,
    masked_denoising_loss,
    nearest_downsample,
)


def test_masked_denoising_loss_is_the_reference_mean_over_all_elements():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 5, 6, generator=g), torch.randn(2, 4, 5, 6, generator=g)
    mask = torch.zeros(2, 5, 6)
    mask[0, 1:3, 2:5] = 1
    mask[1] = 1
    got = masked_denoising_loss(pred, target, mask)
    for b in range(2):
        p, t, m = pred[b].double().numpy(), target[b].double().numpy(), mask[b].double().numpy()
        expected = sum(
            (p[c, y, x] * m[y, x] - t[c, y, x] * m[y, x]) ** 2 for c in range(4) for y in range(5) for x in range(6)
        ) / (4 * 5 * 6)
        assert got[b].item() == pytest.approx(expected, rel=1e-5)


def supcon_oracle(vectors: np.ndarray, labels: np.ndarray, tau: float) -> float:
    """Spec 1.10: -mean_i (1/|P(i)|) sum_{p in P(i)} log(e^{s_ip/tau} / sum_{k != i} e^{s_ik/tau}), cosine s."""
    z = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    s = z @ z.T / tau
    total = 0.0
    for i in range(len(z)):
        denom = sum(math.exp(s[i, k]) for k in range(len(z)) if k != i)
        pos = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        total += sum(math.log(math.exp(s[i, p]) / denom) for p in pos) / len(pos)
    return -total / len(z)


@pytest.mark.parametrize("n,g", [(1, 5), (3, 5), (4, 2), (12, 5)])
def test_contrastive_loss_matches_the_supcon_formula(n, g):
    rng = np.random.default_rng(n * 10 + g)
    vectors = rng.normal(size=(n * g, 16))
    labels = np.arange(n * g) % n
    got = contrastive_loss(torch.tensor(vectors, dtype=torch.float32), torch.tensor(labels), 0.07)
    assert got.item() == pytest.approx(supcon_oracle(vectors, labels, 0.07), rel=1e-4)


def test_contrastive_loss_pulls_same_concept_tokens_together():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(10, 8, generator=g, requires_grad=True)
    labels = torch.arange(10) % 2
    opt = torch.optim.SGD([v], lr=0.05)
    before = contrastive_loss(v, labels).item()
    for _ in range(50):
        opt.zero_grad()
        contrastive_loss(v, labels).backward()
        opt.step()
    z = torch.nn.functional.normalize(v.detach(), dim=1)
    same = (z @ z.T)[labels[:, None] == labels[None, :]].mean()
    other = (z @ z.T)[labels[:, None] != labels[None, :]].mean()
    assert contrastive_loss(v, labels).item() < before and same > other


def reference_sinkhorn(target, attention, cost, lam, iterations):
    """Float64 re-implementation of the reference's log-domain Sinkhorn (spec 1.10): mu = target, nu = attention,
    log_u starts at -log n, each iteration updates log_v then log_u; returns sum P * C and lam * log_v."""
    mu = target.double() / target.sum()
    nu = attention.double() / attention.sum()
    c = cost.double()
    log_u = torch.full_like(mu, -math.log(len(mu)))
    log_v = torch.full_like(nu, -math.log(len(nu)))
    for _ in range(iterations):
        log_v = nu.log() - torch.logsumexp(-c / lam + log_u[:, None], 0)
        log_u = mu.log() - torch.logsumexp(-c / lam + log_v[None, :], 1)
    plan = torch.exp(-c / lam + log_u[:, None] + log_v[None, :])
    return (plan * c).sum(), lam * log_v


def _maps(seed, n, count=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(count, n, generator=g) ** 3 + 1e-3, torch.rand(count, n, generator=g) ** 3 + 1e-3


@pytest.mark.parametrize("reg,iterations", [(1e-3, 200), (0.3, 300)])
def test_sinkhorn_matches_the_reference_iteration(reg, iterations):
    h, w = 6, 5
    cost = grid_cost(h, w)
    attention, target = _maps(1, h * w)
    attention.requires_grad_(True)
    got = emd_alignment_loss(attention, target, cost, reg=reg, iterations=iterations)
    (got.sum()).backward()
    for i in range(3):
        value, potential = reference_sinkhorn(target[i], attention[i].detach(), cost, reg, iterations)
        assert got[i].item() == pytest.approx(value.item(), rel=1e-4, abs=1e-6)
        # the gradient is the attention-side potential pushed through the normalisation a / sum(a)
        a = attention[i].detach().double()
        p = potential - potential.mean()
        expected = (p - (p * a / a.sum()).sum()) / a.sum()
        torch.testing.assert_close(attention.grad[i].double(), expected, rtol=2e-3, atol=1e-5)


def test_sinkhorn_agrees_with_pot_sinkhorn2_when_converged():
    cost = grid_cost(4, 4)
    attention, target = _maps(2, 16)
    got = emd_alignment_loss(attention, target, cost, reg=0.5, iterations=2000)
    for i in range(3):
        a, b = attention[i].double() / attention[i].sum(), target[i].double() / target[i].sum()
        expected = ot.sinkhorn2(a, b, cost.double(), 0.5, method="sinkhorn_log", numItermax=5000, stopThr=1e-12)
        assert got[i].item() == pytest.approx(float(expected), rel=1e-4)


def test_exact_emd_matches_pot_emd2_and_finite_differences():
    cost = grid_cost(4, 4)
    attention, target = _maps(3, 16)
    x = attention.clone().requires_grad_(True)
    got = emd_alignment_loss(x, target, cost, method="exact")
    got.sum().backward()

    def emd(a_row, b_row):
        return float(ot.emd2(a_row / a_row.sum(), b_row / b_row.sum(), cost.double()))

    for i in range(3):
        assert got[i].item() == pytest.approx(emd(attention[i].double(), target[i].double()), rel=1e-6)
        for k in (0, 5, 11):
            e = torch.zeros(16, dtype=torch.float64)
            e[k] = 1e-6
            fd = (
                emd(attention[i].double() + e, target[i].double()) - emd(attention[i].double() - e, target[i].double())
            ) / 2e-6
            assert x.grad[i, k].item() == pytest.approx(fd, rel=1e-3, abs=1e-6)


def test_sinkhorn_gradient_matches_finite_differences_of_the_entropic_objective():
    """Converged, the gradient is the envelope gradient of min_P <P,C> + reg * sum P log P."""
    reg, cost = 0.5, grid_cost(3, 4)
    attention, target = _maps(4, 12, count=1)
    x = attention.clone().requires_grad_(True)
    emd_alignment_loss(x, target, cost, reg=reg, iterations=3000).sum().backward()

    def objective(a_row):
        a, b = a_row / a_row.sum(), target[0].double() / target[0].sum()
        plan = ot.sinkhorn(a, b, cost.double(), reg, method="sinkhorn_log", numItermax=5000, stopThr=1e-12)
        return float((plan * cost.double()).sum() + reg * (plan * torch.log(plan + 1e-300)).sum())

    for k in range(12):
        e = torch.zeros(12, dtype=torch.float64)
        e[k] = 1e-5
        fd = (objective(attention[0].double() + e) - objective(attention[0].double() - e)) / 2e-5
        assert x.grad[0, k].item() == pytest.approx(fd, rel=2e-3, abs=2e-5)


def test_grid_cost_is_euclidean_pixel_distance():
    cost = grid_cost(2, 3)
    assert cost[0, 5].item() == pytest.approx(math.hypot(1, 2))
    assert cost[1, 4].item() == pytest.approx(1.0)
    assert torch.equal(cost, cost.T) and (cost.diagonal() == 0).all()


def test_nearest_downsample_keeps_every_fourth_pixel_like_the_reference():
    maps = torch.arange(64 * 64, dtype=torch.float32).view(1, 64, 64)
    small = nearest_downsample(maps, (16, 16))
    assert torch.equal(small[0], maps[0, ::4, ::4])


def test_v_prediction_target_matches_diffusers():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction"
    )
    schedule = NoiseSchedule(scheduler.alphas_cumprod, "v_prediction")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(
        schedule.add_noise(x0, noise, t), scheduler.add_noise(x0, noise, t), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        schedule.target(x0, noise, t), scheduler.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-6
    )
    assert torch.equal(NoiseSchedule(scheduler.alphas_cumprod, "epsilon").target(x0, noise, t), noise)


def _linprog_emd(a, b, cost):
    """The exact EMD as a linear programme (scipy's HiGHS): min <P, C> with P >= 0, P 1 = a, P^T 1 = b."""
    from scipy.optimize import linprog

    n = len(a)
    rows = np.kron(np.eye(n), np.ones(n))
    cols = np.kron(np.ones(n), np.eye(n))
    res = linprog(cost.ravel(), A_eq=np.vstack([rows, cols]), b_eq=np.concatenate([a, b]), bounds=(0, None))
    assert res.status == 0
    return res.fun


def test_the_shown_value_is_the_exact_emd_and_the_gradient_is_unchanged():
    """With the official Sinkhorn settings <P, C> is not the EMD (in training it is 0.0: the plan stays diagonal), so
    training records the exact EMD instead (value="exact"); the gradient is the Sinkhorn potential either way."""
    h, w = 3, 4
    cost = grid_cost(h, w)
    attention, target = _maps(5, h * w)
    grads = {}
    for shown in ("plan", "exact"):
        x = attention.clone().requires_grad_(True)
        got = emd_alignment_loss(x, target, cost, value=shown)
        got.sum().backward()
        grads[shown] = x.grad
        for i in range(3):
            a = attention[i].double().numpy() / attention[i].double().sum().item()
            b = target[i].double().numpy() / target[i].double().sum().item()
            exact = _linprog_emd(a, b, cost.double().numpy())
            assert exact > 0.1
            if shown == "exact":
                assert got[i].item() == pytest.approx(exact, rel=1e-5)
            else:  # far from converged, the plan's cost is not the EMD
                assert abs(got[i].item() - exact) > 0.01
    assert torch.equal(grads["plan"], grads["exact"])
    with pytest.raises(ValueError, match="value must be"):
        emd_alignment_loss(attention, target, cost, value="dual")
