"""The three training losses of ConceptExpress, one place per paper equation.

* eq. 8  ``masked_denoising_loss`` — the reference's form: ``mse(pred * m, target * m)`` averaged over all latent
  elements (so it scales with the mask's area, as in the official code), per prompt.
* eq. 10 ``contrastive_loss`` — the reference's SupCon form: cosine similarities of the L2-normalised split
  tokens, temperature tau, "log inside the mean" over positives, mean over anchors.
* eq. 11 ``emd_alignment_loss`` — location-aware earth mover's distance between a token's cross-attention map and
  its concept's mean attention f_i, with Euclidean pixel-distance cost, solved by POT: entropic log-domain Sinkhorn
  (the reference: reg 1e-3, 200 iterations, no convergence test) or exact EMD. Both maps are normalised to sum 1.
  Like the reference's custom autograd op, the value is <P, C> and the gradient with respect to the attention is
  the dual potential of the attention side (the envelope-theorem gradient of the OT problem), not a
  differentiation through the iterations.

  What the value shows: with the official settings (reg 1e-3 on a cost of whole cells, 200 iterations) the Sinkhorn
  plan never leaves the diagonal (exp(-1/reg) underflows, and 200 log-domain iterations move the potentials by far
  less than one cell's cost), so <P, C> is 0.0 at every step while the potentials still carry a useful gradient.
  Training therefore asks for ``value="exact"``: the returned number is the exact EMD between the two normalised
  maps (network simplex in float64, for display only: it is what the term measures), while the gradient is
  unchanged, still the Sinkhorn potential. The optimisation is the reference's either way; only the recorded
  history differs (docs/deviations.md 3.6).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_denoising_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) prediction and target, (B, h, w) mask in {0, 1} -> (B,) losses."""
    m = mask[:, None].to(torch.float32)
    diff = pred.float() * m - target.float() * m
    return diff.pow(2).flatten(1).mean(dim=1)


def contrastive_loss(vectors: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """SupCon over token vectors (K, d) with concept labels (K,): -mean_i (1/|P(i)|) sum_{p in P(i)} log softmax_i(p),
    where the softmax runs over all k != i of the cosine similarities / temperature."""
    z = F.normalize(vectors.float(), dim=-1)
    logits = z @ z.T / temperature
    k = logits.shape[0]
    self_mask = torch.eye(k, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    counts = positives.sum(1)
    if bool((counts == 0).any()):
        raise ValueError("every token needs at least one other token of the same concept (split tokens >= 2)")
    return -(log_prob.masked_fill(~positives, 0.0).sum(1) / counts).mean()


def grid_cost(height: int, width: int, device=None) -> torch.Tensor:
    """(h*w, h*w) Euclidean distances between the cells of an h x w grid (row-major), float32."""
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
    )
    points = torch.stack([ys.flatten(), xs.flatten()], dim=1)
    return torch.cdist(points, points).to(device=device, dtype=torch.float32)


def emd_alignment_loss(
    attention: torch.Tensor,
    target: torch.Tensor,
    cost: torch.Tensor,
    *,
    method: str = "sinkhorn",
    reg: float = 1e-3,
    iterations: int = 200,
    value: str = "plan",
) -> torch.Tensor:
    """(B, n) token attention maps, (B, n) targets f_i, (n, n) cost -> (B,) OT costs.

    Gradients reach ``attention`` only (through its normalisation to sum 1): the attention-side dual potential of
    ``method``. ``value``: "plan" = <P, C> of the solver's plan (the reference's value); "exact" = the exact EMD,
    whatever the method (for display; see the module docstring). The gradient does not depend on ``value``.
    """
    if value not in ("plan", "exact"):
        raise ValueError(f"value must be 'plan' or 'exact', not {value!r}")
    import ot

    a = attention.float()
    a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    b = target.detach().float()
    b = b / b.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    cost = cost.to(device=a.device, dtype=torch.float32)
    with torch.no_grad():
        if method == "sinkhorn":
            # The attention side is POT's source (updated first in each iteration), as in the reference.
            result = ot.batch.solve_batch(
                cost.expand(a.shape[0], -1, -1),
                reg=reg,
                a=a.detach(),
                b=b,
                max_iter=iterations,
                tol=0.0,
                method="log_sinkhorn",
                grad="detach",
            )
            result_value = result.value_linear
            potential = reg * result.potentials[0]
        elif method == "exact":
            values, potentials = [], []
            for ai, bi in zip(a.detach().double(), b.double()):
                res = ot.solve(cost.double(), ai, bi)
                values.append(res.value)
                potentials.append(res.potentials[0])
            result_value = torch.stack(values).to(a)
            potential = torch.stack(potentials).to(a)
        else:
            raise ValueError(f"EMD method must be 'sinkhorn' or 'exact', not {method!r}")
        shown = result_value
        if value == "exact" and method != "exact":  # the exact EMD for display; the gradient stays the method's
            if bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all()):
                pairs = zip(a.detach().double().cpu(), b.double().cpu())
                shown = torch.stack([torch.as_tensor(ot.emd2(ai, bi, cost.double().cpu())) for ai, bi in pairs]).to(a)
            else:  # a diverged step: POT refuses non-finite masses; the training's divergence check sees the NaN
                shown = torch.full_like(result_value, float("nan"))
    potential = potential - potential.mean(dim=-1, keepdim=True)
    surrogate = (potential * a).sum(dim=-1)
    return shown + surrogate - surrogate.detach()


def nearest_downsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) -> (N, *size) by nearest neighbour (the reference's ``F.interpolate`` default: for a 4x smaller grid
    it keeps pixels 0, 4, 8, ...)."""
    return F.interpolate(maps[:, None].float(), size=size, mode="nearest")[:, 0]
