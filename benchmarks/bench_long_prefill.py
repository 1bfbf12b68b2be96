"""Requests around a long prompt's prefill: a short prompt arriving behind it, and a stream
already decoding beside it.

    TOKENMILL_CPU_ISA=avx2 python benchmarks/bench_long_prefill.py --tokens 2000 4000 \\
        --thresholds 0 256 512

One engine (`LLM`, default options) runs, for each prompt length and in turn for each
`long_prefill_token_threshold` (the scheduler's cap on a prompt's chunk a step; 0: only the
step's budget): a stream that is decoding, then a fresh long prompt of random token ids,
then after the long prompt's first step a fresh 64-token prompt, all greedy. It prints the
short prompt's time to first token from its arrival, the long prompt's from its own, and
the stream's longest wait between two tokens meanwhile. The thresholds alternate within
each repeat, so that they are compared on the same machine state; a first round is
discarded (warm-up). `--flat` adds, for each threshold, a round with the cap the same at
every context (`Scheduler.chunk_limit` shrinks it past a context of the step budget).
"""

from __future__ import annotations

import argparse
import random
import time
import types
from dataclasses import dataclass

from engine import LLM, SamplingParams


@dataclass
class Round:
    short_ttft: float  # seconds from the short prompt's arrival to its first token
    long_ttft: float  # from the long prompt's arrival to its first token
    stream_gap: float  # the decoding stream's longest wait for a token meanwhile


def run_round(llm: LLM, long_len: int, rng: random.Random) -> Round:
    engine = llm.engine
    vocab = engine.model_config.vocab_size

    def prompt(n: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(n)]

    once = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    tag = rng.randrange(10**9)
    stream = f"stream-{tag}"
    engine.add_request(stream, prompt(64), SamplingParams(max_tokens=100_000, ignore_eos=True))
    engine.step()  # the stream's prefill
    start = last_token = time.perf_counter()
    engine.add_request(f"long-{tag}", prompt(long_len), once)
    done: dict[str, float] = {}
    arrival, gap = None, 0.0
    while "long" not in done or "short" not in done:
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.request_id == stream:
                gap, last_token = max(gap, now - last_token), now
            elif out.finished:
                done[out.request_id.split("-")[0]] = now
        if arrival is None:
            arrival = time.perf_counter()
            engine.add_request(f"short-{tag}", prompt(64), once)
    engine.abort_request(stream)
    return Round(done["short"] - arrival, done["long"] - start, gap)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tokens", type=int, nargs="+", default=[2000, 4000])
    p.add_argument("--thresholds", type=int, nargs="+", default=[0, 256])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--flat", action="store_true", help="also each threshold unscaled")
    args = p.parse_args()
    llm = LLM(args.model)
    llm.engine.wait_for_compile()
    scheduler = llm.engine.scheduler
    scaled = scheduler.chunk_limit
    flat = types.MethodType(lambda self, computed: self.long_prefill_token_threshold, scheduler)
    variants = [("", scaled)] + ([(" flat", flat)] if args.flat else [])
    rng = random.Random(0)
    run_round(llm, 512, rng)  # warm-up
    print(
        "| long prompt tokens | threshold | short prompt's TTFT (s) | long prompt's TTFT (s) "
        "| stream's longest token gap (s) |"
    )
    print("| --- | --- | --- | --- | --- |")
    for n in args.tokens:
        for _ in range(args.repeats):
            for threshold in args.thresholds:
                for label, limit in variants if threshold else variants[:1]:
                    scheduler.long_prefill_token_threshold = threshold
                    scheduler.chunk_limit = limit
                    r = run_round(llm, n, rng)
                    print(
                        f"| {n} | {threshold}{label} | {r.short_ttft:.2f} | {r.long_ttft:.2f} "
                        f"| {r.stream_gap:.2f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
