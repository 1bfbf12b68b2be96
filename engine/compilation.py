"""The CPU compile step: tokenmill's C++ kernels, or else `torch.compile` of the decoder.

Why: in eager mode a CPU decode step spends most of its time outside the GEMMs, in some
1,500 small ops (per-row quantize, dequantize, norms, activation, each a separate pass and
dispatch), and the GEMMs and attention run in ATen kernels tuned for other shapes. On the
C++ kernels a 16-sequence decode step of SmolLM2-135M takes about a third of the eager
step's time (docs/performance.md, `benchmarks/bench_step.py`).

The result is a new `Backend` (engine/backend.py), the one object a forward consults for
its blocks, decode stack, attention kernels and GEMMs. `compiled_backend` builds it from
new objects only, the model's modules and installed backend untouched, and `compile_model`
installs it with one reference assignment (`model.backend = ...`): a step reads the backend
once, so it runs wholly on the eager backend or wholly on the compiled one, whichever
thread the compile runs on. In order:
1. `with_native_kernels`: builds kernels/csrc for the CPU's instruction set
   (kernels/native.py: AVX-512 VNNI, AVX2 or portable C++), packs w8a8 linears' weights
   for its int8 GEMM (new tensors; bit-identical outputs) and takes attention and the KV
   write in their C++ versions.
2. Where every layer then runs on C++ kernels (the default w8a8 mode on AVX-512 VNNI and
   AVX2 CPUs): engine/native_layers.py's blocks for prefill and mixed steps, and its
   one-call decode stack for pure decode steps. Nothing is left for Inductor.
3. Otherwise (other quantizations):
   * `compile_dense_blocks`: each `DenseBlocks` function fused by Inductor into a few C++
     loops around the GEMMs, used by prefill and mixed steps. One graph serves all layers
     (Dynamo lifts parameters to graph inputs) with the row count dynamic; one-row inputs
     get a second graph, and layers whose kernel depends on the row count (weight-only
     int8/int4) a third. Attention stays outside: the ATen prefill kernels plan on the host.
   * `compile_decode_layers`: with the C++ decode attention, a pure decode step's layers as
     one graph, one Dynamo call a step instead of 60 (guards and wrappers cost ~35 us each).

Every graph is compiled and run during the warm-up, so the engine never waits for one.
Per-row results do not depend on the row count (tests/test_compilation.py), so the default
w8a8 mode stays batch-invariant. The compiled model computes the same function with
different rounding (float32 sums in another order), so a switch can change a close greedy
choice.

Modes (`EngineArgs.compile`; the default per instruction set is engine/cpu_path.py's):
"off"; "on" compiles before the engine takes requests; "background" serves eagerly at once
and installs the compiled backend when ready (`BackgroundCompile`), so start-up stays fast.
For SmolLM2-135M on two cores that is the C++ build (~30 s once per checkout and target,
then a cached load; the backend installed within a second); the Inductor route takes 14 s
with its caches warm and 92 s cold. Compiling needs a C++ compiler; in "background" mode a
failure is logged and reported (`BackgroundCompile.state`, the server's /health) and the
engine stays on the eager backend.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import kernels.native
from engine import native_layers
from engine.backend import Backend, Packed, PackedLayer
from engine.linear import CpuLinear
from engine.model import (
    Attention,
    AttentionMetadata,
    CausalLM,
    DecoderLayer,
    DenseBlocks,
    attention_input,
    attention_output_and_mlp,
    run_layers,
)

logger = logging.getLogger(__name__)

COMPILE_MODES = ("off", "on", "background")


def with_native_kernels(model: CausalLM) -> Backend:
    """The model's backend with tokenmill's C++ kernels (kernels/native.py, built here for the
    CPU's instruction set, `kernels.native.cpu_isa`) where they apply: w8a8 linears on the
    int8 GEMM (new packed copies of their weights), attention and the KV write on their C++
    versions. Unchanged where none apply, as when the activations are not float32 (the
    kernels' only input type)."""
    backend = model.backend
    if model.embed_tokens.weight.dtype != torch.float32:
        return backend
    linears = [m for m in model.modules() if isinstance(m, CpuLinear) and m.quantization == "w8a8"]
    attention = all(_native_attention_fits(layer.self_attn) for layer in model.layers)
    if not linears and not attention:
        return backend
    kernels.native.load()
    if attention:
        backend = dataclasses.replace(
            backend,
            store_kv=kernels.native.store_kv,
            decode_attention=kernels.native.paged_decode_attention,
            prefill_attention=kernels.native.paged_prefill_attention,
        )
    return dataclasses.replace(
        backend,
        packed=tuple(_pack_layer(layer) for layer in model.layers),
        lm_head=_pack(model.lm_head),
    )


def _pack(linear: torch.nn.Module) -> Packed | None:
    return linear.pack_int8() if isinstance(linear, CpuLinear) else None


def _pack_layer(layer: DecoderLayer) -> PackedLayer:
    attn, mlp = layer.self_attn, layer.mlp
    return PackedLayer(*map(_pack, (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)))


def _native_attention_fits(attn: Attention) -> bool:
    return (
        attn.k_cache.dtype in (torch.float32, torch.bfloat16)
        and attn.head_dim in (16, 32, 64, 128)
        and attn.num_heads // attn.num_kv_heads <= 8
    )


def compiled_backend(model: CausalLM) -> Backend:
    """Everything the compile step does, as a new backend: the C++ kernels, then either the
    layers on them alone (engine/native_layers.py) or the compiled dense blocks and, with the
    C++ decode attention, the one-graph decode stack. Every part is run once on the way; the
    model and its installed backend stay as they are, so that backend keeps serving
    meanwhile."""
    backend = with_native_kernels(model)
    if native_layers.fits(model, backend):
        backend = native_layers.native_backend(model, backend)
        _try_native(model, backend)
        return backend
    blocks = compile_dense_blocks(model, backend)
    decode_layers = None
    if backend.decode_attention is kernels.native.paged_decode_attention:
        decode_layers = compile_decode_layers(model, backend)
    return dataclasses.replace(backend, blocks=blocks, decode_layers=decode_layers)


def compile_model(model: CausalLM) -> None:
    """Build `compiled_backend` and install it with one reference assignment: a forward on
    another thread runs each step on the backend it read at the start, the old or the new,
    never a mixture."""
    model.backend = compiled_backend(model)


def _try_native(model: CausalLM, backend: Backend) -> None:
    """Run the C++ layers once before installing them, as the compiled graphs are, so that
    a failure shows as a failed compile rather than in a request."""
    with torch.inference_mode():
        x, residual, positions, meta = _warm_up_decode(model, rows=2, width=1)
        backend.decode_layers(model, x, residual, positions, meta)
        layer, packed, blocks = model.layers[0], backend.packed[0], backend.blocks
        blocks.attention_input(layer, x, residual, positions, model.rope_cache, packed)
        attn = torch.zeros(2, model.config.num_attention_heads * model.config.head_dim)
        blocks.attention_output_and_mlp(layer, attn, residual, packed)


def compile_dense_blocks(model: CausalLM, backend: Backend) -> DenseBlocks:
    """Compiled versions of the model's dense blocks, every graph built and run once on
    `backend`'s packed weights."""
    import torch._dynamo  # a second of import: only when compiling

    # Dynamo keeps its graphs per code object, and every model compiled in this process adds
    # up to three per block: past the default limit of 8 it would silently run eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    blocks = DenseBlocks(
        torch.compile(attention_input), torch.compile(attention_output_and_mlp), compiled=True
    )
    cfg = model.config
    dtype = model.embed_tokens.weight.dtype
    with torch.inference_mode():
        for rows in warm_up_rows(model):
            x = torch.randn(rows, cfg.hidden_size, dtype=dtype)
            residual = torch.randn(rows, cfg.hidden_size, dtype=dtype)
            attn = torch.randn(rows, cfg.num_attention_heads * cfg.head_dim, dtype=dtype)
            positions = torch.randint(0, model.rope_cache.shape[0], (rows,))
            if rows > 1:  # compile the row count as a symbol straight away
                for t in (x, residual, attn, positions):
                    torch._dynamo.maybe_mark_dynamic(t, 0)
            for layer, packed in zip(model.layers, backend.packed, strict=True):
                blocks.attention_input(layer, x, residual, positions, model.rope_cache, packed)
                blocks.attention_output_and_mlp(layer, attn, residual, packed)
    return blocks


def compile_decode_layers(model: CausalLM, backend: Backend) -> Callable:
    """`run_layers` on `backend`'s kernels for pure decode steps as one graph. With the dense
    blocks compiled one by one, Dynamo's guards and wrappers cost ~35 us a call, 60 calls a
    step; here one. Attention must be the C++ op (`with_native_kernels`): the ATen path
    plans on the host.

    Rows and block-table columns are padded to at least two (padding rows write no K/V and
    attend to nothing), so one graph with both sizes symbolic serves every step; the warm-up
    checks that a second shape runs without recompiling."""
    import torch._dynamo

    compiled = torch.compile(run_layers)
    layered = dataclasses.replace(backend, blocks=DenseBlocks(), decode_layers=None)

    def decode_layers(
        model: CausalLM,
        x: torch.Tensor,
        residual: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = x.shape[0]
        x, residual, positions, meta = _pad_decode(x, residual, positions, meta)
        x, residual = compiled(model, x, residual, positions, meta, layered)
        return x[:rows], residual[:rows]

    with torch.inference_mode():
        inputs = _warm_up_decode(model, rows=3, width=2)
        for t in (*inputs[:3], inputs[3].slot_mapping, inputs[3].context_lens):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.maybe_mark_dynamic(inputs[3].block_tables, 0)
        torch._dynamo.maybe_mark_dynamic(inputs[3].block_tables, 1)
        decode_layers(model, *inputs)
        with torch.compiler.set_stance("fail_on_recompile"):
            decode_layers(model, *_warm_up_decode(model, rows=1, width=5))
    return decode_layers


def _pad_decode(
    x: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """At least two rows and two block-table columns (Dynamo specialises sizes of one)."""
    rows, width = meta.block_tables.shape
    if rows >= 2 and width >= 2:
        return x, residual, positions, meta
    pad = max(0, 2 - rows)
    meta = dataclasses.replace(
        meta,
        slot_mapping=F.pad(meta.slot_mapping, (0, pad), value=-1),
        block_tables=F.pad(meta.block_tables, (0, max(0, 2 - width), 0, pad)),
        context_lens=F.pad(meta.context_lens, (0, pad)),
    )
    x, residual = F.pad(x, (0, 0, 0, pad)), F.pad(residual, (0, 0, 0, pad))
    return x, residual, F.pad(positions, (0, pad)), meta


def _warm_up_decode(
    model: CausalLM, rows: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Decode inputs that read block 0 of the live cache and write nothing (slot -1), so the
    warm-up may run while the engine serves."""
    hidden = model.config.hidden_size
    dtype = model.embed_tokens.weight.dtype
    block_size = model.layers[0].self_attn.k_cache.shape[1]
    meta = AttentionMetadata(
        slot_mapping=torch.full((rows,), -1, dtype=torch.int64),
        block_tables=torch.zeros(rows, width, dtype=torch.int32),
        context_lens=torch.arange(1, rows + 1, dtype=torch.int32).clamp(max=block_size),
        query_start_loc=torch.arange(rows + 1, dtype=torch.int32),
        is_decode=True,
    )
    x = torch.randn(rows, hidden, dtype=dtype)
    return x, torch.randn(rows, hidden, dtype=dtype), torch.zeros(rows, dtype=torch.int64), meta


def warm_up_rows(model: CausalLM) -> list[int]:
    """Row counts that reach every graph: one row, a few rows, and just past each row-count
    threshold a linear of the model switches kernels at."""
    thresholds = {
        m.max_weight_only_rows
        for m in model.modules()
        if isinstance(m, CpuLinear) and m.max_weight_only_rows > 1
    }
    return [1, 2, *sorted(t + 1 for t in thresholds)]


class BackgroundCompile:
    """Runs `compile_model` on a thread of its own, which installs the new backend when done
    while the engine serves on the eager one.

    The thread uses the engine's thread count, so the generated kernels are parallelised for
    it; its OpenMP team lives only as long as the warm-up.
    """

    def __init__(self, model: CausalLM, num_threads: int | None) -> None:
        self.state = "compiling"  # then "ready" or "failed"
        self.error: str | None = None
        self._model = model
        self._num_threads = num_threads
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tokenmill-compile", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the compile has finished (either way); False on timeout."""
        return self._done.wait(timeout)

    def _run(self) -> None:
        if self._num_threads is not None:
            torch.set_num_threads(self._num_threads)
        start = time.perf_counter()
        logger.info("compiling the model in the background; serving eagerly meanwhile")
        try:
            compile_model(self._model)
        except Exception as exc:  # any compiler failure leaves the eager backend on
            self.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            self.state = "failed"
            logger.warning("compile failed, staying on the eager backend: %s", self.error)
        else:
            self.state = "ready"
            logger.info("compiled model in use after %.1f s", time.perf_counter() - start)
        finally:
            self._done.set()
