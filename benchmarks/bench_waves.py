"""The serving benchmark's 16-stream workload in process: where a wave's time goes.

    TOKENMILL_CPU_ISA=avx2 python benchmarks/bench_waves.py --waves 4
    perf record -D -1 --control fifo:/tmp/ctl -- python benchmarks/bench_waves.py \\
        --perf-control /tmp/ctl --perf-phase prefill

A closed loop of C streams whose requests all take the same number of tokens moves in
waves: C prompts arrive together, one prefill step takes them all, then every decode step
serves all C until they finish together. This runs such waves through `LLM.step` with
`bench_serving.py`'s prompts (`--tokens` each, greedy, ignore_eos) and prints, per wave,
its time and output rate, its prefill step, its mean decode step and the prompt tokens the
prefix cache served. Without HTTP, an event loop or a client on the same cores, it shows
what the engine alone can do with the waves the server sees.

`--perf-control` names a perf control FIFO (`perf record --control fifo:PATH`): profiling
is enabled only around the steps of `--perf-phase`.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator

from bench_serving import bench_prompts

from engine import LLM, SamplingParams


@contextlib.contextmanager
def profiled(control, on: bool) -> Iterator[None]:
    """Enable perf for the block when `on` (and a control FIFO is open)."""
    if control is None or not on:
        yield
        return
    control.write("enable\n")
    control.flush()
    try:
        yield
    finally:
        control.write("disable\n")
        control.flush()


def run_wave(llm: LLM, prompts: list[str], params: SamplingParams, args, control) -> str:
    engine = llm.engine
    ids = []
    for i, prompt in enumerate(prompts):
        request_id = f"{time.monotonic_ns()}-{i}"
        ids.append(request_id)
        chat = [{"role": "user", "content": prompt}]
        engine.add_request(request_id, llm.tokenizer.encode_chat(chat), params)
    start = time.perf_counter()
    with profiled(control, args.perf_phase == "prefill"):
        step_start = time.perf_counter()
        outputs = engine.step()
        prefill = time.perf_counter() - step_start
    cached = sum(out.num_cached_tokens for out in outputs)
    decode_steps = []
    with profiled(control, args.perf_phase == "decode"):
        while engine.has_unfinished_requests():
            step_start = time.perf_counter()
            engine.step()
            decode_steps.append(time.perf_counter() - step_start)
    wall = time.perf_counter() - start
    rate = len(prompts) * args.tokens / wall
    return (
        f"{wall * 1e3:.0f} ms, {rate:.1f} tok/s; prefill {prefill * 1e3:.0f} ms "
        f"({cached} prompt tokens cached); {len(decode_steps)} decode steps, mean "
        f"{statistics.mean(decode_steps) * 1e3:.2f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--streams", type=int, default=16, help="prompts per wave")
    ap.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    ap.add_argument("--waves", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--perf-control", default=None, metavar="FIFO")
    ap.add_argument("--perf-phase", choices=["prefill", "decode"], default="decode")
    args = ap.parse_args()

    llm = LLM(args.model, num_threads=args.threads)
    llm.engine.wait_for_compile()
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    prompts = bench_prompts()
    control = open(args.perf_control, "w") if args.perf_control else None  # noqa: SIM115
    try:
        for wave in range(args.waves):
            first = wave * args.streams
            chunk = [prompts[(first + i) % len(prompts)] for i in range(args.streams)]
            print(f"wave {wave}: {run_wave(llm, chunk, params, args, control)}", flush=True)
    finally:
        if control is not None:
            control.close()


if __name__ == "__main__":
    main()
