"""Triton kernel: symmetric-KL first neighbours without the m x n distance matrix.

Importing this module imports triton; ``sym_kl.py`` only does so when a Triton backend is chosen.

One program owns one BLOCK x BLOCK tile (row block I, column block J) of S_ij = h_j - (a_i . l_j + l_i . a_j) (see
``sym_kl_torch`` for the identity and the shift inside l and h). It runs the K loop as two ``tl.dot`` per step into one
fp32 accumulator, then reduces the tile in registers: the row minimum and its lowest column index go to
partial[J, rows of I]. In the self case only tiles with I <= J run; an off-diagonal tile also reduces its columns,
which are row J's candidates from block I (S_ji uses the same products: h_i - cross_ij), into partial[I, rows of J].
So every partial[c, r] = best candidate of row r within column block c is written exactly once, with no atomics, and
the self case costs half the flops. A tiny torch reduction over c then picks the minimum and, among exact ties, the
lowest column index (np.argmin's rule).

``precision`` goes to tl.dot's ``input_precision``: "ieee" (fp32 FMA), "tf32x3" (three TF32 products, ~fp32 accuracy on
tensor cores) or "tf32" (one TF32 product, ~1e-3 relative: not fp32-level). Loads are upcast to fp32 at once, so half
precision inputs work, though the public API always passes the float32 prepared rows. The Triton interpreter ignores
``input_precision`` and computes in full fp32.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ._dispatch import PRECISIONS


@dataclass(frozen=True)
class TileConfig:
    block: int  # rows and columns of a tile (one size, so that a row block is also a column block)
    block_k: int
    num_warps: int
    num_stages: int

    def shared_bytes(self) -> int:  # four fp32 operand tiles per pipeline stage
        return 4 * self.block * self.block_k * 4 * self.num_stages


# Untuned guesses (no GPU was available when this was written). The launcher tries the largest that should fit the
# device's shared memory, falls back to the next when compiling runs out of resources, and remembers what worked.
CUDA_CONFIGS = (
    TileConfig(block=128, block_k=32, num_warps=8, num_stages=3),  # 192 KiB: H100 / H200
    TileConfig(block=128, block_k=16, num_warps=8, num_stages=3),  # 96 KiB: A100, RTX 30xx / 40xx
    TileConfig(block=64, block_k=16, num_warps=4, num_stages=2),  # 32 KiB
)
# Under the interpreter cost grows with programs x K steps, so use few, large tiles.
INTERPRETER_CONFIG = TileConfig(block=64, block_k=128, num_warps=4, num_stages=1)


def candidate_configs(device: torch.device) -> list[TileConfig]:
    """Configs to try, largest first: those that should fit the device's shared memory (all if it cannot be read)."""
    if device.type != "cuda":
        return [INTERPRETER_CONFIG]
    try:
        shared = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)["max_shared_mem"]
    except Exception:
        return list(CUDA_CONFIGS)
    fitting = [c for c in CUDA_CONFIGS if c.shared_bytes() + 8 * 1024 <= shared]
    return fitting or [CUDA_CONFIGS[-1]]


_working_config: dict[tuple[str, int | None], TileConfig] = {}


def _device_key(device: torch.device) -> tuple[str, int | None]:
    if device.type == "cuda" and device.index is None:
        return "cuda", torch.cuda.current_device()
    return device.type, device.index


def default_config(device: torch.device) -> TileConfig:
    """The config the launcher uses on this device (once a launch has settled it, the one that compiled)."""
    return _working_config.get(_device_key(device), candidate_configs(device)[0])


@triton.jit
def _tile(
    a_ptr,
    la_ptr,
    b_ptr,
    lb_ptr,
    ha_ptr,
    hb_ptr,
    part_val_ptr,
    part_idx_ptr,
    m,
    n,
    d,
    pid_m,
    pid_n,
    SYMMETRIC: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)
    cols = pid_n * BLOCK + tl.arange(0, BLOCK)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < m
    col_ok = cols < n
    # Row-major (m, d) and (n, d) operands; the column tiles are read transposed, (BLOCK_K, BLOCK).
    a_off = rows[:, None].to(tl.int64) * d + ks[None, :]
    b_off = cols[None, :].to(tl.int64) * d + ks[:, None]
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        a_mask = row_ok[:, None] & (ks[None, :] + k0 < d)
        b_mask = col_ok[None, :] & (ks[:, None] + k0 < d)
        a = tl.load(a_ptr + a_off + k0, mask=a_mask, other=0.0).to(tl.float32)
        la = tl.load(la_ptr + a_off + k0, mask=a_mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + b_off + k0, mask=b_mask, other=0.0).to(tl.float32)
        lb = tl.load(lb_ptr + b_off + k0, mask=b_mask, other=0.0).to(tl.float32)
        acc = tl.dot(a, lb, acc, input_precision=PRECISION)
        acc = tl.dot(la, b, acc, input_precision=PRECISION)

    big_index = 2147483647
    # Rows of I against the columns of J.
    hb = tl.load(hb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    excluded = ~col_ok[None, :]
    if SYMMETRIC:
        excluded = excluded | (rows[:, None] == cols[None, :])
    vals = tl.where(excluded, float("inf"), hb[None, :] - acc)
    row_best = tl.min(vals, axis=1)
    row_arg = tl.min(tl.where(vals == row_best[:, None], cols[None, :], big_index), axis=1)
    tl.store(part_val_ptr + pid_n * m + rows, row_best, mask=row_ok)
    tl.store(part_idx_ptr + pid_n * m + rows, row_arg, mask=row_ok)

    if SYMMETRIC and pid_m != pid_n:  # the diagonal tile's row minima already covered all of its pairs
        # Rows of J against the columns of I.
        ha = tl.load(ha_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        vals_t = tl.where(~row_ok[:, None], float("inf"), ha[:, None] - acc)
        col_best = tl.min(vals_t, axis=0)
        col_arg = tl.min(tl.where(vals_t == col_best[None, :], rows[:, None], big_index), axis=0)
        tl.store(part_val_ptr + pid_m * m + cols, col_best, mask=col_ok)
        tl.store(part_idx_ptr + pid_m * m + cols, col_arg, mask=col_ok)


@triton.jit
def _sym_kl_first_neighbour_kernel(
    a_ptr,
    la_ptr,
    b_ptr,
    lb_ptr,
    ha_ptr,
    hb_ptr,
    part_val_ptr,
    part_idx_ptr,
    m,
    n,
    d,
    SYMMETRIC: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if SYMMETRIC:
        if pid_m <= pid_n:
            _tile(
                a_ptr,
                la_ptr,
                b_ptr,
                lb_ptr,
                ha_ptr,
                hb_ptr,
                part_val_ptr,
                part_idx_ptr,
                m,
                n,
                d,
                pid_m,
                pid_n,
                SYMMETRIC,
                BLOCK,
                BLOCK_K,
                PRECISION,
            )
    else:
        _tile(
            a_ptr,
            la_ptr,
            b_ptr,
            lb_ptr,
            ha_ptr,
            hb_ptr,
            part_val_ptr,
            part_idx_ptr,
            m,
            n,
            d,
            pid_m,
            pid_n,
            SYMMETRIC,
            BLOCK,
            BLOCK_K,
            PRECISION,
        )


def first_neighbours_triton(
    a: torch.Tensor,
    la: torch.Tensor,
    ha: torch.Tensor,
    b: torch.Tensor | None = None,
    lb: torch.Tensor | None = None,
    hb: torch.Tensor | None = None,
    *,
    precision: str = "ieee",
    config: TileConfig | None = None,
) -> torch.Tensor:
    """argmin_j (h_j - a_i . l_j - l_i . a_j) per row i; b=None searches the rows of ``a`` themselves, self excluded.

    a, la (m, d) and b, lb (n, d) are contiguous; ha (m,), hb (n,). Returns the indices (int64, on a's device).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    symmetric = b is None
    if symmetric:
        b, lb, hb = a, la, ha
    operands = [t.contiguous() for t in (a, la, b, lb, ha, hb)]
    m, d = a.shape
    n = b.shape[0]
    key = _device_key(a.device)
    given = config is not None
    if given:
        candidates = [config]
    elif key in _working_config:
        candidates = [_working_config[key]]
    else:
        candidates = candidate_configs(a.device)
    for k, config in enumerate(candidates):
        try:
            part_val, part_idx = _launch(operands, m, n, d, symmetric, precision, config)
            break
        except OutOfResources:  # the shared-memory estimate was too optimistic: go smaller
            if k == len(candidates) - 1:
                raise
    if not given:  # a config the caller chose says nothing about what the default launch should use
        _working_config.setdefault(key, config)
    best = part_val.min(dim=0, keepdim=True).values
    return torch.where(part_val == best, part_idx, n).min(dim=0).values.long()


def _launch(operands, m: int, n: int, d: int, symmetric: bool, precision: str, config: TileConfig):
    grid = (triton.cdiv(m, config.block), triton.cdiv(n, config.block))
    part_val = torch.empty((grid[1], m), dtype=torch.float32, device=operands[0].device)
    part_idx = torch.empty((grid[1], m), dtype=torch.int32, device=operands[0].device)
    _sym_kl_first_neighbour_kernel[grid](
        *operands,
        part_val,
        part_idx,
        m,
        n,
        d,
        SYMMETRIC=symmetric,
        BLOCK=config.block,
        BLOCK_K=config.block_k,
        PRECISION=precision,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return part_val, part_idx
