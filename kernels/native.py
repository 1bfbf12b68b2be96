"""tokenmill's C++ CPU kernels (``kernels/csrc``), built on first use with the host compiler.

Why C++ here when the rest of the CPU path is ATen and Inductor: neither has a fast int8 GEMM
for the few rows of a decode step on CPUs without AMX (`kernels/csrc/int8_gemm.cpp` says
how much). A target builds as one translation unit (kernels/csrc/kernels.cpp includes the
kernel files, so the ATen and torch headers are parsed once), in ~25 s of one core's time,
once per checkout: PyTorch's extension loader caches the library (`build_directory`) and
rebuilds only when the source, a file it includes, or a flag changes. The engine builds it
on its background compile thread (engine/compilation.py), never on a request's path.

The same sources build for each instruction set in `ISAS` (kernels/csrc/simd.h), one library
per target, chosen at run time by `cpu_isa`: AVX-512 VNNI, AVX2 + FMA, or portable C++.
A target's ops live under ``torch.ops.tokenmill_<isa>``, so that tests can load two targets
into one process; each op has a fake (meta) implementation so that ``torch.compile`` can
trace through it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import sysconfig
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

# Imported here, on the importing (main) thread, not by `load` on the compile thread: its
# first import pulls in setuptools, whose distutils shim inserts and removes an entry of
# `sys.meta_path`, and an import on another thread iterating that list at the same moment
# skips the path finder and fails. It crashed the server's start-up about one time in ten,
# in uvicorn's lazy import of its protocol module ("No module named
# 'uvicorn.protocols.http'").
from torch.utils import cpp_extension

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
# One translation unit per target: kernels.cpp includes the kernel files, so that the ATen and
# torch headers they share are parsed once, not once per file (kernels/csrc/kernels.cpp).
_SOURCE = _CSRC / "kernels.cpp"
# What it includes: every other source and header beside it.
_INCLUDED = sorted(f for f in _CSRC.iterdir() if f.suffix in (".cpp", ".h") and f != _SOURCE)

# The kernels' targets, fastest first, with the compiler flags that select each one's code in
# kernels/csrc (simd.h, int8_gemm.cpp). Each is named explicitly (not -march=native) so that a
# cached library runs on any CPU with the instruction set. OpenMP: at::parallel_for is
# inlined into the kernels, and without it compiles to a serial loop (as Inductor's kernels,
# this links the system libgomp). Hidden visibility keeps two targets' libraries, loaded
# into one process, from resolving each other's functions. The generic target builds at -O2
# (the last -O wins): no default runs its kernels (engine/cpu_path.py), and -O3 doubled its
# attention file's build, to 36 s on two cores, for 8-10% faster decode attention.
ISAS = ("avx512_vnni", "avx_vnni", "avx2", "generic")
_ISA_CFLAGS = {
    "avx512_vnni": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni"],
    "avx_vnni": ["-mavx2", "-mfma", "-mf16c", "-mavxvnni"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "generic": ["-O2"],
}
_CFLAGS = ["-O3", "-fopenmp", "-fvisibility=hidden"]
_ISA_CPU_FLAGS = {
    "avx512_vnni": ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"),
    "avx_vnni": ("avx2", "fma", "f16c", "avx_vnni"),
    "avx2": ("avx2", "fma", "f16c"),
    "generic": (),
}
ISA_ENV = "TOKENMILL_CPU_ISA"
# The weight codes each target's int8 GEMM multiplies exactly, where not all of int8, and
# the activation codes [-limit, limit] it rounds its inputs to, where not 127: the AVX2
# GEMM's vpmaddubsw sums two products of an activation byte (code + 64, up to 127) and a
# weight in 16 signed bits, and it adds two such sums there before widening them, which
# |w| <= 64 keeps from saturating (4 x 127 x 64 = 32512; kernels/csrc/int8_gemm.cpp).
_INT8_WEIGHT_RANGES = {"avx2": (-64, 64)}
_INT8_ACTIVATION_LIMITS = {"avx2": 63}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them from cpuid (x86 ``flags``, aarch64
    ``Features``); empty where /proc/cpuinfo is unreadable (then only `generic` runs)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_features() -> dict[str, bool]:
    """The features that decide the CPU path, for logs and /health: AVX-512 VNNI and AVX-VNNI
    (int8 dot products on 512- and 256-bit registers), AVX2 with FMA, and on aarch64 the
    dot-product extension (no NEON kernels yet: it runs `generic`)."""
    flags = cpu_flags()
    return {
        "avx512_vnni": all(f in flags for f in _ISA_CPU_FLAGS["avx512_vnni"]),
        "avx_vnni": all(f in flags for f in _ISA_CPU_FLAGS["avx_vnni"]),
        "avx2_fma": all(f in flags for f in _ISA_CPU_FLAGS["avx2"]),
        "aarch64_dotprod": "asimddp" in flags,
    }


def runnable_isas() -> list[str]:
    """The kernel targets this CPU can run, fastest first (`generic` runs everywhere)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["generic"]
    flags = cpu_flags()
    return [isa for isa in ISAS if all(f in flags for f in _ISA_CPU_FLAGS[isa])]


def detected_isa() -> str:
    """The fastest kernel target this CPU runs."""
    return runnable_isas()[0]


def cpu_isa() -> str:
    """The kernel target in use: ``$TOKENMILL_CPU_ISA`` where set (so that tests and
    benchmarks can run a slower target's kernels on a faster CPU), else `detected_isa`.

    Raises ValueError for an unknown target or one this CPU cannot run.
    """
    forced = os.environ.get(ISA_ENV, "").strip().lower()
    if not forced:
        return detected_isa()
    if forced not in ISAS:
        raise ValueError(f"{ISA_ENV} must be one of {list(ISAS)}, got {forced!r}")
    if forced not in runnable_isas():
        raise ValueError(f"{ISA_ENV}={forced}: this CPU runs only {runnable_isas()}")
    return forced


def int8_weight_range(isa: str) -> tuple[int, int]:
    """The lowest and highest weight code `isa`'s int8 GEMM multiplies exactly. w8a8 rounds
    its weights to the range of the target the process runs (`cpu_isa`), so on the AVX2
    target it computes with weights of 7 bits and a sign where the others keep 8 bits (and
    activations of 6 bits and a sign, `int8_activation_limit`)."""
    return _INT8_WEIGHT_RANGES.get(isa, (-128, 127))


def int8_activation_limit(isa: str) -> int:
    """The largest activation code `isa`'s int8 GEMM rounds each row to (``max|row|`` maps
    to it): 63 on the AVX2 target, whose GEMM then spends three multiplies per 64
    multiply-adds instead of four, 127 elsewhere."""
    return _INT8_ACTIVATION_LIMITS.get(isa, 127)


def build_directory(isa: str | None = None) -> Path:
    """Where a target's library is built and cached: one directory per checkout (so two
    clones do not rebuild over each other), target, and torch and Python version, under
    ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    checkout = hashlib.sha256(str(_CSRC.resolve()).encode()).hexdigest()[:12]
    version = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    return Path(root) / f"tokenmill_cpu-{isa or cpu_isa()}-{version}-{checkout}"


# The op namespace (`torch.ops.tokenmill_<isa>`) the functions below call, and its target:
# the last target `load` was given.
_ops = None
_target: str | None = None


def target() -> str:
    """The target whose kernels this module's functions call: the one last loaded, before
    any load the one `load` will pick (`cpu_isa`)."""
    return _target or cpu_isa()


def load(isa: str | None = None) -> str:
    """Build (or load the cached build of) the kernels for `isa` (default `cpu_isa`), register
    their ops, and make them the ones this module's functions call. Returns the target.

    Raises ValueError for a target this CPU cannot run, RuntimeError when the compiler fails.
    """
    global _ops, _target
    isa = isa or cpu_isa()
    _ops = ops(isa)
    _target = isa
    return isa


def ops(isa: str):
    """A target's op namespace, ``torch.ops.tokenmill_<isa>``, built and loaded (benchmarks
    compare targets side by side through it)."""
    if isa not in runnable_isas():
        raise ValueError(f"this CPU cannot run the {isa} kernels (it runs {runnable_isas()})")
    _load(isa)
    return getattr(torch.ops, f"tokenmill_{isa}")


def _included_flag() -> str:
    """A define that changes with the files kernels.cpp includes: PyTorch's loader versions a
    build by its sources and flags, and does not look at what a source includes."""
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in _INCLUDED)).hexdigest()[:16]
    return f"-DTM_INCLUDED={digest}"


def put_ninja_on_path() -> None:
    """PyTorch's extension loader runs `ninja` from PATH. The `ninja` package tokenmill
    depends on installs it next to the interpreter, which is not on PATH when a virtual
    environment's python runs without the environment activated."""
    scripts = sysconfig.get_path("scripts")
    if shutil.which("ninja") is None and shutil.which("ninja", path=scripts):
        os.environ["PATH"] = os.pathsep.join(filter(None, [scripts, os.environ.get("PATH")]))


@functools.cache
def _load(isa: str) -> None:
    import fcntl  # POSIX: the kernels build with GCC or Clang on Linux and macOS

    start = time.perf_counter()
    put_ninja_on_path()
    namespace = f"tokenmill_{isa}"
    directory = build_directory(isa)
    directory.mkdir(parents=True, exist_ok=True)
    # PyTorch's loader guards a build with a `lock` file that only its owner deletes: a
    # process killed mid-build (a server stopped in its first seconds) leaves it behind, and
    # every later load then waits for it forever. An flock is released by the kernel when
    # its holder dies, so while we hold one, a `lock` file can only be such a leftover.
    with open(directory / "tokenmill.flock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        (directory / "lock").unlink(missing_ok=True)
        cpp_extension.load(
            name=f"tokenmill_cpu_{isa}",
            sources=[str(_SOURCE)],
            extra_cflags=[*_CFLAGS, *_ISA_CFLAGS[isa], f"-DTM_OPS={namespace}", _included_flag()],
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(_CSRC)],
            build_directory=str(directory),
            is_python_module=False,
        )
    fakes = {
        "int8_packed_linear": _int8_packed_linear_fake,
        "int8_packed_swiglu": _int8_packed_swiglu_fake,
        "paged_decode_attention": _like_q,
        "paged_prefill_attention": _like_q,
        "store_kv": _nothing,
        "add_rms_norm": _like_x_and_residual,
        "rotary_heads": _rotary_heads_fake,
        "silu_and_mul": _silu_and_mul_fake,
        "decode_layers": _like_x_and_residual,
    }
    for op, fake in fakes.items():
        torch.library.register_fake(f"{namespace}::{op}")(fake)
    logger.info("C++ kernels (%s) ready after %.1f s", isa, time.perf_counter() - start)


def int8_packed_linear(
    x: torch.Tensor, packed: torch.Tensor, comp: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """The int8 GEMM of kernels/csrc/int8_gemm.cpp: quantization, GEMM and scaling in one
    pass, bit for bit `cpu_ops.int8_dynamic_linear`'s result on every target."""
    return _ops.int8_packed_linear(x, packed, comp, scale)


def int8_packed_swiglu(
    x: torch.Tensor,
    packed: torch.Tensor,
    comp: torch.Tensor,
    scale: torch.Tensor,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """`silu_and_mul(int8_packed_linear(x, ...), input_scale)` for a gate_up weight (its gate
    outputs, then its up outputs) in one pass, bit for bit: each tile's gate and up sums
    meet in its epilogue, so the [rows, 2n] gate_up output is never written out."""
    return _ops.int8_packed_swiglu(x, packed, comp, scale, input_scale)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """`kernels.paged_decode_attention` in C++ (kernels/csrc/paged_attention.cpp): each
    sequence's blocks read in place, no gathered copy. float32 queries, head_dim 16, 32, 64
    or 128, at most 8 query heads per KV head."""
    return _ops.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """`kernels.paged_prefill_attention` in C++: the decode kernel once per query token, over
    its causal context, read in place. Same shapes as `paged_decode_attention`."""
    return _ops.paged_prefill_attention(
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale
    )


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """`kernels.store_kv` in C++: one pass, no per-step slot check in Python."""
    _ops.store_kv(key, value, k_cache, v_cache, slot_mapping)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    input_scale: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernels.rms_norm` with a residual, in C++ (kernels/csrc/layer_ops.cpp): returns
    (normalised, x + residual) for float32 rows, the first times ``input_scale`` (the next
    linear's SmoothQuant scale) where given."""
    return _ops.add_rms_norm(x, residual, weight, input_scale, eps)


def rotary_heads(
    qkv: torch.Tensor,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    positions: torch.Tensor,
    rope_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused q/k/v projection's rows split into contiguous q, k and v heads, q and k
    normalised per head (where norms are given, as Qwen3's) and rotated by
    `kernels.apply_rotary`'s rule. positions are int64."""
    return _ops.rotary_heads(
        qkv, q_norm, k_norm, positions, rope_cache, num_heads, num_kv_heads, eps
    )


def silu_and_mul(gate_up: torch.Tensor, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`kernels.silu_and_mul` in C++, float32, times ``input_scale`` where given."""
    return _ops.silu_and_mul(gate_up, input_scale)


def decode_layers(
    x: torch.Tensor,
    residual: torch.Tensor,
    positions: torch.Tensor,
    rope_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    slot_mapping: torch.Tensor,
    weights: Sequence[Mapping[str, torch.Tensor | None]] | list[torch.Tensor | None],
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
    num_heads: int,
    eps: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernels.reference.decode_layers` in C++ (kernels/csrc/decode_layers.cpp): every layer
    of a decode step in one call, on the ops above. float32 activations, w8a8 linears packed
    by `pack_int8_vnni`. ``weights``: each layer's operands by slot name, as the reference
    takes them, or `decode_layer_weights`' flat list of them, which a caller stepping many
    times prepares once."""
    if weights and isinstance(weights[0], Mapping):
        weights = decode_layer_weights(weights)
    return _ops.decode_layers(
        x,
        residual,
        positions,
        rope_cache,
        block_tables,
        context_lens,
        slot_mapping,
        weights,
        k_caches,
        v_caches,
        num_heads,
        eps,
        scale,
    )


def decode_layer_slots() -> tuple[str, ...]:
    """The names of one layer's operands of `decode_layers`, in the order its ``weights``
    holds them: kernels/csrc/decode_layers.cpp's definition, the only one."""
    return _decode_layer_slots(_ops)


@functools.cache
def _decode_layer_slots(namespace) -> tuple[str, ...]:
    return tuple(namespace.decode_layer_slots())


def decode_layer_weights(
    layers: Sequence[Mapping[str, torch.Tensor | None]],
) -> list[torch.Tensor | None]:
    """`decode_layers`' ``weights`` from each layer's operands by slot name (what
    `kernels.reference.decode_layers` takes). Raises ValueError where a layer's names are
    not exactly the slots."""
    slots = decode_layer_slots()
    for layer in layers:
        if set(layer) != set(slots):
            raise ValueError(
                f"decode layer operands {sorted(set(layer) ^ set(slots))} do not match the "
                "slots of kernels/csrc/decode_layers.cpp"
            )
    return [layer[slot] for layer in layers for slot in slots]


def _like_x_and_residual(x: torch.Tensor, residual: torch.Tensor, *args):
    return torch.empty_like(x), torch.empty_like(residual)


def _rotary_heads_fake(
    qkv: torch.Tensor, q_norm, k_norm, positions, rope_cache, heads, kv_heads, eps
):
    rows, d = qkv.shape[0], qkv.shape[1] // (heads + 2 * kv_heads)
    return (
        qkv.new_empty(rows, heads, d),
        qkv.new_empty(rows, kv_heads, d),
        qkv.new_empty(rows, kv_heads, d),
    )


def _silu_and_mul_fake(gate_up: torch.Tensor, input_scale) -> torch.Tensor:
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


def _like_q(q: torch.Tensor, *args) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _nothing(*args) -> None:
    return None


def _int8_packed_linear_fake(
    x: torch.Tensor, packed: torch.Tensor, comp: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    return x.new_empty(x.shape[0], packed.shape[0] * packed.shape[2])


def _int8_packed_swiglu_fake(
    x: torch.Tensor, packed: torch.Tensor, comp: torch.Tensor, scale: torch.Tensor, input_scale
) -> torch.Tensor:
    return x.new_empty(x.shape[0], packed.shape[0] * packed.shape[2] // 2)
