"""Turning arbitrary rows into strictly positive distributions before any logarithm is taken.

The reference takes ``log`` of its rows unguarded, so one exact zero turns a row and a column of the distance matrix
into NaN and FINCH collapses into one cluster (reference-spec 5.3). fp16 attention rows are full of zeros (values below
2^-25 flush to 0) and fp32 softmax rows can contain exact zeros too.

The floor is ``FLOOR = 2**-24``, the smallest positive fp16 value: clamping fp16-quantised rows there and renormalising
gives the same first neighbours as the fp32 rows they came from (measured at n = 4096, reference-spec 5.3), and it is
far below any entry that carries mass (1/16384 = 6.1e-5 is the uniform value at the largest grid we handle).
"""

import torch

from ._device import row_chunks

FLOOR = 2.0**-24
# A row that is already a distribution (finite, float32 sum within SUM_TOLERANCE of 1, no entry below what clamping at
# the floor and renormalising can leave, floor / (1 + d * floor)) is returned bit for bit: preparing twice changes
# nothing, and valid reference inputs reach the maths unchanged. A row summing to 1 +- 1e-5 changes a distance by at
# most ~1e-5 relative.
SUM_TOLERANCE = 1e-5


def prepare_distributions(rows: torch.Tensor, floor: float = FLOOR) -> torch.Tensor:
    """Return float32 rows that are strictly positive and sum to 1.

    Per row: NaN, +-inf and negative entries count as 0; the row is divided by its sum (a row summing to 0 becomes
    uniform); entries are clamped at ``floor``; the row is renormalised. So the result is invariant to the scale of
    each row, and every entry is at least ``floor / (1 + d * floor)``.

    Rows that already satisfy this contract (finite, min >= floor / (1 + d * floor), |sum - 1| <= SUM_TOLERANCE) are
    left untouched, bit for bit, so the function is idempotent; when every row does and the input is float32 and
    contiguous, the input itself is returned (no copy).
    """
    if rows.dim() != 2:
        raise ValueError(f"rows must be 2-D (m, d), got shape {tuple(rows.shape)}")
    if not (0.0 < floor < 1.0):
        raise ValueError(f"floor must be in (0, 1), got {floor}")
    a = (rows.detach() if rows.requires_grad else rows).to(torch.float32).contiguous()
    m, d = a.shape
    if m == 0 or d == 0:
        return a
    # amin is NaN for a row holding a NaN, -inf for -inf; the sum is not finite for +inf. Both fail the test.
    valid = (a.amin(dim=1) >= floor / (1.0 + d * floor)) & ((a.sum(dim=1) - 1.0).abs() <= SUM_TOLERANCE)
    bad = (~valid).nonzero().flatten()
    if bad.numel() == 0:
        return a
    if a.data_ptr() == rows.data_ptr():
        a = a.clone()
    for part in row_chunks(bad.numel(), d, a.device):
        idx = bad[part]
        a[idx] = _repair(a[idx], floor)
    return a


def _repair(x: torch.Tensor, floor: float) -> torch.Tensor:
    x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).clamp_(min=0.0)
    # Scale by the row maximum first so that the sum cannot overflow float32.
    peak = x.amax(dim=1, keepdim=True)
    x = torch.where(peak > 0, x / peak.clamp(min=torch.finfo(torch.float32).tiny), torch.ones_like(x))
    x = x / x.sum(dim=1, keepdim=True)
    x.clamp_(min=floor)
    return x / x.sum(dim=1, keepdim=True)
