"""What an abusive client does to everyone else's latency (issue 21).

One command starts `python -m engine.serve`, then measures the same closed-loop load of
normal streaming chat requests (`loadgen.run_requests`) alone and while abusive clients
send, back to back, the largest prompts the server's checks let through, in `--rounds`
rounds of the two phases (in alternating order; each condition's samples pooled):

  * a completions prompt of exactly the server's character limit (16 per token of the
    context window by default), made of varied words so it tokenizes to several times
    the window: it is parsed, tokenized on a worker thread, then refused with 400;
  * a chat message of that same size, rendered through the chat template and tokenized
    the same way, then refused;
  * a conversation of as many one-word messages as the body limit holds, refused after
    its parse for having more messages than the window has tokens.

Tokenized on the event loop (holding the GIL), one such prompt would stall every stream
for seconds; the server parses and tokenizes them on worker threads. The figure of merit
is the normal requests' p99 time to first token with the abuse over without it
(target: <= 1.5).
`--fitting` adds a client sending the largest prompt that fits the context window, which
is real work the engine must do (chunked prefill), not abuse the server can refuse.

    python benchmarks/bench_abuse.py                  # default model, 4 streams
    python benchmarks/bench_abuse.py --rounds 6 --requests 64 --abusers 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages
import loadgen
from bench_serving import free_port, running_server, serve_argv, served_model

from server.prep_process import lowest_priority

WORDS = (
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
)


@dataclass
class AbuseStats:
    sent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)


def words(chars: int, seed: int) -> str:
    rng = random.Random(seed)
    text = ""
    while len(text) < chars:
        text += " ".join(rng.choice(WORDS) for _ in range(64)) + " "
    return text[:chars]


def abusive_bodies(
    model: str, max_chars: int, max_model_len: int, body_limit: int, fitting: bool
) -> list[tuple[str, bytes]]:
    """(path, JSON body) of each abusive request kind, encoded once up front."""
    big = words(max_chars, 1)
    count = min(body_limit // 40, 200_000)  # ~35 bytes a message, under the body limit
    kinds = [
        ("/v1/completions", {"model": model, "prompt": big, "max_tokens": 1}),
        (
            "/v1/chat/completions",
            {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": big}]},
        ),
        (
            "/v1/chat/completions",
            {
                "model": model,
                "max_tokens": 1,
                "messages": [{"role": "user", "content": "hi"}] * count,
            },
        ),
    ]
    if fitting:  # about 5 characters a token for these words; stay inside the window
        kinds.append(
            (
                "/v1/completions",
                {"model": model, "prompt": words(4 * (max_model_len - 64), 2), "max_tokens": 1},
            )
        )
    return [(path, json.dumps(body).encode()) for path, body in kinds]


async def abuse(url: str, bodies: list[tuple[str, bytes]], control, stats: AbuseStats) -> None:
    """Send the bodies round-robin, back to back, while the abuse is switched on, until
    it is stopped; `control.busy` counts the requests in flight."""
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        i = 0
        while not control.stop.is_set():
            if not control.active.is_set():
                await asyncio.sleep(0.02)
                continue
            path, body = bodies[i % len(bodies)]
            i += 1
            with control.busy.get_lock():
                control.busy.value += 1
            start = time.perf_counter()
            try:
                response = await client.post(path, content=body, headers=headers)
            finally:
                with control.busy.get_lock():
                    control.busy.value -= 1
            stats.seconds.append(time.perf_counter() - start)
            stats.sent += 1
            stats.statuses[response.status_code] = stats.statuses.get(response.status_code, 0) + 1


@dataclass
class AbuseControl:
    """Switches shared with the abusive process: `active` turns the abuse on and off
    between phases, `busy` counts its requests in flight (so a phase without abuse starts
    only once the last one has been answered), `stop` ends it."""

    active: Any
    stop: Any
    busy: Any
    started: Any

    @classmethod
    def create(cls, context) -> AbuseControl:
        return cls(context.Event(), context.Event(), context.Value("i", 0), context.Event())

    async def pause(self) -> None:
        self.active.clear()
        while self.busy.value:
            await asyncio.sleep(0.02)


def abuse_process(
    url: str, bodies: list[tuple[str, bytes]], clients: int, control: AbuseControl, results
) -> None:
    """The abusive clients in a process of their own at the lowest CPU priority, standing
    in for clients on another machine: in the measuring process their event loop (sending
    megabytes, reading the refusals) would delay the normal requests' own timings, and at
    the server's priority their own CPU time would count against it on a small machine.
    What is measured is the server's work for them. (SCHED_IDLE as well as nice 19: on
    Linux's scheduler a nice-19 process still delays a woken engine thread by tens of
    milliseconds now and then; see server/prep_process.py.)"""
    lowest_priority()

    async def run() -> AbuseStats:
        stats = AbuseStats()
        control.started.set()
        await asyncio.gather(*(abuse(url, bodies, control, stats) for _ in range(clients)))
        return stats

    results.put(asyncio.run(run()))


async def phases(
    load: argparse.Namespace, args: argparse.Namespace, control: AbuseControl
) -> tuple[loadgen.LevelReport, loadgen.LevelReport]:
    """`args.rounds` rounds of a phase alone and a phase with the abuse, in alternating
    order (alone first in even rounds), each condition's requests pooled over the rounds:
    the two conditions share the machine's drift alike, and a p99 over several rounds'
    samples is not just the slowest request of one."""
    pooled: dict[bool, tuple[list, float]] = {False: ([], 0.0), True: ([], 0.0)}
    for round_ in range(args.rounds):
        for abused in (False, True) if round_ % 2 == 0 else (True, False):
            if abused:
                control.active.set()
                await asyncio.sleep(0.5)  # let the abuse start before the measured requests
            first = 100 * (2 * round_ + abused)
            results, seconds = await loadgen.run_requests(load, args.concurrency, first=first)
            await control.pause()
            done, total = pooled[abused]
            pooled[abused] = (done + results, total + seconds)
            report = loadgen.summarize(args.concurrency, results, seconds)
            name = "abused" if abused else "alone"
            print(f"round {round_ + 1} {name}: TTFT p99 {report.ttft_p99_ms} ms", file=sys.stderr)
    alone, abused = (loadgen.summarize(args.concurrency, *pooled[k]) for k in (False, True))
    return alone, abused


async def measure(url: str, args: argparse.Namespace) -> dict:
    model = served_model(url)
    load = loadgen.options_for(url, model, args.max_tokens, "--requests", str(args.requests))
    card = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
    max_model_len = card["max_model_len"]
    max_chars = args.max_prompt_chars or 16 * max_model_len
    bodies = abusive_bodies(model, max_chars, max_model_len, args.body_limit, args.fitting)
    if args.kinds:
        bodies = [bodies[i] for i in args.kinds]
    warmup = argparse.Namespace(**{**vars(load), "requests": args.concurrency})
    await loadgen.run_level(warmup, args.concurrency)  # caches, allocator, threads
    context = multiprocessing.get_context("spawn")
    control, results = AbuseControl.create(context), context.Queue()
    abusers = context.Process(
        target=abuse_process, args=(url, bodies, args.abusers, control, results), daemon=True
    )
    abusers.start()
    await asyncio.to_thread(control.started.wait, 60)
    baseline, abused = await phases(load, args, control)
    control.stop.set()
    stats = results.get(timeout=600)
    abusers.join()
    health = httpx.get(f"{url}/health", timeout=10).status_code
    return {
        "baseline": baseline,
        "abused": abused,
        "abuse": stats,
        "health": health,
        "max_chars": max_chars,
        "max_model_len": max_model_len,
        "abusive_sizes": [len(b) for _, b in bodies],
    }


def report(result: dict, args: argparse.Namespace) -> None:
    base, abused, stats = result["baseline"], result["abused"], result["abuse"]
    ratio = abused.ttft_p99_ms / base.ttft_p99_ms if base.ttft_p99_ms else float("inf")
    print(
        f"server: python -m engine.serve {args.server_args}; context window "
        f"{result['max_model_len']} tokens, prompt limit {result['max_chars']} characters"
    )
    print(
        f"normal load: {args.concurrency} streams, {args.rounds} rounds x {args.requests} "
        f"requests of {args.max_tokens} tokens per condition; {args.abusers} abusive "
        f"client(s), bodies of "
        f"{', '.join(str(s) for s in result['abusive_sizes'])} bytes"
    )
    print()
    print("| run | requests (failed) | TTFT p50 (ms) | TTFT p99 (ms) | ITL p99 (ms) | tok/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in (("normal load alone", base), ("with abusive clients", abused)):
        print(
            f"| {name} | {r.requests} ({r.failed}) | {r.ttft_p50_ms} | {r.ttft_p99_ms} "
            f"| {r.itl_p99_ms} | {r.output_tok_s} |"
        )
    print()
    mean = 1000 * sum(stats.seconds) / len(stats.seconds) if stats.seconds else 0.0
    print(
        f"abusive requests: {stats.sent}, statuses {dict(sorted(stats.statuses.items()))}, "
        f"mean {mean:.0f} ms each"
    )
    print(
        f"p99 TTFT ratio (abused / alone): {ratio:.2f} (target <= 1.5); "
        f"/health afterwards: {result['health']}"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--server-args", default="--compile off", help="extra options for python -m engine.serve"
    )
    p.add_argument("--concurrency", type=int, default=4, help="normal streams")
    p.add_argument("--requests", type=int, default=64, help="normal requests per phase (and round)")
    p.add_argument(
        "--rounds", type=int, default=4, help="rounds of a phase alone and a phase abused"
    )
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--abusers", type=int, default=1, help="abusive clients")
    p.add_argument(
        "--body-limit",
        type=int,
        default=8 * 1024 * 1024,
        help="the server's --max-request-body-bytes (passed to it too)",
    )
    p.add_argument(
        "--max-prompt-chars",
        type=int,
        default=None,
        help="the server's --max-prompt-chars (passed to it too); default: the server's own",
    )
    p.add_argument(
        "--kinds",
        type=int,
        nargs="+",
        help="send only these abusive bodies: 0 the completions prompt, 1 the chat message, "
        "2 the many-message conversation, 3 the fitting prompt (with --fitting)",
    )
    p.add_argument(
        "--fitting",
        action="store_true",
        help="also send the largest prompt that fits the context window",
    )
    p.add_argument("--startup-timeout", type=float, default=600)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    port = free_port()
    server_argv = serve_argv(
        port, "--max-request-body-bytes", str(args.body_limit), *shlex.split(args.server_args)
    )
    if args.max_prompt_chars:
        server_argv += ["--max-prompt-chars", str(args.max_prompt_chars)]
    print(f"starting {shlex.join(server_argv)}", file=sys.stderr)
    with running_server("tokenmill", server_argv, port, args.startup_timeout) as url:
        result = asyncio.run(measure(url, args))
    report(result, args)


if __name__ == "__main__":
    main()
