"""tokenmill's C++ CPU kernels (kernels/native.py) against the ATen path and the references.

Every test runs once per kernel target this CPU can run (`kernels.native.runnable_isas`:
AVX-512 VNNI, AVX2, portable C++), so an AVX-512 machine tests all three and an AVX2 one
two; none is skipped for want of an instruction set.

The int8 GEMM must equal `cpu_ops.int8_dynamic_linear` bit for bit, not just closely, on
every target: the engine switches a running model from one to the other
(engine/compilation.py), and batch invariance and greedy outputs must not notice.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kernels
import kernels.native
from kernels import cpu_ops, reference
from tests.kernels.cases import (
    build,
    example_budget,
    make_paged_batch,
    paged_shapes,
    reference_decode,
    reference_prefill,
    relative_error,
)


@pytest.fixture(scope="module", autouse=True, params=kernels.native.runnable_isas())
def isa(request) -> str:
    """The kernel target under test, loaded and made the one `kernels.native` calls."""
    kernels.native.load(request.param)
    yield request.param
    kernels.native.load()  # back to the process's own target for the tests that follow


def _case(m: int, n: int, k: int, seed: int, outliers: bool = False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    if outliers:
        x[0] = 0  # a zero row
        if m > 2:  # scale exactly 1 and every value a half: round-half-even decides each one
            x[1] = torch.randint(-254, 255, (k,), generator=gen) / 2
            x[1, 0] = 127
        x[-1, k // 2] = 1000.0  # one channel dominating a row
    low, high = kernels.native.int8_weight_range(kernels.native.target())
    qweight = torch.randint(low, high + 1, (n, k), generator=gen, dtype=torch.int8)
    if outliers:  # the most negative code too, and products of the largest magnitude
        qweight[0, : k // 2] = low
        qweight[-1, ::2] = high
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
    limit = kernels.native.int8_activation_limit(kernels.native.target())
    assert torch.equal(out, reference.int8_packed_linear(x, packed, comp, s, limit))


@example_budget(cpu=40, cuda=40)
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 8).map(lambda b: 32 * b),  # gate and up: every count of column tiles
    k=st.integers(1, 70).map(lambda g: 4 * g),
    outliers=st.booleans(),
    scaled=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_swiglu_gemm_equals_the_linear_then_silu_and_mul_bit_for_bit(
    m, n, k, outliers, scaled, seed
):
    """The decode stack and the prefill layers take SwiGLU in the gate_up GEMM's epilogue:
    every value as the two passes it replaces would round it."""
    x, q, s = _case(m, n, k, seed, outliers)
    x = x * 4  # gates past silu's linear range on both sides
    packed, comp = kernels.pack_int8_vnni(q)
    gen = torch.Generator().manual_seed(seed)
    input_scale = torch.rand(n // 2, generator=gen) + 0.5 if scaled else None
    fused = kernels.native.int8_packed_swiglu(x, packed, comp, s, input_scale)
    gate_up = kernels.native.int8_packed_linear(x, packed, comp, s)
    assert torch.equal(fused, kernels.native.silu_and_mul(gate_up, input_scale))


@pytest.mark.parametrize("k", [64, 68])  # K % 8 == 4 takes the AVX2 GEMM's four-k tail
def test_the_largest_products_are_exact(k):
    """Rows of the extreme activation codes against the target's extreme weights: on AVX2,
    two vpmaddubsw pair sums added in 16 bits reach 4 x 127 x 64, 255 short of saturating."""
    low, high = kernels.native.int8_weight_range(kernels.native.target())
    limit = kernels.native.int8_activation_limit(kernels.native.target())
    x = torch.full((3, k), float(limit))  # row scale 1: every code is the limit
    x[1] = -float(limit)
    x[2, ::2] = -float(limit)
    q = torch.full((32, k), high, dtype=torch.int8)
    q[16:] = low
    s = torch.ones(32)
    out = cpu_ops.int8_packed_linear(x, *kernels.pack_int8_vnni(q), s)
    assert torch.equal(out, cpu_ops.int8_dynamic_linear(x, q, s))
    assert out[0, 0] == limit * high * k and out[0, 16] == limit * low * k
    assert out[1, 0] == -limit * high * k and bool((out[2] == 0).all())


def test_packing_refuses_codes_the_target_would_saturate():
    low, high = kernels.native.int8_weight_range(kernels.native.target())
    kernels.pack_int8_vnni(torch.tensor([[low, high, 0, 0]] * 16, dtype=torch.int8))
    if (low, high) != (-128, 127):  # outside the range only where int8 has codes beyond it
        for code in (low - 1, high + 1):
            with pytest.raises(ValueError, match=rf"\[{low}, {high}\]"):
                kernels.pack_int8_vnni(torch.full((16, 4), code, dtype=torch.int8))


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


def _with_cache_dtype(batch, cache_dtype: torch.dtype):
    batch.k_cache = batch.k_cache.to(cache_dtype)
    batch.v_cache = batch.v_cache.to(cache_dtype)
    return batch


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@example_budget(cpu=60, cuda=60)
@given(shape=paged_shapes(decode=True), head_dim=st.sampled_from([16, 32, 64, 128]))
def test_decode_attention_matches_reference(cache_dtype, shape, head_dim):
    """Table padding holds out-of-range ids (make_paged_batch): only blocks inside a context
    may be read. The queries stay float32 whatever the cache holds."""
    batch = _with_cache_dtype(
        build("cpu", torch.float32, {**shape, "head_dim": head_dim}), cache_dtype
    )
    out = kernels.native.paged_decode_attention(*batch.decode_args())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert relative_error(out, reference_decode(batch)) < 2e-6


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@example_budget(cpu=60, cuda=60)
@given(shape=paged_shapes(decode=False), head_dim=st.sampled_from([16, 64, 128]))
def test_prefill_attention_matches_reference(cache_dtype, shape, head_dim):
    """Fresh prompts, chunks after a prefix hit and decode rows in one call (paged_shapes)."""
    batch = _with_cache_dtype(
        build("cpu", torch.float32, {**shape, "head_dim": head_dim}), cache_dtype
    )
    out = kernels.native.paged_prefill_attention(*batch.prefill_args())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert relative_error(out, reference_prefill(batch)) < 2e-6


def test_prefill_attention_rows_equal_decode_steps():
    """A prompt's token computes the bits the decode kernel gives it at that position, so
    it does not matter whether it was prefilled, chunked or decoded."""
    batch = make_paged_batch([37, 70], [37, 20], 6, 2, 64, 16, torch.bfloat16, "cpu")
    batch.q = batch.q.float()
    out = kernels.native.paged_prefill_attention(*batch.prefill_args())
    for row, (seq, pos) in enumerate(
        [(0, p) for p in range(37)] + [(1, 50 + p) for p in range(20)]
    ):
        one = kernels.native.paged_decode_attention(
            batch.q[row : row + 1], batch.k_cache, batch.v_cache,
            batch.block_tables[seq : seq + 1], torch.tensor([pos + 1], dtype=torch.int32),
            batch.scale,
        )  # fmt: skip
        assert torch.equal(out[row], one[0])


@pytest.mark.parametrize("group", [5, 6, 7, 8])
def test_each_head_of_a_group_gets_the_bits_it_gets_alone(group):
    """A group of more than four query heads per KV head runs in passes of at most four; a
    head's sums are its own, so its output must not depend on the group it came in."""
    batch = make_paged_batch([37, 70], [1, 1], group, 1, 64, 16, torch.bfloat16, "cpu")
    batch.q = batch.q.float()
    out = kernels.native.paged_decode_attention(*batch.decode_args())
    for head in range(group):
        alone = kernels.native.paged_decode_attention(
            batch.q[:, head : head + 1].contiguous(), *batch.decode_args()[1:]
        )
        assert torch.equal(out[:, head], alone[:, 0])


def test_prefill_attention_rejects_inconsistent_queries():
    batch = make_paged_batch([20, 5], [4, 2], 4, 2, 64, 16, torch.float32, "cpu")
    args = list(batch.prefill_args())
    args[4] = torch.tensor([0, 4, 5], dtype=torch.int32)  # 5 rows, q has 6
    with pytest.raises(RuntimeError, match="span"):
        kernels.native.paged_prefill_attention(*args)
    args[4] = torch.tensor([0, 0, 6], dtype=torch.int32)  # 6 queries for a context of 5
    with pytest.raises(RuntimeError, match="more queries than context"):
        kernels.native.paged_prefill_attention(*args)


def test_decode_attention_edge_cases():
    # empty contexts give zeros; long contexts with scores far apart stay exact
    batch = make_paged_batch([0, 1, 700, 16], [1] * 4, 8, 2, 64, 16, torch.float32, "cpu")
    batch.q[2] *= 30
    out = kernels.native.paged_decode_attention(*batch.decode_args())
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert relative_error(out, reference_decode(batch)) < 2e-6
    # every slot past a context is poisoned: never read
    rows = batch.block_tables[1, 0]
    batch.k_cache[rows, 1:] = float("nan")
    batch.v_cache[rows, 1:] = float("nan")
    assert torch.isfinite(kernels.native.paged_decode_attention(*batch.decode_args())[1]).all()


def test_decode_attention_rejects_bad_tables_and_shapes():
    batch = make_paged_batch([20, 5], [1, 1], 4, 2, 64, 16, torch.float32, "cpu")
    args = list(batch.decode_args())
    args[3] = batch.block_tables.clone()
    args[3][0, 1] = batch.k_cache.shape[0]  # a block inside the context, outside the pool
    with pytest.raises(RuntimeError, match="outside the pool"):
        kernels.native.paged_decode_attention(*args)
    odd = make_paged_batch([20, 5], [1, 1], 4, 2, 64, 12, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="power of two"):  # slots come from shifts
        kernels.native.paged_decode_attention(*odd.decode_args())
    with pytest.raises(RuntimeError, match="head_dim"):
        kernels.native.paged_decode_attention(
            batch.q[..., :40],
            batch.k_cache[..., :40].contiguous(),
            batch.v_cache[..., :40].contiguous(),
            *batch.decode_args()[3:],
        )


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_store_kv_equals_the_reference_bit_for_bit(cache_dtype):
    gen = torch.Generator().manual_seed(0)
    key, value = torch.randn(6, 2, 32, generator=gen), torch.randn(6, 2, 32, generator=gen)
    value[0, 0, 0] = float("nan")
    value[1, 0, :4] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(2**-130), 3.0e38])  # ties, tiny
    full = value[:, :, ::2].repeat_interleave(2, dim=2)  # and a non-contiguous input
    for k, v in ((key, value), (key, full)):
        for slots in (torch.tensor([3, 17, 0, 9, 60, 1]), torch.tensor([5, -1, 30, -1, 2, 63])):
            caches = [torch.zeros(8, 8, 2, 32, dtype=cache_dtype) for _ in range(4)]
            kernels.native.store_kv(k, v, caches[0], caches[1], slots)
            reference.store_kv(k, v, caches[2], caches[3], slots)
            assert torch.equal(caches[0], caches[2])
            assert torch.equal(caches[1].isnan(), caches[3].isnan())
            assert torch.equal(caches[1].nan_to_num(), caches[3].nan_to_num())


def test_store_kv_rejects_slots_outside_the_cache():
    caches = [torch.zeros(2, 4, 1, 16) for _ in range(2)]
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernels.native.store_kv(
            torch.randn(1, 1, 16), torch.randn(1, 1, 16), *caches, torch.tensor([8])
        )


def _decode_stack_case(
    layers: int, rows: int, heads: int, kv_heads: int, head_dim: int, seed: int,
    bias: bool, qk_norm: bool, smooth: bool,
):  # fmt: skip
    """Random operands of `decode_layers`, each layer's by slot name, and a paged batch whose
    sequences end on their new token's slot."""
    gen = torch.Generator().manual_seed(seed)
    hidden, inter = 48, 80

    def positive(n: int) -> torch.Tensor:
        return torch.rand(n, generator=gen) + 0.5

    def linear(name: str, n: int, k: int) -> dict:
        low, high = kernels.native.int8_weight_range(kernels.native.target())
        w = torch.randint(low, high + 1, (n, k), generator=gen, dtype=torch.int8)
        packed, comp = reference.pack_int8_vnni(w)
        return {
            f"{name}_packed": packed,
            f"{name}_comp": comp,
            f"{name}_scale": torch.rand(n, generator=gen) * 0.04 / k**0.5 + 1e-4,
            f"{name}_input_scale": positive(k) if smooth else None,
        }

    qkv = (heads + 2 * kv_heads) * head_dim
    weights = []
    for _ in range(layers):
        layer = {"input_norm": positive(hidden), **linear("qkv", qkv, hidden)}
        layer["qkv_bias"] = torch.randn(qkv, generator=gen) if bias else None
        layer["q_norm"] = layer["k_norm"] = positive(head_dim) if qk_norm else None
        layer |= {**linear("o", hidden, heads * head_dim), "post_norm": positive(hidden)}
        layer |= {**linear("gate_up", 2 * inter, hidden), **linear("down", hidden, inter)}
        weights.append(layer)
    batch = make_paged_batch(
        [int(n) for n in torch.randint(1, 70, (rows,), generator=gen)],
        [1] * rows, heads, kv_heads, head_dim, 16, torch.float32, "cpu", seed=seed,
    )  # fmt: skip
    lens = batch.context_lens
    last = (lens.long() - 1).clamp(min=0)
    blocks = batch.block_tables.gather(1, (last // 16)[:, None])[:, 0]
    slots = blocks.long() * 16 + last % 16
    x = torch.randn(rows, hidden, generator=gen)
    residual = torch.randn(rows, hidden, generator=gen)
    rope = reference.build_rope_cache(head_dim, 128, 10000.0)
    caches = [(batch.k_cache.clone(), batch.v_cache.clone()) for _ in range(layers)]
    args = (x, residual, last, rope, batch.block_tables, lens, slots, weights)
    return args, caches, heads, head_dim**-0.5


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@example_budget(cpu=25, cuda=25)
@given(
    rows=st.integers(1, 20),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 3, 8]),
    head_dim=st.sampled_from([16, 64, 128]),
    bias=st.booleans(),
    qk_norm=st.booleans(),
    smooth=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_decode_stack_matches_reference(
    cache_dtype, rows, kv_heads, group, head_dim, bias, qk_norm, smooth, seed
):
    """Llama, Qwen2 (bias) and Qwen3 (q/k norms) layers, with and without SmoothQuant input
    scales. Both sides run the same bit-exact GEMM; the norms, rotary and activation differ
    in float rounding, which can move an activation across an int8 rounding boundary."""
    args, caches, heads, scale = _decode_stack_case(
        2, rows, kv_heads * group, kv_heads, head_dim, seed, bias, qk_norm, smooth
    )
    caches = [(k.to(cache_dtype), v.to(cache_dtype)) for k, v in caches]
    native_caches = [(k.clone(), v.clone()) for k, v in caches]
    limit = kernels.native.int8_activation_limit(kernels.native.target())
    expected = reference.decode_layers(
        *args, [k for k, _ in caches], [v for _, v in caches], heads, 1e-5, scale, limit
    )
    out = kernels.native.decode_layers(
        *args, [k for k, _ in native_caches], [v for _, v in native_caches], heads, 1e-5, scale
    )
    # One activation rounded to the other int8 code moves an output by ~2e-3, one K/V value
    # rounded to the other bfloat16 by ~4e-3; a case can hold a few such flips. A wrong
    # kernel (a misplaced row, head or slot) is off by order 1.
    tolerance = 1e-2
    for got, want in zip(out, expected, strict=True):
        assert relative_error(got, want) < tolerance
    for (k, v), (nk, nv) in zip(caches, native_caches, strict=True):
        assert relative_error(nk, k) < 1e-3 and relative_error(nv, v) < 1e-3


def test_decode_stack_rejects_bad_inputs():
    args, caches, heads, scale = _decode_stack_case(1, 3, 2, 1, 16, 0, False, False, False)
    k_caches, v_caches = [caches[0][0]], [caches[0][1]]
    args = (*args[:-1], kernels.native.decode_layer_weights(args[-1]))
    with pytest.raises(RuntimeError, match="weights"):
        kernels.native.decode_layers(
            *args[:-1], args[-1][:-1], k_caches, v_caches, heads, 1e-5, scale
        )
    positions = args[2].clone()
    positions[1] = 128  # past the rotary table
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.native.decode_layers(
            *args[:2], positions, *args[3:], k_caches, v_caches, heads, 1e-5, scale
        )
    weights = list(args[-1])
    weights[kernels.native.decode_layer_slots().index("down_input_scale")] = torch.ones(7)
    with pytest.raises(RuntimeError, match="float32 tensor of 80 values"):  # the MLP's width
        kernels.native.decode_layers(*args[:-1], weights, k_caches, v_caches, heads, 1e-5, scale)


def test_decode_layer_weights_are_laid_out_by_the_cpp_slot_names():
    slots = kernels.native.decode_layer_slots()
    assert len(slots) == len(set(slots))
    # layer i's operand in slot j holds i * 100 + j; the first layer's names come reversed
    layers = [
        {name: torch.tensor([float(i * 100 + slots.index(name))]) for name in order}
        for i, order in enumerate([slots[::-1], slots])
    ]
    flat = kernels.native.decode_layer_weights(layers)
    assert [float(t) for t in flat] == [
        float(i * 100 + j) for i in range(2) for j in range(len(slots))
    ]
    del layers[1]["q_norm"]
    with pytest.raises(ValueError, match="q_norm"):
        kernels.native.decode_layer_weights(layers)


@example_budget(cpu=40, cuda=40)
@given(rows=st.integers(1, 40), hidden=st.integers(1, 100), seed=st.integers(0, 2**16))
def test_add_rms_norm_matches_reference(rows, hidden, seed):
    gen = torch.Generator().manual_seed(seed)
    x, residual = torch.randn(rows, hidden, generator=gen), torch.randn(rows, hidden, generator=gen)
    weight = torch.randn(hidden, generator=gen)
    out, total = kernels.native.add_rms_norm(x, residual, weight, None, 1e-6)
    want, want_total = reference.rms_norm(x, weight, 1e-6, residual)
    assert torch.equal(total, want_total)  # one float add each
    assert relative_error(out, want) < 1e-6
    # an input scale rounds as the separate multiply it replaces
    scale = torch.rand(hidden, generator=gen) + 0.5
    assert torch.equal(
        kernels.native.add_rms_norm(x, residual, weight, scale, 1e-6)[0], out * scale
    )
    # a row's result does not depend on the rows around it
    assert torch.equal(
        kernels.native.add_rms_norm(x[-1:], residual[-1:], weight, None, 1e-6)[0], out[-1:]
    )


@example_budget(cpu=40, cuda=40)
@given(
    rows=st.integers(1, 12),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 4),
    head_dim=st.sampled_from([2, 16, 64, 128]),
    qk_norm=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rotary_heads_match_reference(rows, kv_heads, group, head_dim, qk_norm, seed):
    gen = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=gen)
    norms = [torch.rand(head_dim, generator=gen) + 0.5 for _ in range(2)] if qk_norm else [None] * 2
    positions = torch.randint(0, 64, (rows,), generator=gen)
    rope = reference.build_rope_cache(head_dim, 64, 10000.0)
    q, k, v = kernels.native.rotary_heads(qkv, *norms, positions, rope, heads, kv_heads, 1e-6)
    wq, wk, wv = qkv.view(rows, -1, head_dim).split([heads, kv_heads, kv_heads], dim=1)
    if qk_norm:
        wq, wk = reference.rms_norm(wq, norms[0], 1e-6), reference.rms_norm(wk, norms[1], 1e-6)
    wq, wk = reference.apply_rotary(wq, wk, positions, rope)
    assert torch.equal(v, wv)
    assert relative_error(q, wq) < 1e-6 and relative_error(k, wk) < 1e-6


@example_budget(cpu=40, cuda=40)
@given(rows=st.integers(1, 40), n=st.integers(1, 100), seed=st.integers(0, 2**16))
def test_silu_and_mul_matches_reference(rows, n, seed):
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(rows, 2 * n, generator=gen) * 8
    gate_up[0, 0] = -100.0  # exp(-g) far past float32's range
    gate_up[-1, 0] = 100.0
    out = kernels.native.silu_and_mul(gate_up)
    want = reference.silu_and_mul(gate_up)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, want, rtol=1e-6, atol=1e-30)
    scale = torch.rand(n, generator=gen) + 0.5
    assert torch.equal(kernels.native.silu_and_mul(gate_up, scale), out * scale)


def test_layer_ops_reject_bad_inputs():
    rope = reference.build_rope_cache(16, 8, 10000.0)
    qkv = torch.randn(2, 4 * 16)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.native.rotary_heads(qkv, None, None, torch.tensor([0, 8]), rope, 2, 1, 1e-6)
    with pytest.raises(RuntimeError, match="split into"):
        kernels.native.rotary_heads(qkv, None, None, torch.tensor([0, 1]), rope, 3, 1, 1e-6)
    with pytest.raises(RuntimeError, match="alike"):
        kernels.native.add_rms_norm(torch.randn(2, 8), torch.randn(3, 8), torch.ones(8), None, 1e-6)
    with pytest.raises(RuntimeError, match="2 \\* n"):
        kernels.native.silu_and_mul(torch.randn(2, 7))
