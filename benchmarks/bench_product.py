"""The product's conversations against stateless chat completions, and against no cache.

Runs the same 10-turn conversation (greedy, one user question per turn):
- through /v1/responses, each turn naming the previous one (`previous_response_id`):
  the server assembles the history and extends the previous turn's tokens;
- through stateless /v1/chat/completions, the client resending the whole history;
- through /v1/responses on a server started with --no-enable-prefix-caching.
For each turn: time to first token (first text delta of a stream) and cached prompt
tokens. Then, on the caching server, 16 conversations at once through each API: output
tokens per second, responses over chat completions.

    python benchmarks/bench_product.py                   # the default model
    python benchmarks/bench_product.py --concurrency 8 --turns 5

Targets (docs/product.md): turn-10 TTFT through /v1/responses <= 0.3x the no-cache
server's, and tok/s at 16 conversations >= 0.95x chat completions'.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import openai
from bench_serving import free_port, running_server

INSTRUCTIONS = "You are a friendly geography tutor. Answer in two or three sentences."
QUESTIONS = [
    "What is the capital of Japan?",
    "What is the population of that city, roughly?",
    "Which river flows through Paris?",
    "What is the highest mountain in Africa?",
    "Which ocean lies west of Portugal?",
    "What is the largest desert in Asia?",
    "Which country has the most islands?",
    "What is the capital of Canada?",
    "Which sea lies between Europe and Africa?",
    "Summarise what we talked about in one sentence.",
]


@dataclass
class Turn:
    ttft: float
    input_tokens: int
    cached_tokens: int
    output_tokens: int


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                              timeout=1800)


def instructions(session: str) -> str:
    """The system prompt, opened by a tag naming the run: runs never share cached
    prefixes, so each API's cached tokens are its own."""
    return f"[{session}] {INSTRUCTIONS}"


async def responses_conversation(client: openai.AsyncOpenAI, model: str, session: str,
                                 questions: Sequence[str], max_tokens: int) -> list[Turn]:
    turns, previous = [], None
    for question in questions:
        start = time.perf_counter()
        ttft = None
        stream = await client.responses.create(
            model=model, input=question, instructions=instructions(session), temperature=0,
            max_output_tokens=max_tokens, previous_response_id=previous, stream=True)
        async for event in stream:
            if event.type == "response.output_text.delta" and ttft is None:
                ttft = time.perf_counter() - start
            elif event.type in ("response.completed", "response.incomplete"):
                final = event.response
        usage = final.usage
        turns.append(Turn(ttft or float("nan"), usage.input_tokens,
                          usage.input_tokens_details.cached_tokens, usage.output_tokens))
        previous = final.id
    return turns


async def chat_conversation(client: openai.AsyncOpenAI, model: str, session: str,
                            questions: Sequence[str], max_tokens: int) -> list[Turn]:
    turns = []
    messages = [{"role": "system", "content": instructions(session)}]
    for question in questions:
        messages.append({"role": "user", "content": question})
        start = time.perf_counter()
        ttft, text, usage = None, "", None
        stream = await client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=max_tokens, stream=True,
            stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                ttft = ttft or time.perf_counter() - start
                text += chunk.choices[0].delta.content
            usage = chunk.usage or usage
        turns.append(Turn(ttft or float("nan"), usage.prompt_tokens,
                          usage.prompt_tokens_details.cached_tokens, usage.completion_tokens))
        messages.append({"role": "assistant", "content": text})
    return turns


async def throughput(url: str, model: str, api: str, session: str, conversations: int,
                     turns: int, max_tokens: int) -> float:
    """Output tokens per second of `conversations` concurrent conversations."""
    run = responses_conversation if api == "responses" else chat_conversation
    async with _client(url) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(
            run(client, model, f"{session} {i}", QUESTIONS[:turns], max_tokens)
            for i in range(conversations)))
        elapsed = time.perf_counter() - start
    return sum(t.output_tokens for r in results for t in r) / elapsed


def server_argv(args: argparse.Namespace, port: int, data_dir: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "engine.serve", "--model", args.model, "--port", str(port),
            "--log-level", "warning", "--no-access-log", "--data-dir", data_dir,
            *shlex.split(args.server_args), *extra]


@contextlib.contextmanager
def with_server(args: argparse.Namespace, name: str, *extra: str) -> Iterator[str]:
    """A server on a scratch data directory; yields its URL."""
    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-") as data_dir:
        argv = server_argv(args, port := free_port(), data_dir, *extra)
        print(f"{name}: {shlex.join(argv)}", file=sys.stderr)
        with running_server(name, argv, port, args.startup_timeout) as url:
            yield url


async def cached_server_runs(url: str, args: argparse.Namespace) -> dict:
    questions = QUESTIONS[: args.turns]
    async with _client(url) as client:
        model = (await client.models.list()).data[0].id
        responses = await responses_conversation(client, model, "responses", questions,
                                                 args.max_tokens)
        chat = await chat_conversation(client, model, "chat", questions, args.max_tokens)
    rates: dict[str, list[float]] = {"responses": [], "chat": []}
    for round_ in range(args.rounds):  # alternate, so drifting load hits both alike
        for api in ("chat", "responses"):
            rates[api].append(await throughput(url, model, api, f"{api} {round_}",
                                               args.concurrency, args.concurrent_turns,
                                               args.max_tokens))
    return {"responses": responses, "chat": chat, "rates": rates}


async def uncached_server_run(url: str, args: argparse.Namespace) -> list[Turn]:
    async with _client(url) as client:
        model = (await client.models.list()).data[0].id
        return await responses_conversation(client, model, "responses",
                                            QUESTIONS[: args.turns], args.max_tokens)


def _isa() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    found = [f for f in ("avx512_vnni", "avx_vnni", "avx2") if re.search(rf"\b{f}\b", flags)]
    return ", ".join(found) or platform.machine()


def report(cached: dict, uncached: list[Turn], args: argparse.Namespace) -> None:
    print(f"\n{datetime.date.today()}  ISA: {_isa()}  model: {args.model}  "
          f"max_output_tokens {args.max_tokens}")
    print(f"command: python benchmarks/bench_product.py {shlex.join(sys.argv[1:])}\n")
    print("turn | /v1/responses        | /v1/chat/completions | no prefix cache")
    print("     | TTFT ms  cached/input | TTFT ms  cached/input | TTFT ms  input")
    for i, (r, c, u) in enumerate(zip(cached["responses"], cached["chat"], uncached,
                                      strict=True), 1):
        print(f"{i:4} | {r.ttft * 1e3:7.0f}  {r.cached_tokens:5}/{r.input_tokens:<5} "
              f"| {c.ttft * 1e3:7.0f}  {c.cached_tokens:5}/{c.input_tokens:<5} "
              f"| {u.ttft * 1e3:7.0f}  {u.input_tokens:5}")
    last, last_uncached = cached["responses"][-1], uncached[-1]
    rates = cached["rates"]
    ratio = statistics.fmean(rates["responses"]) / statistics.fmean(rates["chat"])
    print(f"\nturn-{len(uncached)} TTFT, responses / no-cache server: "
          f"{last.ttft / last_uncached.ttft:.2f}x (target <= 0.3)")
    previous = cached["responses"][-2]
    print(f"turn-{len(uncached)} cached tokens / turn-{len(uncached) - 1} input+output: "
          f"{last.cached_tokens / (previous.input_tokens + previous.output_tokens):.2f} "
          "(target >= 0.9)")
    print(f"{args.concurrency} concurrent conversations x {args.concurrent_turns} turns, "
          f"output tok/s: responses {statistics.fmean(rates['responses']):.1f}, chat "
          f"{statistics.fmean(rates['chat']):.1f} -> {ratio:.2f}x (target >= 0.95); rounds: "
          f"responses {[round(r, 1) for r in rates['responses']]}, "
          f"chat {[round(r, 1) for r in rates['chat']]}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--turns", type=int, default=10, help="turns of the measured conversation")
    p.add_argument("--max-tokens", type=int, default=48, help="max output tokens per turn")
    p.add_argument("--concurrency", type=int, default=16, help="conversations at once")
    p.add_argument("--concurrent-turns", type=int, default=3,
                   help="turns of each concurrent conversation")
    p.add_argument("--rounds", type=int, default=2, help="throughput rounds per API")
    p.add_argument("--server-args", default="", help="extra engine.serve flags for both servers")
    p.add_argument("--startup-timeout", type=float, default=900)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not 2 <= args.turns <= len(QUESTIONS):
        raise SystemExit(f"--turns must be from 2 to {len(QUESTIONS)}")
    with with_server(args, "tokenmill") as url:
        cached = asyncio.run(cached_server_runs(url, args))
    with with_server(args, "tokenmill, no prefix cache", "--no-enable-prefix-caching") as url:
        uncached = asyncio.run(uncached_server_run(url, args))
    report(cached, uncached, args)


if __name__ == "__main__":
    main()
