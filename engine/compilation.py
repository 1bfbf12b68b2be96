"""Regional `torch.compile` of the decoder layers' dense blocks on CPU.

Why: in eager mode a CPU decode step of 16 sequences spends about two thirds of its time
outside the int8 GEMMs, in some 1,500 small ops (per-row quantize, dequantize, norms,
activation, each a separate pass and dispatch). Inductor fuses each `DenseBlocks` function
into a few C++ loops around the GEMMs. Closed-loop engine runs on this project's 2-core
machine: +16% tok/s at 16 streams, +29% at 32 (docs/performance.md).

How:
* Only the dense blocks are compiled, not attention: the paged-cache kernels plan per step
  with host-side Python that would break graphs anyway, and gain little from fusion.
* One graph serves all layers (Dynamo lifts module parameters to graph inputs) with the row
  count dynamic. Dynamo specialises one-row inputs, so those get a second graph, and layers
  whose kernel depends on the row count (weight-only int8/int4) a third. Every graph is
  compiled and run on every layer during the warm-up, so the engine never waits for one.
  Within one kernel's row range, per-row results do not depend on the row count
  (tests/test_compilation.py), so the default w8a8 mode stays batch-invariant.
* The compiled blocks compute the same function as the eager ones, with different rounding
  (float32 sums in another order), so a switch can change a close greedy choice.

Modes (`EngineArgs.compile`): "off"; "on" compiles before the engine takes requests;
"background" serves eagerly at once and installs the compiled blocks when ready, so start-up
stays fast: for SmolLM2-135M on two cores the compiled blocks take over ~19 s after start-up
with a cold Inductor cache, ~6 s with a warm one (its on-disk cache, by default under /tmp).
Compiling needs a C++ compiler; in "background" mode a failure is logged and reported
(`BackgroundCompile.state`, the server's /health) and the engine stays on the eager blocks.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

import kernels.native
from engine.linear import CpuLinear
from engine.model import (
    Attention,
    CausalLM,
    DenseBlocks,
    attention_input,
    attention_output_and_mlp,
)

logger = logging.getLogger(__name__)

COMPILE_MODES = ("off", "on", "background")


def use_native_kernels(model: CausalLM) -> int:
    """Build tokenmill's C++ kernels (kernels/native.py) and move the model onto them where
    they apply: w8a8 linears to the VNNI GEMM, decode attention and the KV write to their C++
    versions. Returns how many modules moved. None do on a CPU without AVX-512 VNNI, or when
    the activations are not float32 (the kernels' only input type)."""
    if model.embed_tokens.weight.dtype != torch.float32 or not kernels.native.supported():
        return 0
    linears = [m for m in model.modules() if isinstance(m, CpuLinear) and m.w8a8 is not None]
    attentions = [layer.self_attn for layer in model.layers]
    attentions = [attn for attn in attentions if _native_attention_fits(attn)]
    if not linears and not attentions:
        return 0
    kernels.native.load()
    for attn in attentions:
        attn.store_kv = kernels.native.store_kv
        attn.decode_attention = kernels.native.paged_decode_attention
    return sum(linear.pack_for_vnni() for linear in linears) + len(attentions)


def _native_attention_fits(attn: Attention) -> bool:
    return (
        attn.k_cache.dtype in (torch.float32, torch.bfloat16)
        and attn.head_dim % 16 == 0
        and attn.head_dim <= 128
        and attn.num_heads // attn.num_kv_heads <= 16
    )


def compile_dense_blocks(model: CausalLM) -> DenseBlocks:
    """Compiled versions of the model's dense blocks, every graph built and run once, after
    moving its linears onto the C++ kernels where they apply."""
    import torch._dynamo  # a second of import: only when compiling

    use_native_kernels(model)

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
            for layer in model.layers:
                blocks.attention_input(layer, x, residual, positions, model.rope_cache)
                blocks.attention_output_and_mlp(layer, attn, residual)
    return blocks


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
    """Compiles a model's dense blocks on a thread of its own and installs them when done.

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
        logger.info("compiling the dense blocks in the background; serving eagerly meanwhile")
        try:
            blocks = compile_dense_blocks(self._model)
        except Exception as exc:  # any compiler failure leaves the eager blocks on
            self.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            self.state = "failed"
            logger.warning("torch.compile failed, staying on eager blocks: %s", self.error)
        else:
            self._model.dense_blocks = blocks
            self.state = "ready"
            logger.info("compiled dense blocks in use after %.1f s", time.perf_counter() - start)
        finally:
            self._done.set()
