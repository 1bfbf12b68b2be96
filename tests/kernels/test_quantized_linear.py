"""Weight-only int8 and int4 matmuls: the CPU implementations against the reference, the
reference against float64 ground truth."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import kernels
from engine.linear import quantize_int4, quantize_int8
from kernels import cpu_ops, reference
from tests.kernels.cases import example_budget, relative_error


def _case(m: int, n: int, k: int, seed: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    qweight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = (torch.rand(n, generator=gen) * 0.02 + 1e-4).to(torch.bfloat16)
    return x, qweight, scale


def test_reference_matches_float64():
    x, q, s = _case(5, 48, 64, seed=0)
    exact = x.double() @ (q.double() * s.double()[:, None]).T
    out = reference.int8_linear(x, q, s)
    assert out.dtype == torch.float32
    assert relative_error(out, exact) < 1e-6


@example_budget(cpu=25, cuda=25)
@given(
    m=st.integers(1, 40),
    n=st.sampled_from([8, 48, 96]),
    k=st.sampled_from([16, 64, 160]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_cpu_int8_linear_matches_reference(m, n, k, dtype, seed):
    x, q, s = _case(m, n, k, seed, dtype)
    out = cpu_ops.int8_linear(x, q, s)
    assert out.dtype == dtype and out.shape == (m, n)
    # The kernel rounds activations (and, for bf16 inputs, its output) to bfloat16.
    assert relative_error(out, reference.int8_linear(x, q, s)) < 1e-2


def test_dispatcher_uses_the_cpu_kernel_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_ops, "int8_linear", lambda *a: calls.append(a) or a[0])
    x, q, s = _case(2, 8, 16, seed=1)
    kernels.int8_linear(x, q, s)
    assert len(calls) == 1


@example_budget(cpu=30, cuda=30)
@given(n=st.integers(1, 12), k=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_quantize_int8_error_is_at_most_half_a_step(n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)
    w[0] = 0.0  # an all-zero row must not divide by zero
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16
    assert int(q.abs().max()) <= 127
    err = (q.float() * s.float()[:, None] - w).abs()
    assert bool((err <= s.float()[:, None] / 2 + 1e-7).all())
    assert bool((q[0] == 0).all())


def _int4_case(m: int, n: int, k: int, group: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = torch.rand(k // group, n, generator=gen) * 0.02 + 1e-4
    zeros = torch.randn(k // group, n, generator=gen) * 0.05
    return x, q, torch.stack([scales, zeros], dim=-1).to(torch.bfloat16)


def test_int4_reference_matches_float64():
    x, q, sz = _int4_case(3, 32, 64, 32, seed=0)
    scale = sz[..., 0].double().t().repeat_interleave(32, dim=1)
    zero = sz[..., 1].double().t().repeat_interleave(32, dim=1)
    exact = x.double() @ ((q.double() - 8) * scale + zero).T
    out = reference.int4_linear(x, reference.pack_int4(q), sz, 32)
    assert relative_error(out, exact) < 1e-6


@example_budget(cpu=25, cuda=25)
@given(
    m=st.integers(1, 40),
    n=st.sampled_from([16, 48, 96]),
    k=st.sampled_from([32, 64, 160]),
    seed=st.integers(0, 2**16),
)
def test_cpu_int4_linear_matches_reference(m, n, k, seed):
    x, q, sz = _int4_case(m, n, k, 32, seed)
    out = cpu_ops.int4_linear(x, cpu_ops.pack_int4(q), sz, 32)
    assert out.dtype == x.dtype and out.shape == (m, n)
    expected = reference.int4_linear(x, reference.pack_int4(q), sz, 32)
    assert relative_error(out, expected) < 1e-2


@example_budget(cpu=30, cuda=30)
@given(n=st.integers(1, 6), groups=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_quantize_int4_round_trip(n, groups, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, 32 * groups, generator=gen) * torch.rand(n, 1, generator=gen)
    w[0, :32] = 0.5  # a constant group must not divide by zero
    q, sz = quantize_int4(w)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    assert sz.shape == (groups, n, 2) and sz.dtype == torch.bfloat16
    back = reference.dequantize_int4(q, sz, 32)
    step = sz[..., 0].float().t().repeat_interleave(32, dim=1)
    # Half a step, plus the bfloat16 rounding of the group's zero point.
    slack = sz[..., 1].float().abs().t().repeat_interleave(32, dim=1) * 2**-8
    assert bool(((back - w).abs() <= step / 2 + slack + 1e-6).all())


def test_quantize_int4_recovers_q4_1_groups():
    """A group that already is Q4_1 data spanning all 16 codes comes back exactly."""
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (16, 64), generator=gen)
    codes[:, 0], codes[:, 1], codes[:, 32], codes[:, 33] = 0, 15, 0, 15
    d, m = 0.0078125, -0.0625  # exactly representable in bfloat16
    w = codes.float() * d + m
    q, sz = quantize_int4(w)
    torch.testing.assert_close(reference.dequantize_int4(q, sz, 32), w, atol=0, rtol=0)


def test_dynamic_reference_matches_float64_on_the_rounded_rows():
    x, q, s = _case(6, 48, 64, seed=5)
    x[2] = 0.0  # an all-zero row
    xq, x_scale = reference.quantize_rows_int8(x)
    assert bool((xq[2] == 0).all()) and 0 < float(x_scale[2]) < 1e-30
    exact = (xq.double() * x_scale.double()[:, None]) @ (q.double() * s.double()[:, None]).T
    assert relative_error(reference.int8_dynamic_linear(x, q, s), exact) < 1e-6
    # Rounding the activations to int8 costs about a percent, no more.
    dynamic = reference.int8_dynamic_linear(x, q, s)
    assert relative_error(dynamic, reference.int8_linear(x, q, s)) < 2e-2


@example_budget(cpu=25, cuda=25)
@given(
    m=st.integers(1, 40),
    n=st.sampled_from([8, 48, 96]),
    k=st.sampled_from([16, 64, 160]),
    seed=st.integers(0, 2**16),
)
def test_cpu_int8_dynamic_linear_matches_reference(m, n, k, seed):
    x, q, s = _case(m, n, k, seed)
    out = cpu_ops.int8_dynamic_linear(x, q, s)
    assert out.dtype == x.dtype and out.shape == (m, n)
    limit = kernels.native.int8_activation_limit(kernels.native.target())
    want = reference.int8_dynamic_linear(x, q, s, limit)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
