"""Decode throughput with every request under a JSON schema, against unconstrained, in one run.

    python benchmarks/bench_structured.py [--streams 16] [--tokens 96] [--rounds 3]

One engine (the default model and settings, timed once its compile step is done) runs
alternating rounds of `--streams` concurrent requests: unconstrained ones (ignore_eos, so
each writes exactly `--tokens`), then ones under a JSON schema that cannot close within
`--tokens` (an array of at least 64 strings), so both kinds keep all streams busy for the
whole round. It prints each kind's output tok/s over all its rounds, their ratio, and the
grammar-mask time per step: computed on the worker thread, and what the engine thread still
waited for after its forward pass (the only part on the critical path).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # a sibling script's prompts
from bench_serving import bench_prompts

from engine import LLM, SamplingParams
from engine.structured_output import StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "notes": {"type": "array", "items": {"type": "string"}, "minItems": 64},
    },
    "required": ["title", "notes"],
    "additionalProperties": False,
}


def _round(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[int, float]:
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs), elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--tokens", type=int, default=96, help="output tokens per request")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each kind, alternating")
    p.add_argument("--compile", default="auto", help="the engine's compile mode")
    args = p.parse_args()

    llm = LLM(args.model, compile=args.compile)
    print(f"compile: {llm.engine.wait_for_compile()}")
    texts = (bench_prompts() * args.streams)[: args.streams]
    prompts = [
        llm.tokenizer.encode_chat([{"role": "user", "content": f"{t} Answer in JSON."}])
        for t in texts
    ]
    free = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    constrained = SamplingParams(
        temperature=0,
        max_tokens=args.tokens,
        structured_outputs=StructuredOutputsParams(json=SCHEMA),
    )
    _round(llm, prompts[:2], constrained)  # warm-up: llguidance's tokenizer, caches
    times = llm.engine.runner.grammar_masks.times
    base_steps, base_compute, base_wait = times.num_steps, times.compute_s, times.wait_s
    totals = {"unconstrained": [0, 0.0], "json schema": [0, 0.0]}
    for _ in range(args.rounds):
        for name, params in (("unconstrained", free), ("json schema", constrained)):
            tokens, elapsed = _round(llm, prompts, params)
            totals[name][0] += tokens
            totals[name][1] += elapsed
    rate = {name: tokens / elapsed for name, (tokens, elapsed) in totals.items()}
    steps = times.num_steps - base_steps
    print(f"{args.streams} streams x {args.tokens} tokens, {args.rounds} rounds of each kind")
    for name, (tokens, elapsed) in totals.items():
        print(f"  {name:14s} {tokens:6d} tokens in {elapsed:6.1f} s: {rate[name]:6.1f} tok/s")
    print(f"  ratio json schema / unconstrained: {rate['json schema'] / rate['unconstrained']:.3f}")
    print(
        f"  mask time per step ({steps} steps): "
        f"{(times.compute_s - base_compute) / steps * 1e3:.3f} ms computed on the worker, "
        f"{(times.wait_s - base_wait) / steps * 1e3:.3f} ms waited for by the engine thread"
    )


if __name__ == "__main__":
    main()
