"""The CPU path per instruction set: which quantization and compile mode `EngineArgs`'s
"auto" picks on this CPU, and why.

Each choice is the fastest mode measured through the server on that instruction set
(docs/performance.md has the figures): a mode that is fast on one CPU can be the slowest on
another. ATen's int8 GEMM (`torch._int_mm`), for one, runs at a few GOP/s without AVX-512
VNNI, slower than float32, so w8a8 is the default only where tokenmill's own int8 GEMM runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import kernels.native


@dataclass(frozen=True)
class CpuPath:
    """What the CPU path runs: the kernel target (`kernels.native.cpu_isa`) and the defaults
    chosen for it, with the reason, for the start-up log and the server's /health."""

    isa: str  # the kernel target in use
    detected_isa: str  # the fastest target this CPU runs
    forced: bool  # set by $TOKENMILL_CPU_ISA
    features: dict[str, bool]  # kernels.native.cpu_features
    quantization: str  # EngineArgs' "auto"
    compile: str  # EngineArgs' "auto"
    reason: str

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


# target -> (quantization, compile, why), the measured fastest of the modes on that target.
_DEFAULTS = {
    "avx512_vnni": (
        "w8a8",
        "background",
        "int8 x int8 GEMM on AVX-512 VNNI and the one-call C++ decode stack: the fastest mode "
        "measured on this instruction set",
    ),
    "avx_vnni": (
        "w8a8",
        "background",
        "int8 x int8 GEMM on AVX-VNNI (vpdpbusd on ymm) and the one-call C++ decode stack: "
        "the AVX2 target's mode, with a GEMM of one instruction per 32 multiply-adds",
    ),
    "avx2": (
        "w8a8",
        "background",
        "int8 x int8 GEMM on AVX2 (vpmaddubsw; weights in [-64, 64], activations in "
        "[-63, 63]) and the one-call C++ decode stack: the fastest mode measured on this "
        "instruction set, ahead of float32",
    ),
    "generic": (
        "none",
        "off",
        "no AVX2: float32 on ATen's GEMM (MKL or OpenBLAS) is the fastest mode measured "
        "without vector int8 kernels",
    ),
}


def cpu_path() -> CpuPath:
    """The CPU path for this process (raises ValueError for a bad $TOKENMILL_CPU_ISA)."""
    isa = kernels.native.cpu_isa()
    detected = kernels.native.detected_isa()
    quantization, compile_mode, reason = _DEFAULTS[isa]
    return CpuPath(
        isa=isa,
        detected_isa=detected,
        forced=isa != detected,
        features=kernels.native.cpu_features(),
        quantization=quantization,
        compile=compile_mode,
        reason=reason,
    )
