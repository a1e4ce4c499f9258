"""The C dropout-mask kernel (timemae_dist/kernels/cpu_dropout.py): built for real with the
system compiler into a temporary cache, checked for distribution, independence, determinism
under torch's RNG, the ``TIMEMAE_CPU_DROPOUT`` switch and the no-compiler fallback/error."""

from __future__ import annotations

import math

import pytest
import torch

from timemae_dist.kernels import cpu_dropout
from timemae_dist.model.layers import dropout, keep_mask, keep_threshold


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setenv("TIMEMAE_CPU_DROPOUT", "on")
    assert cpu_dropout.available()
    return cpu_dropout


def test_kernel_is_used_and_deterministic_under_torch_seed(kernel, monkeypatch):
    x = torch.empty(1152, 64)
    torch.manual_seed(3)
    a = keep_mask(x, 0.2)
    b = keep_mask(x, 0.2)
    torch.manual_seed(3)
    assert torch.equal(keep_mask(x, 0.2), a) and torch.equal(keep_mask(x, 0.2), b)
    assert not torch.equal(a, b)
    # the eager path draws a different stream from the same seed: proves the kernel ran
    monkeypatch.setenv("TIMEMAE_CPU_DROPOUT", "off")
    torch.manual_seed(3)
    assert not torch.equal(keep_mask(x, 0.2), a)
    # the kernel's state is torch's generator state: get_state/set_state replays the masks (resume)
    monkeypatch.setenv("TIMEMAE_CPU_DROPOUT", "on")
    state = torch.get_rng_state()
    c = keep_mask(x, 0.1)
    torch.set_rng_state(state)
    assert torch.equal(keep_mask(x, 0.1), c)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 4097])
def test_odd_sizes_fill_every_element(kernel, n):
    p = 0.5
    thr = keep_threshold(p)
    masks = torch.stack([keep_mask(torch.empty(n), p) for _ in range(400)])
    assert set(masks.unique().tolist()) <= {0.0, 2**15 / thr}
    # every position (tail ones included) is kept about half the time: none is stuck at a value
    kept = (masks > 0).double().mean(0)
    assert (kept - thr / 2**15).abs().max().item() < 5 * math.sqrt(0.25 / 400)


def test_independence_of_neighbours_and_of_calls(kernel):
    p = 0.3
    keep = keep_threshold(p) / 2**15
    torch.manual_seed(0)
    n = 1 << 20
    m1 = (keep_mask(torch.empty(n), p) > 0).double()
    m2 = (keep_mask(torch.empty(n), p) > 0).double()
    tol = 5 * math.sqrt(keep * (1 - keep) / n)
    for lag in (1, 3, 4, 5, 64):  # within a 64-bit draw (1, 3), across draws (4, 5, 64)
        joint = (m1[:-lag] * m1[lag:]).mean().item()
        assert abs(joint - keep * keep) < 2 * tol, (lag, joint, keep * keep)
    assert abs((m1 * m2).mean().item() - keep * keep) < 2 * tol  # two masks from successive seeds
    # the mask has no periodic structure over the counter (chi-square of kept counts in 256 bins)
    counts = m1.view(256, -1).sum(1)
    expected = n / 256 * keep
    chi2 = (((counts - expected) ** 2) / (expected * (1 - keep))).sum().item()
    assert chi2 < 256 + 5 * math.sqrt(2 * 256), chi2


def test_gradient_through_dropout_uses_the_same_mask(kernel):
    x = torch.randn(64, 64, requires_grad=True)
    torch.manual_seed(1)
    y = dropout(x, 0.2, True)
    y.sum().backward()
    torch.manual_seed(1)
    mask = keep_mask(x, 0.2)
    assert torch.equal(y, x.detach() * mask) and torch.equal(x.grad, mask)


def test_other_dtypes_take_the_eager_path(kernel, monkeypatch):
    torch.manual_seed(4)
    h = keep_mask(torch.empty(256, dtype=torch.bfloat16), 0.2)
    assert h.dtype == torch.bfloat16
    monkeypatch.setenv("TIMEMAE_CPU_DROPOUT", "sometimes")
    with pytest.raises(cpu_dropout.CpuDropoutError, match="TIMEMAE_CPU_DROPOUT"):
        keep_mask(torch.empty(8), 0.2)


def test_no_compiler_falls_back_or_fails_clearly(run_without_compiler):
    code = """
        import warnings, torch
        from timemae_dist.model.layers import keep_mask, keep_threshold
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            m = keep_mask(torch.empty(1000), 0.2)
        assert set(m.unique().tolist()) <= {0.0, float(torch.tensor(2**15 / keep_threshold(0.2)))}, m.unique()
        print("WARN", [str(x.message) for x in w])
    """
    auto = run_without_compiler(code, TIMEMAE_CPU_DROPOUT="auto")
    assert auto.returncode == 0, auto.stderr
    assert "using the eager dropout mask" in auto.stdout and "no C compiler" in auto.stdout
    on = run_without_compiler(code, TIMEMAE_CPU_DROPOUT="on")
    assert on.returncode != 0
    assert "TIMEMAE_CPU_DROPOUT=on" in on.stderr and "no C compiler" in on.stderr and "TIMEMAE_CPU_DROPOUT=off" in on.stderr
    assert not run_without_compiler.cache.exists() or not list(run_without_compiler.cache.glob("*.so"))


def test_build_is_atomic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TIMEMAE_CACHE_DIR", str(tmp_path))
    lib = cpu_dropout.build()
    assert lib.is_file() and lib.parent == tmp_path and lib.name.startswith("libtimemae_dropout-")
    mtime = lib.stat().st_mtime_ns
    assert cpu_dropout.build() == lib and lib.stat().st_mtime_ns == mtime  # built once
    assert [p.name for p in tmp_path.iterdir()] == [lib.name]  # no build directory left behind
