"""tokenmill's C++ CPU kernels (kernels/native.py) against the ATen path and the reference.

The VNNI GEMM must equal `cpu_ops.int8_dynamic_linear` bit for bit, not just closely: the
engine switches a running model from one to the other (engine/compilation.py), and batch
invariance and greedy outputs must not notice. These tests need a CPU with AVX-512 VNNI,
the kind this project's machines and CI have.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kernels
import kernels.native
from kernels import cpu_ops, reference
from tests.kernels.cases import example_budget

pytestmark = pytest.mark.skipif(
    not kernels.native.supported(), reason="the C++ kernels need AVX-512 VNNI"
)


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    kernels.native.load()


def _case(m: int, n: int, k: int, seed: int, outliers: bool = False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    if outliers:
        x[0] = 0  # a zero row
        if m > 2:  # scale exactly 1 and every value a half: round-half-even decides each one
            x[1] = torch.randint(-254, 255, (k,), generator=gen) / 2
            x[1, 0] = 127
        x[-1, k // 2] = 1000.0  # one channel dominating a row
    qweight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen) * 0.02 + 1e-4
    return x, qweight, scale


@example_budget(cpu=60, cuda=60)
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 12).map(lambda b: 16 * b),  # every count of column tiles and tails
    k=st.integers(1, 70).map(lambda g: 4 * g),  # K with and without a 16-lane tail
    outliers=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_vnni_linear_equals_aten_path_bit_for_bit(m, n, k, outliers, seed):
    x, q, s = _case(m, n, k, seed, outliers)
    packed, comp = kernels.pack_int8_vnni(q)
    out = cpu_ops.int8_packed_linear(x, packed, comp, s)
    assert torch.equal(out, cpu_ops.int8_dynamic_linear(x, q, s))
    assert torch.equal(out, reference.int8_packed_linear(x, packed, comp, s))


def test_rows_do_not_depend_on_the_batch():
    x, q, s = _case(37, 96, 200, seed=1)
    packed, comp = kernels.pack_int8_vnni(q)
    full = cpu_ops.int8_packed_linear(x, packed, comp, s)
    for rows in (slice(0, 1), slice(3, 9), slice(20, 37)):
        assert torch.equal(cpu_ops.int8_packed_linear(x[rows], packed, comp, s), full[rows])


def test_non_contiguous_input():
    x, q, s = _case(8, 32, 64, seed=2)
    packed, comp = kernels.pack_int8_vnni(q)
    wide = torch.randn(8, 128)
    wide[:, ::2] = x
    out = cpu_ops.int8_packed_linear(wide[:, ::2], packed, comp, s)
    assert torch.equal(out, cpu_ops.int8_packed_linear(x, packed, comp, s))


def test_bad_inputs_raise_clear_errors():
    x, q, s = _case(2, 32, 64, seed=3)
    packed, comp = kernels.pack_int8_vnni(q)
    with pytest.raises(RuntimeError, match="float32"):
        cpu_ops.int8_packed_linear(x.bfloat16(), packed, comp, s)
    with pytest.raises(RuntimeError, match="columns"):
        cpu_ops.int8_packed_linear(x[:, :60], packed, comp, s)


def test_compiles_through_torch_compile():
    x, q, s = _case(5, 48, 64, seed=4)
    packed, comp = kernels.pack_int8_vnni(q)

    def block(x):
        return torch.relu(cpu_ops.int8_packed_linear(x * 2, packed, comp, s)) + 1

    compiled = torch.compile(block, fullgraph=True)
    assert torch.equal(compiled(x), block(x))
