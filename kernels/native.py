"""tokenmill's C++ CPU kernels (``kernels/csrc``), built on first use with the host compiler.

Why C++ here when the rest of the CPU path is ATen and Inductor: neither has a fast int8 GEMM
for the few rows of a decode step on CPUs without AMX (`kernels/csrc/int8_gemm.cpp` says
how much). The build takes 10-25 s on two cores, once per checkout: PyTorch's extension
loader caches the library (`build_directory`) and rebuilds only when a source changes. The
engine builds it on its background compile thread (engine/compilation.py), never on a
request's path.

Ops live under ``torch.ops.tokenmill``, each with a fake (meta) implementation so that
``torch.compile`` can trace through them.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
import sysconfig
import time
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

_SOURCES = [
    Path(__file__).parent / "csrc" / f
    for f in ("int8_gemm.cpp", "paged_attention.cpp", "layer_ops.cpp", "decode_layers.cpp")
]
# The ISA the kernels are written for, named explicitly (not -march=native) so that the cached
# library runs on any CPU that has it. OpenMP: at::parallel_for is inlined into the kernels, and
# without it compiles to a serial loop (as Inductor's kernels, this links the system libgomp).
_CFLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni"]
_REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni")


@functools.cache
def supported() -> bool:
    """Whether this CPU runs the kernels: x86 with AVX-512 VNNI (Intel since Cascade Lake,
    AMD since Zen 4). Read from /proc/cpuinfo, so False off Linux."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return all(f in flags for f in _REQUIRED_CPU_FLAGS)
    return False


def build_directory() -> Path:
    """Where the library is built and cached: one directory per checkout (so two clones do
    not rebuild over each other) and per torch and Python version, under
    ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    checkout = hashlib.sha256(str(_SOURCES[0].parent.resolve()).encode()).hexdigest()[:12]
    version = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    return Path(root) / f"tokenmill_cpu-{version}-{checkout}"


def put_ninja_on_path() -> None:
    """PyTorch's extension loader runs `ninja` from PATH. The `ninja` package tokenmill
    depends on installs it next to the interpreter, which is not on PATH when a virtual
    environment's python runs without the environment activated."""
    scripts = sysconfig.get_path("scripts")
    if shutil.which("ninja") is None and shutil.which("ninja", path=scripts):
        os.environ["PATH"] = os.pathsep.join(filter(None, [scripts, os.environ.get("PATH")]))


@functools.cache
def load() -> None:
    """Build (or load the cached build of) the kernels and register their ops.

    Raises RuntimeError on a CPU without the ISA, or when the compiler fails.
    """
    if not supported():
        raise RuntimeError("tokenmill's C++ kernels need a CPU with AVX-512 VNNI")
    import fcntl  # POSIX; `supported` is False elsewhere

    start = time.perf_counter()
    put_ninja_on_path()
    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    # PyTorch's loader guards a build with a `lock` file that only its owner deletes: a
    # process killed mid-build (a server stopped in its first seconds) leaves it behind, and
    # every later load then waits for it forever. An flock is released by the kernel when
    # its holder dies, so while we hold one, a `lock` file can only be such a leftover.
    with open(directory / "tokenmill.flock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        (directory / "lock").unlink(missing_ok=True)
        cpp_extension.load(
            name="tokenmill_cpu",
            sources=[str(s) for s in _SOURCES],
            extra_cflags=_CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            is_python_module=False,
        )
    torch.library.register_fake("tokenmill::int8_packed_linear")(_int8_packed_linear_fake)
    torch.library.register_fake("tokenmill::paged_decode_attention")(_like_q)
    torch.library.register_fake("tokenmill::paged_prefill_attention")(_like_q)
    torch.library.register_fake("tokenmill::store_kv")(_nothing)
    torch.library.register_fake("tokenmill::add_rms_norm")(_like_x_and_residual)
    torch.library.register_fake("tokenmill::rotary_heads")(_rotary_heads_fake)
    torch.library.register_fake("tokenmill::silu_and_mul")(_silu_and_mul_fake)
    torch.library.register_fake("tokenmill::decode_layers")(_like_x_and_residual)
    logger.info("C++ kernels ready after %.1f s", time.perf_counter() - start)


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
    return torch.ops.tokenmill.paged_decode_attention(
        q, k_cache, v_cache, block_tables, context_lens, scale
    )


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
    return torch.ops.tokenmill.paged_prefill_attention(
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
    torch.ops.tokenmill.store_kv(key, value, k_cache, v_cache, slot_mapping)


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
    return torch.ops.tokenmill.add_rms_norm(x, residual, weight, input_scale, eps)


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
    return torch.ops.tokenmill.rotary_heads(
        qkv, q_norm, k_norm, positions, rope_cache, num_heads, num_kv_heads, eps
    )


def silu_and_mul(gate_up: torch.Tensor, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`kernels.silu_and_mul` in C++, float32, times ``input_scale`` where given."""
    return torch.ops.tokenmill.silu_and_mul(gate_up, input_scale)


def decode_layers(
    x: torch.Tensor,
    residual: torch.Tensor,
    positions: torch.Tensor,
    rope_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    slot_mapping: torch.Tensor,
    weights: list[torch.Tensor | None],
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
    num_heads: int,
    eps: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernels.reference.decode_layers` in C++ (kernels/csrc/decode_layers.cpp): every layer
    of a decode step in one call, on the ops above. float32 activations, w8a8 linears packed
    by `pack_int8_vnni`."""
    return torch.ops.tokenmill.decode_layers(
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
