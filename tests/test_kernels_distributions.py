"""prepare_distributions: the floor, renormalisation, the repair of zeros / NaN / inf / negatives, idempotence."""

import numpy as np
import pytest
import torch

from concept_express.uce_kernels import FLOOR, prepare_distributions


def test_floor_is_the_smallest_positive_fp16():
    assert FLOOR == 2.0**-24 == torch.finfo(torch.float16).smallest_normal * 2.0**-10


def test_bad_entries_are_zeroed_clamped_and_rows_renormalised():
    x = torch.tensor(
        [
            [0.5, 0.5, 0.0, 0.0],
            [float("nan"), 1.0, 1.0, 2.0],
            [float("inf"), 1.0, 3.0, float("-inf")],
            [-5.0, 2.0, 2.0, 4.0],
        ]
    )
    got = prepare_distributions(x).double().numpy()
    # The rule in float64: bad -> 0, divide by the sum, clamp at the floor, renormalise.
    clean = np.array([[0.5, 0.5, 0, 0], [0, 1, 1, 2], [0, 1, 3, 0], [0, 2, 2, 4]], dtype=np.float64)
    expected = np.maximum(clean / clean.sum(1, keepdims=True), FLOOR)
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
    assert (got > 0).all()


def test_rows_without_mass_become_uniform():
    x = torch.tensor([[0.0, 0.0, 0.0], [float("nan"), -1.0, 0.0], [1.0, 1.0, 2.0]])
    got = prepare_distributions(x)
    assert torch.equal(got[0], torch.full((3,), 1 / 3)) and torch.equal(got[1], torch.full((3,), 1 / 3))


def test_scale_does_not_matter_even_near_float32_limits():
    base = torch.rand(6, 50, generator=torch.Generator().manual_seed(0)) + 0.01
    for scale in (1e-30, 1.0, 1e30):
        got = prepare_distributions(base * scale)
        torch.testing.assert_close(got, base / base.sum(dim=1, keepdim=True), rtol=2e-6, atol=0)
    huge = torch.full((1, 8), 3e38)  # the plain sum would overflow to inf
    assert torch.allclose(prepare_distributions(huge), torch.full((1, 8), 1 / 8))


def test_valid_rows_come_back_bit_for_bit_without_a_copy():
    x = torch.rand(20, 64, generator=torch.Generator().manual_seed(1)) + 0.1
    x = x / x.sum(dim=1, keepdim=True)
    assert prepare_distributions(x) is x
    y = x.clone()
    y[3, 7] = 0.0  # one bad row: only that row changes, and the caller's tensor is not modified
    got = prepare_distributions(y)
    assert y[3, 7] == 0.0 and got.data_ptr() != y.data_ptr()
    assert torch.equal(got[torch.arange(20) != 3], x[torch.arange(20) != 3])
    assert got[3, 7] > 0


def test_idempotent():
    x = torch.rand(30, 100, generator=torch.Generator().manual_seed(2)) ** 8
    x[::3, ::5] = 0.0
    once = prepare_distributions(x.half())
    assert once.dtype == torch.float32
    assert torch.equal(prepare_distributions(once), once)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_come_out_float32(dtype):
    x = torch.rand(5, 10, generator=torch.Generator().manual_seed(3)).to(dtype)
    got = prepare_distributions(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.sum(dim=1), torch.ones(5), rtol=0, atol=1e-6)


def test_fp16_quantised_attention_rows_keep_their_mass_where_it_was():
    """Softmax rows cast to fp16 lose their small entries to zero; after preparation they are close to the fp32 rows
    again wherever the mass is, and the former zeros sit at the floor."""
    logits = torch.randn(8, 4096, generator=torch.Generator().manual_seed(4)) * 6
    p32 = torch.softmax(logits, dim=1)
    p16 = p32.half()
    assert (p16 == 0).any()
    got = prepare_distributions(p16)
    big = p32 > 1e-3
    torch.testing.assert_close(got[big], p32[big], rtol=2e-3, atol=0)
    assert got[p16 == 0].max() < 2 * FLOOR


def test_shape_and_floor_are_checked():
    with pytest.raises(ValueError):
        prepare_distributions(torch.rand(3))
    with pytest.raises(ValueError):
        prepare_distributions(torch.rand(3, 3), floor=0.0)
    assert prepare_distributions(torch.empty(0, 5)).shape == (0, 5)
