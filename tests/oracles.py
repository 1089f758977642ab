"""Independent float64 re-computations shared by several tests (written from the paper and the reference spec,
never from the implementation)."""

import numpy as np


def bilinear_axis(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 weights of half-pixel-centre linear interpolation, edges clamped."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        w[i, i0] += 1 - frac
        w[i, i1] += frac
    return w


def aggregate_oracle(layers, target):
    """Reference aggregation (spec 1.3) of [(probs (n_l, n_l), (rh, rw)), ...] onto ``target``, in float64."""
    th, tw = target
    total = np.zeros((th * tw, th * tw))
    weights = 0.0
    for probs, (rh, rw) in layers:
        p = probs.astype(np.float64).reshape(rh * rw, rh, rw)
        keys = np.einsum("ya,qab,xb->qyx", bilinear_axis(rh, th), p, bilinear_axis(rw, tw)).reshape(rh, rw, th * tw)
        if rh <= th:
            full = np.repeat(np.repeat(keys, th // rh, axis=0), tw // rw, axis=1)
        else:
            full = keys.reshape(th, rh // th, tw, rw // tw, -1).mean(axis=(1, 3))
        total += (rh / th) * full.reshape(th * tw, th * tw)
        weights += rh / th
    total /= weights
    return total / total.sum(axis=1, keepdims=True)
