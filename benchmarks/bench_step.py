"""Decode-step time of the engine, eager against compiled, side by side in one process.

    python benchmarks/bench_step.py                      # 1, 4, 16 and 32 sequences
    python benchmarks/bench_step.py --batch 16 --context 400

Two engines on the same model: `compile="off"` (ATen kernels, eager blocks; with
`--eager-quantization none`, float32, the baseline every CPU default must beat) and the
default (on AVX-512 VNNI and AVX2 `compile_model`: the C++ kernels and layers of
engine/native_layers.py), timed once its compile is done. `TOKENMILL_CPU_ISA=avx2` runs the
AVX2 kernels on an AVX-512 machine. Each batch is the serving benchmark's prompts, decoded until the
contexts reach about `--context` tokens; then both engines step `--steps` times, in
alternating rounds so that machine noise hits both alike, and the median round is kept.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # a sibling script's prompts
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages
from bench_serving import bench_prompts

from engine import LLM, SamplingParams


def _fill(llm: LLM, batch: int, context: int, steps: int) -> None:
    """Start `batch` requests and decode until every context holds `context` tokens; each
    may then take `steps` more."""
    params = SamplingParams(temperature=0, max_tokens=context + steps, ignore_eos=True)
    engine = llm.engine
    for i, text in enumerate(bench_prompts()[:batch]):
        prompt = llm.tokenizer.encode_chat([{"role": "user", "content": text}])
        engine.add_request(str(i), prompt, params)
    while min(s.num_tokens for r in engine.requests.values() for s in r.seqs) < context:
        engine.step()


def _round(llm: LLM, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        llm.engine.step()
    return (time.perf_counter() - start) / steps * 1e3


def _clear(llm: LLM) -> None:
    for request_id in list(llm.engine.requests):
        llm.engine.abort_request(request_id)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--context", type=int, default=200, help="tokens per sequence when timed")
    p.add_argument("--steps", type=int, default=10, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--eager-quantization", default="auto", help="the eager engine's mode")
    args = p.parse_args()
    eager = LLM(
        args.model, compile="off", quantization=args.eager_quantization, num_threads=args.threads
    )
    compiled = LLM(args.model, num_threads=args.threads)
    print(f"compile: {compiled.engine.wait_for_compile()}; CPU path: {compiled.engine.cpu_info}")
    print(f"eager: quantization {eager.engine.quantization}")
    print(f"ms per decode step, contexts ~{args.context} tokens, {args.threads} threads")
    print("| sequences | eager | compiled | speed-up |")
    print("| ---: | ---: | ---: | ---: |")
    for batch in args.batch:
        for llm in (eager, compiled):
            _fill(llm, batch, args.context, args.steps * args.rounds)
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(args.rounds):
            times["eager"].append(_round(eager, args.steps))
            times["compiled"].append(_round(compiled, args.steps))
        e, c = (statistics.median(times[k]) for k in ("eager", "compiled"))
        print(f"| {batch} | {e:.1f} | {c:.1f} | {e / c:.2f}x |", flush=True)
        for llm in (eager, compiled):
            _clear(llm)


if __name__ == "__main__":
    main()
