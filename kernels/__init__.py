"""Kernels used by the engine, each dispatching between Triton and a PyTorch reference.

The engine calls only the functions exported here. A call goes to the Triton implementation when
its tensors live on CUDA, or when they are on CPU and ``TRITON_INTERPRET=1`` is set (read at call
time, so CPU machines can exercise the Triton code through the interpreter). Other CPU calls run
:mod:`kernels.cpu_ops` where it has a faster ATen-based version (paged attention,
store_kv, rms_norm, rotary, the quantized matmuls) and the reference in :mod:`kernels.reference`
otherwise, as every non-CPU call does when Triton is not installed.

Triton modules are imported lazily: ``triton.jit`` decides at decoration time whether a kernel is
compiled or interpreted, so importing them eagerly would freeze that choice before a test harness
or user had a chance to set ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

import torch

from kernels import cpu_ops, reference

__all__ = [
    "apply_rotary",
    "build_rope_cache",
    "int4_linear",
    "int8_dynamic_linear",
    "int8_linear",
    "int8_packed_linear",
    "pack_int4",
    "pack_int8_vnni",
    "paged_decode_attention",
    "paged_prefill_attention",
    "reference",
    "rms_norm",
    "silu_and_mul",
    "store_kv",
    "triton_available",
]

_TRUTHY = ("1", "true", "on", "yes")


@functools.cache
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (it is absent on e.g. macOS).

    Cached: until triton is imported, ``find_spec`` walks ``sys.path``, far too slow per call.
    """
    return importlib.util.find_spec("triton") is not None


def interpret_requested() -> bool:
    """Whether the environment asks for Triton's CPU interpreter right now."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRUTHY


def _triton_module(name: str) -> ModuleType:
    return importlib.import_module(f"kernels.{name}")


def _use_triton(t: torch.Tensor, module: str) -> bool:
    """Route to Triton on CUDA, or on CPU when interpreting and the module was built for it.

    The second condition matters when a process imported the kernels compiled for a GPU and only
    later set ``TRITON_INTERPRET``: compiled kernels cannot take CPU tensors, so we fall back.
    """
    if t.is_cuda:
        return triton_available()
    # The environment first: a plain CPU call then never reaches the cached lookup, which
    # torch.compile (engine/compilation.py) would warn about when it traces through.
    if not interpret_requested() or not triton_available():
        return False
    return bool(_triton_module(module).INTERPRETED)


def _impl(name: str, t: torch.Tensor, triton_module: str | None = None):
    """The implementation of kernel ``name`` for tensors like ``t``: Triton where
    `_use_triton` says so, else the ATen-based CPU version for CPU tensors where `cpu_ops`
    has one, else the reference. Looked up at call time, so tests can substitute any of them.
    """
    if triton_module is not None and _use_triton(t, triton_module):
        return getattr(_triton_module(triton_module), name)
    if t.device.type == "cpu" and hasattr(cpu_ops, name):
        return getattr(cpu_ops, name)
    return getattr(reference, name)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One-token-per-sequence attention over a paged KV cache; see the reference for semantics."""
    impl = _impl("paged_decode_attention", q, "triton_attention")
    return impl(q, k_cache, v_cache, block_tables, context_lens, scale)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of packed queries over a paged KV cache; see the reference for semantics."""
    impl = _impl("paged_prefill_attention", q, "triton_attention")
    return impl(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter new K/V into their cache slots in place (negative slots are skipped)."""
    impl = _impl("store_kv", key, "triton_ops")
    impl(key, value, k_cache, v_cache, slot_mapping)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm; with ``residual`` returns ``(norm(x + residual), x + residual)``."""
    impl = _impl("rms_norm", x, "triton_ops")
    return impl(x, weight, eps, residual)


def build_rope_cache(
    head_dim: int,
    max_position: int,
    base: float,
    rope_scaling: dict | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The ``[max_position, head_dim]`` cos|sin table; computed once, so always the reference."""
    return reference.build_rope_cache(head_dim, max_position, base, rope_scaling, device)


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding (Llama rotate_half layout) on new copies of ``q`` and ``k``."""
    impl = _impl("apply_rotary", q, "triton_ops")
    return impl(q, k, positions, cos_sin_cache)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for a fused gate/up projection of width ``2 * d``."""
    impl = _impl("silu_and_mul", x, "triton_ops")
    return impl(x)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (qweight * scale[:, None]).T``: int8 weights with a scale per output channel.

    CPU tensors take ATen's int8 kernel (activations rounded to bfloat16); there is no Triton
    version yet, so other devices dequantize through the reference.
    """
    impl = _impl("int8_linear", x)
    return impl(x, qweight, scale)


def int8_dynamic_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """`int8_linear` on activations rounded to int8 per row on the fly (an int8 x int8 GEMM).
    CPU only for now; other devices run the reference."""
    impl = _impl("int8_dynamic_linear", x)
    return impl(x, qweight, scale)


def pack_int8_vnni(qweight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay out an int8 ``[out, in]`` weight for `int8_packed_linear` (the same layout on every
    device; on CPU its codes must lie in `kernels.native.int8_weight_range`)."""
    impl = _impl("pack_int8_vnni", qweight)
    return impl(qweight)


def int8_packed_linear(
    x: torch.Tensor, packed: torch.Tensor, comp: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """`int8_dynamic_linear` on a weight from `pack_int8_vnni`. CPU tensors run the C++
    kernel for the CPU's instruction set, which `kernels.native.load()` must have built; other
    devices the reference."""
    impl = _impl("int8_packed_linear", x)
    return impl(x, packed, comp, scale)


def pack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """Lay out ``[out, in]`` 4-bit values (uint8 in [0, 15]) for `int4_linear` on their device."""
    impl = _impl("pack_int4", qweight)
    return impl(qweight)


def int4_linear(
    x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """``x @ W.T`` with ``W = (q - 8) * scale + zero`` per group of inputs; ``packed`` must come
    from `pack_int4` on the same device. CPU only for now, like `int8_linear`."""
    impl = _impl("int4_linear", x)
    return impl(x, packed, scales_zeros, group_size)
