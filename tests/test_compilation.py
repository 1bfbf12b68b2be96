"""The compiled backend (engine/compilation.py): compiled dense blocks compute the same function
as the eager blocks, per-row results independent of the row count, the C++ layers and decode
stacks, and the background mode's install (every step on one backend) and failure path."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

import engine.compilation
import kernels.native
from engine import LLM, SamplingParams, native_layers
from engine.backend import UNPACKED
from engine.compilation import compile_dense_blocks, warm_up_rows, with_native_kernels
from engine.linear import CpuLinear
from engine.model import DenseBlocks

CASES = [("llama", "w8a8"), ("llama", "int8"), ("qwen2", "w8a8"), ("qwen3", "w8a8")]


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def eager_and_compiled(request, tiny_model_dir):
    """A tiny model's layers with eager blocks, and compiled ones for the same weights. int8
    switches kernels at 12 rows, so its compiled blocks take an extra graph; Qwen2 adds q/k/v
    biases, Qwen3 per-head q/k norms."""
    arch, quantization = request.param
    llm = LLM(tiny_model_dir(arch), device="cpu", quantization=quantization, compile="off")
    model = llm.engine.runner.model
    return model, compile_dense_blocks(model, model.backend)


def _run(model, blocks: DenseBlocks, layer, x, residual, positions, attn):
    with torch.inference_mode():
        outputs = blocks.attention_input(layer, x, residual, positions, model.rope_cache, UNPACKED)
        outputs += blocks.attention_output_and_mlp(layer, attn, residual, UNPACKED)
    return outputs  # q, k, v, residual, mlp output, residual


def _inputs(model, rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    hidden = cfg.hidden_size
    attn = cfg.num_attention_heads * cfg.head_dim
    return (
        torch.randn(rows, hidden, generator=g),
        torch.randn(rows, hidden, generator=g),
        torch.randint(0, cfg.max_position_embeddings, (rows,), generator=g),
        torch.randn(rows, attn, generator=g),
    )


@pytest.mark.parametrize("rows", [1, 3, 12, 13, 40])
def test_compiled_blocks_compute_what_the_eager_ones_do(eager_and_compiled, rows):
    model, compiled = eager_and_compiled
    assert compiled.compiled and not model.backend.compiled
    for i, layer in enumerate(model.layers):
        inputs = _inputs(model, rows, seed=rows * 100 + i)
        want = _run(model, model.backend.blocks, layer, *inputs)
        got = _run(model, compiled, layer, *inputs)
        for w, g in zip(want, got, strict=True):
            assert g.shape == w.shape and torch.isfinite(g).all()
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_compiled_rows_do_not_depend_on_the_row_count(eager_and_compiled):
    """Within one kernel's row range (int8 switches kernels past 12 rows, by design), and
    across Dynamo's one-row specialisation."""
    model, compiled = eager_and_compiled
    layer = model.layers[0]
    limit = layer.mlp.down_proj.max_weight_only_rows  # 0: one kernel for every row count
    inputs = _inputs(model, 40, seed=7)

    def first(rows: int):
        return _run(model, compiled, layer, *(t[:rows] for t in inputs))

    # Row counts that take the same kernels; each is checked against the first of its group.
    groups = [(40, 13, 2, 1)] if limit == 0 else [(40, 13), (limit, 2, 1)]
    for full_rows, *others in groups:
        full = first(full_rows)
        for rows in others:
            for p, f in zip(first(rows), full, strict=True):
                assert torch.equal(p, f[:rows])


def _greedy(llm, prompts):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


PROMPTS = [list(range(3, 40)), list(range(50, 58))]


def test_native_kernels_take_over_the_default_mode(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), device="cpu", compile="off")
    model = llm.engine.runner.model
    before = _greedy(llm, PROMPTS)
    linears = [m for m in model.modules() if isinstance(m, CpuLinear)]
    backend = with_native_kernels(model)
    # every linear and the attention of the tiny model fit the kernels
    packed = [p for layer in backend.packed for p in layer] + [backend.lm_head]
    assert len(packed) == len(linears) and all(p is not None for p in packed)
    assert backend.decode_attention is kernels.native.paged_decode_attention
    assert backend.store_kv is kernels.native.store_kv
    model.backend = backend
    after = _greedy(llm, PROMPTS)
    # The GEMM is bit-identical (tests/test_linear.py), the C++ prefill attention sums in
    # another order than SDPA: the first token's distribution agrees to float32 rounding
    # (rounded to int8, a last-bit difference changes a code only on a rounding boundary).
    for a, b in zip(after, before, strict=True):
        assert len(a.token_ids) == 12 and a.token_ids[0] == b.token_ids[0]
        for (ta, la), (tb, lb) in zip(a.logprobs[0].top, b.logprobs[0].top, strict=True):
            assert ta == tb and abs(la - lb) < 1e-4
    # Decode attention keeps queries in float32 against the bfloat16 cache; int8 activations
    # magnify that, and a random tiny model's near-ties then flip. The real model's quality
    # with these kernels is tests/test_quality.py's.


def test_native_attention_keeps_float32_logprobs(tiny_model_dir):
    llm = LLM(
        tiny_model_dir("llama"),
        device="cpu",
        quantization="none",
        kv_cache_dtype="float32",
        compile="off",
    )
    before = _greedy(llm, PROMPTS)
    model = llm.engine.runner.model
    backend = with_native_kernels(model)
    # attention only: the float32 linears stay on their own GEMM
    assert backend.decode_attention is kernels.native.paged_decode_attention
    assert backend.lm_head is None and all(p is None for p in backend.packed[0])
    model.backend = backend
    for a, b in zip(_greedy(llm, PROMPTS), before, strict=True):
        assert a.token_ids == b.token_ids
        for step_a, step_b in zip(a.logprobs, b.logprobs, strict=True):
            assert [t for t, _ in step_a.top] == [t for t, _ in step_b.top]
            for (_, la), (_, lb) in zip(step_a.top, step_b.top, strict=True):
                assert abs(la - lb) < 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_one_graph_decode_stack_matches_the_layer_by_layer_path(tiny_model_dir, arch):
    """A single short sequence exercises the padding (one row, one block-table column), the
    pair the symbolic sizes; Qwen2 adds q/k/v biases, Qwen3 per-head q/k norms."""
    llm = LLM(
        tiny_model_dir(arch),
        device="cpu",
        quantization="none",
        kv_cache_dtype="float32",
        compile="on",
    )
    model = llm.engine.runner.model
    backend = model.backend
    assert backend.decode_layers is not None and backend.compiled
    assert not native_layers.fits(model, backend)  # unquantized linears: the Inductor route
    stack, calls = backend.decode_layers, []

    def counted(*args):
        calls.append(args[1].shape[0])
        return stack(*args)

    for prompts in ([[5, 6, 7]], PROMPTS):
        model.backend = dataclasses.replace(backend, decode_layers=counted)
        stacked = _greedy(llm, prompts)
        model.backend = dataclasses.replace(backend, decode_layers=None)
        layered = _greedy(llm, prompts)
        for a, b in zip(stacked, layered, strict=True):
            assert a.token_ids == b.token_ids
            for step_a, step_b in zip(a.logprobs, b.logprobs, strict=True):
                for (ta, la), (tb, lb) in zip(step_a.top, step_b.top, strict=True):
                    assert ta == tb and abs(la - lb) < 1e-4
    assert calls.count(1) == 11 and calls.count(2) == 11  # every decode step of both runs


# Every architecture on the CPU's own kernels, and Llama on each slower target it runs.
_STACK_CASES = [(kernels.native.detected_isa(), arch) for arch in ("llama", "qwen2", "qwen3")]
_STACK_CASES += [(isa, "llama") for isa in kernels.native.runnable_isas()[1:]]


@pytest.mark.parametrize(("isa", "arch"), _STACK_CASES)
def test_native_decode_stack_serves_the_default_mode(tiny_model_dir, isa, arch, monkeypatch):
    """With every linear on the C++ int8 GEMM, the compile step installs
    engine/native_layers.py: decode steps run all layers in one C++ call, and give the same
    bits as the per-layer C++ blocks that prefill and mixed steps use."""
    monkeypatch.setenv(kernels.native.ISA_ENV, isa)
    llm = LLM(tiny_model_dir(arch), device="cpu", quantization="w8a8", compile="on")
    model = llm.engine.runner.model
    backend = model.backend
    assert backend.blocks.attention_input is native_layers._attention_input
    calls = []
    native = kernels.native.decode_layers

    def counted(x, *args):
        calls.append(x.shape[0])
        return native(x, *args)

    monkeypatch.setattr(kernels.native, "decode_layers", counted)
    stacked = _greedy(llm, PROMPTS)
    assert calls == [2] * 11  # every decode step, in the C++ stack
    model.backend = dataclasses.replace(backend, decode_layers=None)
    layered = _greedy(llm, PROMPTS)
    for a, b in zip(stacked, layered, strict=True):
        assert a.token_ids == b.token_ids
        assert [lp.top for lp in a.logprobs] == [lp.top for lp in b.logprobs]


def test_no_decode_stack_without_the_native_attention(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(engine.compilation, "with_native_kernels", lambda model: model.backend)
    llm = LLM(tiny_model_dir("llama"), device="cpu", compile="on")
    backend = llm.engine.runner.model.backend
    assert backend.compiled and backend.decode_layers is None


def test_warm_up_reaches_every_row_count_threshold(tiny_model_dir):
    path = tiny_model_dir("llama")
    assert warm_up_rows(LLM(path, device="cpu", compile="off").engine.runner.model) == [1, 2]
    int8 = LLM(path, device="cpu", quantization="int8", compile="off").engine.runner.model
    assert warm_up_rows(int8) == [1, 2, 13]


def test_background_compile_serves_meanwhile_then_switches(tiny_model_dir):
    path = tiny_model_dir("llama")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [list(range(5, 25)), list(range(40, 47))]
    llm = LLM(path, device="cpu", compile="background")
    compile_job = llm.engine.background_compile
    assert compile_job is not None
    # Requests are served whatever the compile's progress.
    during = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 8 for o in during)
    assert llm.engine.wait_for_compile(timeout=600) == "ready"
    assert compile_job.state == "ready" and llm.engine.stats().compile_state == "ready"
    assert llm.engine.runner.model.backend.compiled
    # Once switched it computes exactly what an engine compiled before serving does.
    after = llm.generate(prompts, params, use_tqdm=False)
    blocking = LLM(path, device="cpu", compile="on")
    assert blocking.engine.stats().compile_state == "ready"
    want = blocking.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in after] == [o.outputs[0].token_ids for o in want]


def test_every_step_runs_on_one_backend_across_the_background_install(tiny_model_dir, monkeypatch):
    """The engine steps on while the background compile builds and installs its backend, the
    install landing in the middle of a step (between its first and second layer): each
    step's output (the hidden states its logits come from) is bit for bit what the eager
    backend or the compiled one computes for it, never a mixture, and the step in flight
    finishes on the backend it started with."""
    gate = threading.Event()
    build = engine.compilation.with_native_kernels

    def gated(model):  # the compile waits until the engine is mid-step
        assert gate.wait(timeout=600)
        return build(model)

    monkeypatch.setattr(engine.compilation, "with_native_kernels", gated)
    llm = LLM(
        tiny_model_dir("llama"),
        device="cpu",
        quantization="w8a8",
        compile="background",
        num_kv_blocks=32,
        max_num_batched_tokens=24,
    )
    runner, job = llm.engine.runner, llm.engine.background_compile
    model = runner.model
    eager = model.backend
    caches = [*runner.k_caches, *runner.v_caches]
    steps = []  # [forward's arguments, caches before the step, its output]

    def record_inputs(module, args):
        steps.append([args, [c.clone() for c in caches], None])

    def record_output(module, args, output):
        steps[-1][2] = output.clone()

    def install_mid_step(layer, args, output):
        if len(steps) == 3 and not gate.is_set():
            gate.set()
            assert job.wait(timeout=600) and job.state == "ready"

    hooks = [
        model.register_forward_pre_hook(record_inputs),
        model.register_forward_hook(record_output),
        model.layers[0].register_forward_hook(install_mid_step),
    ]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    # Prefill chunks, mixed steps and pure decode steps on both sides of the install.
    for i, prompt in enumerate([list(range(3, 33)), list(range(40, 49)), [7, 8, 9, 10, 11]]):
        llm.engine.add_request(str(i), prompt, params)
    try:
        while llm.engine.has_unfinished_requests():
            llm.engine.step()
    finally:
        gate.set()  # never leave the compile thread waiting
        for hook in hooks:
            hook.remove()
    compiled = model.backend
    assert compiled is not eager and compiled.decode_layers is not None

    differ, ran_on = 0, []
    with torch.inference_mode():
        for number, (args, before, output) in enumerate(steps):
            *inputs, backend = args
            want = {}
            for name, candidate in (("eager", eager), ("compiled", compiled)):
                for cache, saved in zip(caches, before, strict=True):
                    cache.copy_(saved)
                want[name] = model(*inputs, candidate)
            ran = "eager" if backend is eager else "compiled"
            assert backend is eager or backend is compiled
            assert torch.equal(output, want[ran]), f"step {number} is not the {ran} backend's"
            differ += not torch.equal(want["eager"], want["compiled"])
            ran_on.append(ran)
    assert ran_on[2] == "eager"  # the step the install landed in finished on its backend
    assert "compiled" in ran_on and set(ran_on[ran_on.index("compiled") :]) == {"compiled"}
    assert ran_on.index("compiled") == 3  # the next step took the new backend
    assert differ > 0  # the two backends are told apart


def _no_compiler(model):
    raise RuntimeError("no C++ compiler found\nlong details")


def test_a_failed_background_compile_is_reported_and_serving_goes_on(
    tiny_model_dir, monkeypatch, caplog
):
    monkeypatch.setattr(engine.compilation, "with_native_kernels", _no_compiler)
    llm = LLM(tiny_model_dir("llama"), device="cpu", compile="background")
    job = llm.engine.background_compile
    assert job.wait(timeout=60)
    assert job.state == "failed" and llm.engine.stats().compile_state == "failed"
    assert job.error == "RuntimeError: no C++ compiler found"
    assert "compile failed" in caplog.text
    assert not llm.engine.runner.model.backend.compiled
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    assert len(llm.generate([5, 6, 7], params, use_tqdm=False)[0].outputs[0].token_ids) == 4


def test_compile_on_fails_loudly(tiny_model_dir, monkeypatch):
    monkeypatch.setattr("engine.llm_engine.compile_model", _no_compiler)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        LLM(tiny_model_dir("llama"), device="cpu", compile="on")
