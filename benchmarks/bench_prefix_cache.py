"""Cost per operation of the radix prefix cache and the block manager at scale.

Fills the cache with `--conversations` conversations of about `--tokens` tokens each (all
opening with one shared system prompt, as a chat server sees them), then times the calls
the scheduler makes: `match_prefix` for a hit, a system-prompt-only hit and a miss,
`insert` of a new conversation and of a conversation's next turn, `evict`, and a request's
round trip through `BlockManager`. Pure Python on one CPU core; no model involved.

    python benchmarks/bench_prefix_cache.py                       # 10,000 x ~2,000 tokens
    python benchmarks/bench_prefix_cache.py --conversations 1000  # quicker

Each figure is the mean, median and 99th percentile of per-call wall time.
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.block_manager import BlockManager
from engine.radix_cache import RadixCache


def _timed(fn: Callable[[int], object], n: int) -> list[float]:
    """Microseconds taken by each of `fn(0) ... fn(n - 1)`."""
    out = []
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        fn(i)
        out.append((clock() - t0) / 1e3)
    return out


def _report(name: str, us: Sequence[float], per: str = "op") -> None:
    ordered = sorted(us)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    print(
        f"  {name:<44} mean {statistics.fmean(us):9.1f} us   p50 {ordered[len(ordered) // 2]:9.1f}"
        f" us   p99 {p99:9.1f} us   ({len(us)} {per}s)"
    )


def bench_radix_cache(convs: list[list[int]], workload: dict, bs: int) -> None:
    """Time RadixCache calls on a tree holding every conversation (fake block ids)."""
    cache = RadixCache(bs)
    ids = itertools.count()

    def insert(conv: list[int]) -> None:
        cache.insert(conv, [next(ids) for _ in range(len(conv) // bs)])

    print("\nRadixCache")
    _report(
        "insert new conversation (while filling)", _timed(lambda i: insert(convs[i]), len(convs))
    )
    print(f"  -> {cache.num_cached_blocks} cached blocks, {sum(1 for _ in cache.nodes())} nodes")
    turns, fresh, misses, nexts = (workload[k] for k in ("turns", "fresh", "misses", "nexts"))
    q = len(turns)
    _report(
        "match_prefix, hit (~2,000 tokens + new turn)",
        _timed(lambda i: cache.match_prefix(turns[i]), q),
    )
    _report("match_prefix, system prompt only", _timed(lambda i: cache.match_prefix(fresh[i]), q))
    _report("match_prefix, miss", _timed(lambda i: cache.match_prefix(misses[i]), q))
    _report("insert next turn (+264 tokens)", _timed(lambda i: insert(nexts[i]), q))
    _report("insert new conversation (full cache)", _timed(lambda i: insert(fresh[i]), q))
    _report(f"evict {bs} blocks (LRU leaves)", _timed(lambda i: cache.evict(bs), q))
    print(
        f"  counters: {cache.num_queries} queries, hit rate "
        f"{cache.num_hit_tokens / cache.num_query_tokens:.1%}, "
        f"{cache.num_evicted_blocks} evicted blocks"
    )


def bench_block_manager(convs: list[list[int]], turns: list[list[int]], bs: int) -> None:
    """Time the BlockManager calls one request and one scheduler step make."""
    print("\nBlockManager (pool holds every conversation plus 1,000 running requests)")
    longest = max(map(len, turns)) + 128
    bm = BlockManager(sum(-(-len(c) // bs) for c in convs) + 1_000 * -(-longest // bs), bs)
    seq = itertools.count()

    def prefill_and_finish(conv: list[int]) -> None:
        sid = next(seq)
        bm.allocate(sid, conv)
        bm.cache(sid, conv)
        bm.free(sid)

    _report(
        "allocate + cache + free (while filling)",
        _timed(lambda i: prefill_and_finish(convs[i]), len(convs)),
    )
    print(f"  -> usage {bm.usage:.1%}, {bm.num_evictable_blocks} evictable blocks")
    n = min(256, len(turns))
    running = [next(seq) for _ in range(n)]
    _report(
        "can_allocate (next turn, hit)", _timed(lambda i: bm.can_allocate(turns[i]), len(turns))
    )
    _report("allocate (next turn, hit)", _timed(lambda i: bm.allocate(running[i], turns[i]), n))
    lengths = [len(turns[i]) for i in range(n)]

    def decode_step(i: int) -> None:
        for sid, length in zip(running, lengths, strict=True):
            bm.ensure(sid, length + i + 1, length + i)

    _report(f"ensure, {n} running sequences", _timed(decode_step, 64), "step")
    done = [turns[i] + [0] * 64 for i in range(n)]
    _report("cache (finished turn)", _timed(lambda i: bm.cache(running[i], done[i]), n))
    _report("free", _timed(lambda i: bm.free(running[i]), n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conversations", type=int, default=10_000)
    ap.add_argument("--tokens", type=int, default=2_000, help="mean conversation length")
    ap.add_argument("--system-prompt", type=int, default=256, help="shared prefix length")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--queries", type=int, default=2_000, help="timed calls per operation")
    ap.add_argument("--vocab", type=int, default=32_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    vocab = list(range(args.vocab))

    def tokens(n: int) -> list[int]:
        return rng.choices(vocab, k=n)

    system = tokens(args.system_prompt)
    lo, hi = int(args.tokens * 0.9), int(args.tokens * 1.1)
    convs = [system + tokens(rng.randint(lo, hi) - len(system)) for _ in range(args.conversations)]
    total = sum(map(len, convs))
    print(
        f"{len(convs)} conversations, {total / len(convs):.0f} tokens each on average "
        f"({total / 1e6:.1f} M tokens), shared system prompt of {len(system)}, "
        f"block size {args.block_size}"
    )
    turns = [convs[rng.randrange(len(convs))] + tokens(64) for _ in range(args.queries)]
    workload = {
        "turns": turns,  # a conversation's next user turn
        "nexts": [t + tokens(200) for t in turns],  # ... once the reply is generated
        "fresh": [system + tokens(args.tokens - len(system)) for _ in range(args.queries)],
        "misses": [tokens(args.tokens) for _ in range(args.queries)],
    }
    bench_radix_cache(convs, workload, args.block_size)
    bench_block_manager(convs, turns, args.block_size)


if __name__ == "__main__":
    main()
