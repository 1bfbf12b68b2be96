"""Matmul time of one decode step of SmolLM2-135M's 30 layers, per weight format and row count.

    python benchmarks/bench_linear.py                 # all formats, 2 threads
    python benchmarks/bench_linear.py --threads 1 --rows 1 16 --formats float32 int8
    python benchmarks/bench_linear.py --rows 16 --formats int8-cpp-avx2 --shared-weights

Every layer gets its own random weights, as in the model, so they are cold in cache when a
step reaches them: with one shared weight per shape the whole working set sits in L2 and
the memory-bound formats look several times faster than they are. This is the measurement
behind `engine.linear`'s choices (docs/performance.md). `--shared-weights` times both:
against one layer's weights serving all 30, what the weights' trip from memory costs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch

import kernels
import kernels.native
from engine.linear import INT4_GROUP, quantize_int4, quantize_int8
from kernels import cpu_ops

# (out, in) of the fused qkv, o, gate_up and down projections.
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
LAYERS = 30

Prepared = object
Runner = Callable[[torch.Tensor, Prepared], torch.Tensor]


def _int8(w: torch.Tensor) -> Prepared:
    return quantize_int8(w)


def _int8_vnni(w: torch.Tensor, isa: str) -> Prepared:
    """w8a8's weights as `isa`'s GEMM takes them: codes in its range, then packed."""
    q, scale = quantize_int8(w, kernels.native.int8_weight_range(isa)[1])
    return (*kernels.reference.pack_int8_vnni(q), scale.float())


def _int4(w: torch.Tensor) -> Prepared:
    q, scales_zeros = quantize_int4(w)
    return cpu_ops.pack_int4(q), scales_zeros


FORMATS: dict[str, tuple[Callable[[torch.Tensor], Prepared], Runner, torch.dtype]] = {
    "float32": (lambda w: w.t().contiguous(), torch.mm, torch.float32),
    "bfloat16": (lambda w: w.bfloat16().t().contiguous(), torch.mm, torch.bfloat16),
    "int8": (_int8, lambda x, p: cpu_ops.int8_linear(x, *p), torch.float32),
    "int8-dynamic": (_int8, lambda x, p: cpu_ops.int8_dynamic_linear(x, *p), torch.float32),
    "int4": (_int4, lambda x, p: cpu_ops.int4_linear(x, *p, INT4_GROUP), torch.float32),
}
# the same math as int8-dynamic in tokenmill's C++ kernel (kernels/csrc/int8_gemm.cpp), once
# per instruction set this CPU runs
for _isa in kernels.native.runnable_isas():
    FORMATS[f"int8-cpp-{_isa}"] = (
        partial(_int8_vnni, isa=_isa),
        lambda x, p, isa=_isa: kernels.native.ops(isa).int8_packed_linear(x, *p),
        torch.float32,
    )


def step_ms(
    fmt: str, rows: int, repeats: int, shared: bool = False, clock=time.perf_counter
) -> float:
    """The best of `repeats` steps through 30 layers of `fmt` at `rows` rows: each layer's
    own weights, or (`shared`) the first layer's serving all 30, timed by `clock`."""
    prepare, run, dtype = FORMATS[fmt]
    kept = 1 if shared else LAYERS
    layers = [[prepare(torch.randn(n, k) * 0.02) for n, k in SHAPES] for _ in range(kept)]
    layers *= LAYERS // kept
    inputs = [torch.randn(rows, k).to(dtype) for _, k in SHAPES]
    best = float("inf")
    for i in range(repeats + 1):
        start = clock()
        for weights in layers:
            for x, w in zip(inputs, weights, strict=True):
                run(x, w)
        if i:  # the first pass warms up
            best = min(best, clock() - start)
    return best * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--repeats", type=int, default=4, help="timed passes; the best is kept")
    p.add_argument(
        "--shared-weights",
        action="store_true",
        help="also time each format with one layer's weights serving all 30 (in cache)",
    )
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="time the calling thread's CPU instead of the wall clock (one thread only): "
        "a measure that other work on a busy machine leaves nearly unchanged",
    )
    args = p.parse_args()
    if args.cpu_time and args.threads != 1:
        p.error("--cpu-time needs --threads 1: the other threads' CPU is not counted")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    print(f"ms per step (30 layers), {args.threads} thread(s)")
    print("| format | weights | " + " | ".join(f"{m} rows" for m in args.rows) + " |")
    print("| --- | --- |" + " --- |" * len(args.rows))
    for fmt in args.formats:
        for shared in (False, True) if args.shared_weights else (False,):
            cells = [f"{step_ms(fmt, m, args.repeats, shared, clock):.1f}" for m in args.rows]
            where = "one layer's, shared" if shared else "each layer's own"
            print(f"| {fmt} | {where} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
