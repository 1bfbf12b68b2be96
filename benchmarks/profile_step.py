"""Profile the engine's decode steps: where does a step's time go?

    python benchmarks/profile_step.py --batch 1 --threads 1
    python benchmarks/profile_step.py --batch 32 --threads 2 --dtype bfloat16

Prefills `--batch` chat prompts, then profiles `--steps` decode steps with cProfile and
prints ms/step plus the share of the hottest functions. Run it on an otherwise idle
machine: on two cores another busy process distorts multi-threaded ops badly.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from engine import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()

    llm = LLM(args.model, dtype=args.dtype, num_threads=args.threads)
    llm.engine.wait_for_compile()
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=args.steps + 1, ignore_eos=True)
    for i in range(args.batch):
        chat = [{"role": "user", "content": f"Write an essay about topic number {i}."}]
        engine.add_request(str(i), llm.tokenizer.encode_chat(chat), params)
    engine.step()  # the prefill
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    while engine.has_unfinished_requests():
        engine.step()
    profile.disable()
    per_step = (time.perf_counter() - start) / args.steps
    print(
        f"batch {args.batch}, {args.threads} thread(s), {args.dtype}: "
        f"{per_step * 1e3:.1f} ms/step (profiled), {args.batch / per_step:.0f} tok/s"
    )
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
