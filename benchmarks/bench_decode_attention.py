"""Decode attention of one step of SmolLM2-135M's 30 layers, per C++ kernel target.

    python benchmarks/bench_decode_attention.py
    python benchmarks/bench_decode_attention.py --seqs 16 --context 170 --threads 1

Every layer gets its own bfloat16 K/V cache, laid out as the engine's pool fills it (each
sequence's prompt blocks together, then its decode blocks interleaved with the other
sequences'), so the K/V come from memory as they do in a real step: with one cache shared
by all 30 calls they would sit in L2 and the kernel would look several times faster.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kernels.native

LAYERS, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 30, 9, 3, 64, 16
PROMPT_BLOCKS = 8  # a ~128-token prompt's blocks, allocated together


def block_tables(seqs: int, blocks: int) -> torch.Tensor:
    """Prompt blocks contiguous per sequence, later blocks round-robin across sequences."""
    tables = torch.zeros(seqs, blocks, dtype=torch.int32)
    ids = iter(range(seqs * blocks))
    for s in range(seqs):
        for b in range(min(blocks, PROMPT_BLOCKS)):
            tables[s, b] = next(ids)
    for b in range(PROMPT_BLOCKS, blocks):
        for s in range(seqs):
            tables[s, b] = next(ids)
    return tables


def step_ms(isa: str, seqs: int, context: int, pool: int, repeats: int) -> float:
    attention = kernels.native.ops(isa).paged_decode_attention
    shape = (pool, BLOCK, KV_HEADS, HEAD_DIM)
    caches = [(torch.randn(shape).bfloat16(), torch.randn(shape).bfloat16()) for _ in range(LAYERS)]
    tables = block_tables(seqs, -(-context // BLOCK))
    lens = torch.full((seqs,), context, dtype=torch.int32)
    q = torch.randn(seqs, HEADS, HEAD_DIM)
    times = []
    for i in range(repeats + 3):  # three passes warm up
        start = time.perf_counter()
        for k, v in caches:
            attention(q, k, v, tables, lens, HEAD_DIM**-0.5)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--context", type=int, default=170, help="positions per sequence")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pool", type=int, default=2048, help="blocks per layer's cache")
    p.add_argument("--repeats", type=int, default=40)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    kv_bytes = LAYERS * args.seqs * args.context * KV_HEADS * HEAD_DIM * 2 * 2
    print(
        f"{args.seqs} sequences x {args.context} positions, {LAYERS} layers, "
        f"{args.threads} thread(s); {kv_bytes / 1e6:.0f} MB of K/V a step"
    )
    for isa in kernels.native.runnable_isas():
        ms = step_ms(isa, args.seqs, args.context, args.pool, args.repeats)
        print(f"{isa}: {ms:.2f} ms a step (median), {kv_bytes / ms / 1e6:.1f} GB/s")


if __name__ == "__main__":
    main()
