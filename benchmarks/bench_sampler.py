"""Time one Sampler call for the batch shapes the engine sees every decode step.

    python benchmarks/bench_sampler.py [--vocab 49152] [--rows 1 32 256] [--device cpu]
        [--dtype float32] [--threads N]

"greedy" is the all-greedy fast path; "sampled" is plain temperature sampling; "mixed" gives
each row a different blend of the expensive features (top-p sort, top-k, min-p, penalties over
a 512-token prompt and 128 output tokens, seeds, logprobs) to bound the worst realistic step.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from engine.sampler import Sampler, SamplingRow, make_generator
from engine.sampling_params import SamplingParams

PROMPT_LEN = 512
OUTPUT_LEN = 128


def mixed_params(i: int) -> SamplingParams:
    """Cycle through feature combinations so every code path runs in one batch."""
    choices = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, top_p=0.9),
        SamplingParams(temperature=0.7, top_k=50),
        SamplingParams(temperature=1.0, min_p=0.05, seed=i),
        SamplingParams(temperature=0.6, top_p=0.95, top_k=40, repetition_penalty=1.1),
        SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.3, logprobs=5),
    ]
    return choices[i % len(choices)]


def make_rows(kind: str, n: int, vocab: int) -> list[SamplingRow]:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        params = {
            "greedy": SamplingParams(temperature=0.0),
            "sampled": SamplingParams(temperature=0.8),
            "mixed": mixed_params(i),
        }[kind]
        prompt = [rng.randrange(vocab) for _ in range(PROMPT_LEN)]
        output = [rng.randrange(vocab) for _ in range(OUTPUT_LEN)]
        rows.append(SamplingRow(params, prompt, output, make_generator(params.seed)))
    return rows


def time_call(sampler: Sampler, logits: torch.Tensor, rows: list[SamplingRow]) -> float:
    """Median milliseconds per call over enough repeats to take about half a second."""
    sampler(logits, rows)  # warm-up
    times = []
    deadline = time.perf_counter() + 0.5
    while len(times) < 3 or time.perf_counter() < deadline:
        if logits.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        sampler(logits, rows)  # returns Python lists, so the call is synchronous
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    sampler = Sampler()
    dtype = getattr(torch, args.dtype)
    threads = torch.get_num_threads()
    print(f"vocab={args.vocab} device={args.device} dtype={args.dtype} threads={threads}")
    print(f"{'rows':>5} {'greedy ms':>10} {'sampled ms':>11} {'mixed ms':>9}")
    for n in args.rows:
        logits = torch.randn(n, args.vocab, device=args.device).mul_(4).to(dtype)
        ms = [
            time_call(sampler, logits, make_rows(k, n, args.vocab))
            for k in ("greedy", "sampled", "mixed")
        ]
        print(f"{n:>5} {ms[0]:>10.3f} {ms[1]:>11.3f} {ms[2]:>9.3f}")


if __name__ == "__main__":
    main()
