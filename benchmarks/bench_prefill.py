"""Prefill rate: prompt tokens per second of one long prompt, the llama-bench `pp` figure.

    python benchmarks/bench_prefill.py                      # default options, 128 and 512
    python benchmarks/bench_prefill.py --tokens 512 --option dtype=float32
    python benchmarks/bench_prefill.py --tokens 8000 --option long_prefill_token_threshold=0

Each prompt is fresh random token ids (prefix caching off), generated with `max_tokens=1`
through `LLM.generate`; the best of `--repeats` runs is kept. Compare with llama.cpp's
`llama-bench -t <cores> -p 512` on the same machine.
"""

from __future__ import annotations

import argparse
import ast
import random
import time

from engine import LLM, SamplingParams


def _value(text: str) -> object:
    """An option's value: a Python literal (a number, None, True) where it reads as one."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 512])
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an engine option, e.g. dtype=float32 or quantization=int8",
    )
    args = p.parse_args()
    options = {name: _value(text) for name, text in (o.split("=", 1) for o in args.option)}
    llm = LLM(args.model, enable_prefix_caching=False, **options)
    llm.engine.wait_for_compile()
    rng = random.Random(0)
    vocab = llm.engine.model_config.vocab_size
    print("| prompt tokens | best ms | tok/s |")
    print("| --- | --- | --- |")
    for n in args.tokens:
        best = float("inf")
        for _ in range(args.repeats):
            ids = [rng.randrange(100, vocab) for _ in range(n)]
            start = time.perf_counter()
            llm.generate(ids, SamplingParams(max_tokens=1), use_tqdm=False)
            best = min(best, time.perf_counter() - start)
        print(f"| {n} | {best * 1e3:.0f} | {n / best:.0f} |", flush=True)


if __name__ == "__main__":
    main()
