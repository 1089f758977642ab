"""The guarded Triton path (uce_kernels/_guard.py, uce_kernels/sym_kl_check.py) and the torch path as the CUDA fallback.

backend="auto" runs Triton only on CUDA tensors; here ``_dispatch.auto_backend`` is replaced so that "auto" picks
Triton for CPU tensors, where the kernel runs under the interpreter (TRITON_INTERPRET=1, conftest.py), fails to
launch (no interpreter, no GPU: a subprocess), or is replaced by test doubles. The oracle is float64 maths.
"""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from concept_express.uce_kernels import (
    _dispatch,
    _guard,
    prepare_distributions,
    sym_kl_check,
    sym_kl_first_neighbours,
    sym_kl_search,
)

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_guard():
    _guard.reset()
    yield
    _guard.reset()


@pytest.fixture
def auto_picks_triton(monkeypatch):
    monkeypatch.setattr(_dispatch, "auto_backend", lambda tensor: "triton")


def oracle(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """d(a_i, b_j) from the definition, 1/2 sum (p - q)(log p - log q), in float64."""
    a = a.astype(np.float64)
    b = a if b is None else b.astype(np.float64)
    return 0.5 * ((a[:, None, :] - b[None, :, :]) * (np.log(a)[:, None, :] - np.log(b)[None, :, :])).sum(-1)


def nearest_and_gap(d: np.ndarray, exclude_self: bool):
    d = d.copy()
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    two = np.sort(d, axis=1)[:, :2]
    return d.argmin(axis=1), (two[:, 1] - two[:, 0]) / two[:, 0]


def rows_with_neighbours(n=96, d=40, seed=0) -> torch.Tensor:
    """Pairs of close rows, shuffled: clear first neighbours (a problem other than the check's own)."""
    g = torch.Generator().manual_seed(seed)
    base = 1.5 * torch.randn(n // 2, d, generator=g)
    rows = torch.cat([base, base + 0.1 * torch.randn(n // 2, d, generator=g)])
    return rows[torch.randperm(n, generator=g)].softmax(dim=1)


# ------------------------------------------------------------------------------------------------ the check problem
@pytest.mark.parametrize("queries", [False, True])
def test_check_problem_has_clear_answers_that_the_torch_path_finds(queries):
    rows, qs = sym_kl_check.check_problem()
    assert torch.equal(prepare_distributions(rows), rows) and torch.equal(prepare_distributions(qs), qs)
    assert all(s % 16 == 0 for s in (*rows.shape, qs.shape[0]))  # the specialisation a latent grid's n compiles
    d = oracle(qs.numpy(), rows.numpy()) if queries else oracle(rows.numpy())
    truth, gap = nearest_and_gap(d, exclude_self=not queries)
    assert gap.min() > 0.1  # every answer wins by 10 %: TF32's ~1e-3 cannot flip one
    kappa, dist, labels = sym_kl_check.expected(queries)
    assert np.array_equal(kappa.numpy(), truth)
    np.testing.assert_allclose(dist.numpy(), d[np.arange(len(truth)), truth], rtol=1e-5)
    if not queries:  # FINCH finds the chains of three rows the problem was built from
        assert labels.max() + 1 == sym_kl_check.CLUSTERS and (torch.bincount(labels) == 3).all()


# ------------------------------------------------------------------------------------------- auto mode, guarded
def test_a_kernel_that_passes_its_check_is_used_and_checked_once(auto_picks_triton, monkeypatch):
    from concept_express.uce_kernels import sym_kl_triton

    calls = []
    real = sym_kl_triton.first_neighbours_triton
    monkeypatch.setattr(sym_kl_triton, "first_neighbours_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = rows_with_neighbours()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kappa, _ = sym_kl_first_neighbours(x)
        sym_kl_first_neighbours(x)
    assert np.array_equal(kappa.numpy(), nearest_and_gap(oracle(x.numpy()), True)[0])
    assert len(calls) == 3  # the check, then both calls
    assert [(c["ok"], c["variant"]) for c in _guard.checks()] == [(True, "ieee, self")]
    sym_kl_first_neighbours(x[:10], x)  # the other compiled form is checked on its own first use
    assert [c["variant"] for c in _guard.checks()] == ["ieee, self", "ieee, queries"]


def wrong_in_the_last_tile(*args, **kwargs):
    """A plausible kernel bug: the right answer except in the rows of a ragged last tile, which get their row index
    plus one (as if the tile's row offset were off by one)."""
    a = args[0]
    kappa = sym_kl_search.first_neighbours_blocked(*args)
    last = torch.arange(a.shape[0] - a.shape[0] % 64, a.shape[0])
    kappa[last] = (last + 1) % kappa.shape[0]
    return kappa


def test_a_kernel_returning_wrong_indices_is_caught_and_the_torch_answer_given(auto_picks_triton, monkeypatch):
    from concept_express.uce_kernels import sym_kl_triton

    calls = []
    monkeypatch.setattr(
        sym_kl_triton, "first_neighbours_triton", lambda *a, **k: calls.append(1) or wrong_in_the_last_tile(*a)
    )
    monkeypatch.setattr(sym_kl_search, "CPU_ENGINE", "torch")  # the torch path as a CUDA tensor runs it
    x = rows_with_neighbours()
    with pytest.warns(RuntimeWarning, match="failed its self-check") as caught:
        kappa, dist = sym_kl_first_neighbours(x)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "first neighbours differ from the torch path" in message and _guard.ISSUES_URL in message
    want_kappa, want_dist = sym_kl_first_neighbours(x, backend="torch")
    assert torch.equal(kappa, want_kappa) and torch.equal(dist, want_dist)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused once: no second warning, no second check, no kernel call
        assert torch.equal(sym_kl_first_neighbours(x)[0], want_kappa)
        sym_kl_first_neighbours(x, precision="tf32")
    assert len(calls) == 1 and len(_guard.checks()) == 1 and _guard.refused(CPU) == message
    # Explicit backend="triton" is not guarded: it runs the (wrong) kernel, for benchmarks and tests.
    assert not torch.equal(sym_kl_first_neighbours(x, backend="triton")[0], want_kappa)


@pytest.mark.parametrize("fault", ["out of range", "not excluding self"])
def test_check_catches_indices_that_cannot_be_right(auto_picks_triton, monkeypatch, fault):
    from concept_express.uce_kernels import sym_kl_triton

    def double(a, *rest, **kw):
        if fault == "out of range":
            return torch.full((a.shape[0],), 2**31 - 1)
        return torch.arange(a.shape[0])

    monkeypatch.setattr(sym_kl_triton, "first_neighbours_triton", double)
    x = rows_with_neighbours()
    with pytest.warns(RuntimeWarning, match="outside" if fault == "out of range" else "differ"):
        kappa, _ = sym_kl_first_neighbours(x)
    assert torch.equal(kappa, sym_kl_first_neighbours(x, backend="torch")[0])


def test_an_error_after_a_passed_check_falls_back_too(auto_picks_triton, monkeypatch):
    """A launch that fails later (another size compiles another specialisation) also hands the device to torch."""
    from concept_express.uce_kernels import sym_kl_triton

    real = sym_kl_triton.first_neighbours_triton

    def fails_on_other_sizes(a, *rest, **kw):
        if a.shape[0] != 3 * sym_kl_check.CLUSTERS:
            raise ValueError("simulated compile error for this specialisation")
        return real(a, *rest, **kw)

    monkeypatch.setattr(sym_kl_triton, "first_neighbours_triton", fails_on_other_sizes)
    x = rows_with_neighbours()
    with pytest.warns(RuntimeWarning, match="ValueError: simulated compile error") as caught:
        kappa, _ = sym_kl_first_neighbours(x)
    assert "sym_kl_first_neighbours (ieee, self) failed on cpu" in str(caught[0].message)
    assert _guard.checks()[0]["ok"]
    assert torch.equal(kappa, sym_kl_first_neighbours(x, backend="torch")[0])
    with pytest.raises(ValueError):
        sym_kl_first_neighbours(x, backend="triton")


def test_out_of_memory_is_not_the_kernels_fault(auto_picks_triton, monkeypatch):
    from concept_express.uce_kernels import sym_kl_triton

    def oom(*a, **k):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(sym_kl_triton, "first_neighbours_triton", oom)
    with pytest.raises(torch.OutOfMemoryError):
        sym_kl_first_neighbours(rows_with_neighbours())
    assert _guard.refused(CPU) is None


def test_verdicts_are_per_device():
    def fails():
        raise RuntimeError("no kernel image for this GPU")

    first, second = torch.device("cuda", 0), torch.device("cuda", 1)  # device objects only: nothing runs on them
    with pytest.warns(RuntimeWarning, match="no kernel image"):
        assert _guard.run_guarded("k", "v", first, fails, lambda: "triton") is None
    assert _guard.run_guarded("k", "v", second, lambda: None, lambda: "triton") == "triton"
    assert _guard.run_guarded("other kernel", "v", first, lambda: None, lambda: "triton") is None  # device refused
    assert [c["ok"] for c in _guard.checks()] == [False, True]


def test_without_interpreter_or_gpu_auto_falls_back_and_warns_once():
    """Triton cannot launch at all (TRITON_INTERPRET=0 and no GPU): the real error, caught by the check."""
    code = """
import json, warnings, torch
from concept_express.uce_kernels import _dispatch, _guard, sym_kl_first_neighbours
_dispatch.auto_backend = lambda tensor: "triton"
x = torch.rand(200, 48)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first = sym_kl_first_neighbours(x)
    second = sym_kl_first_neighbours(x)
want = sym_kl_first_neighbours(x, backend="torch")
try:
    sym_kl_first_neighbours(x, backend="triton")
    explicit = "no error"
except Exception as error:
    explicit = type(error).__name__
print(json.dumps({
    "same": all(torch.equal(r[0], want[0]) and torch.equal(r[1], want[1]) for r in (first, second)),
    "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
    "checks": _guard.checks(), "explicit": explicit,
}))
"""
    env = dict(os.environ, TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["same"]
    assert len(result["warnings"]) == 1 and "failed its self-check" in result["warnings"][0]
    assert [c["ok"] for c in result["checks"]] == [False]
    assert result["explicit"] != "no error"
