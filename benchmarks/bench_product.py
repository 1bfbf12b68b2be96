"""The product's conversations against stateless chat completions, and against no cache.

Runs the same 10-turn conversation (greedy, one user question per turn, a system prompt
of about 800 tokens so that prefill, not the first step, dominates time to first token),
with both servers up and the three paths taking turns, so a shared machine's drifting
load hits them alike:
- through /v1/responses, each turn naming the previous one (`previous_response_id`):
  the server assembles the history and extends the previous turn's tokens;
- through stateless /v1/chat/completions, the client resending the whole history;
- through /v1/responses on a server started with --no-enable-prefix-caching.
For each turn: time to first token (first text delta of a stream) and cached prompt
tokens. Then, on the caching server, 16 conversations at once (short system prompt)
through each API, in alternating rounds: output tokens per second, responses over chat
completions.

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
from bench_serving import free_port, running_server, serve_argv

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
REFERENCE = "\n".join(
    f"- Fact {i}: the city numbered {i} in the atlas has {1000 + 37 * i} parks and "
    f"{20 + i % 17} museums."
    for i in range(30)
)


@dataclass
class Turn:
    ttft: float
    input_tokens: int
    cached_tokens: int
    output_tokens: int


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=1800)


def instructions(session: str, reference: bool) -> str:
    """The system prompt: a tag naming the run (runs never share cached prefixes, so each
    run's cached tokens are its own), the tutor's brief and, for the TTFT runs, a
    reference sheet long enough that reading the history, not the first step, dominates
    time to first token."""
    sheet = f"\n\nReference sheet:\n{REFERENCE}" if reference else ""
    return f"[{session}] {INSTRUCTIONS}{sheet}"


class ResponsesConversation:
    """Each turn sends only the new question and names the previous response."""

    def __init__(
        self, client: openai.AsyncOpenAI, model: str, system: str, max_tokens: int
    ) -> None:
        self.client, self.model, self.max_tokens = client, model, max_tokens
        self.instructions = system
        self.previous: str | None = None

    async def turn(self, question: str) -> Turn:
        start = time.perf_counter()
        ttft = None
        stream = await self.client.responses.create(
            model=self.model,
            input=question,
            instructions=self.instructions,
            temperature=0,
            max_output_tokens=self.max_tokens,
            previous_response_id=self.previous,
            stream=True,
        )
        async for event in stream:
            if event.type == "response.output_text.delta" and ttft is None:
                ttft = time.perf_counter() - start
            elif event.type in ("response.completed", "response.incomplete"):
                final = event.response
        self.previous = final.id
        usage = final.usage
        return Turn(
            ttft or float("nan"),
            usage.input_tokens,
            usage.input_tokens_details.cached_tokens,
            usage.output_tokens,
        )


class ChatConversation:
    """Each turn resends the whole history, as stateless chat completions need;
    `cache_salt` (vLLM's field) keeps its prompts' cached prefixes apart from a Responses
    conversation's of the same text."""

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        model: str,
        system: str,
        max_tokens: int,
        cache_salt: str | None = None,
    ) -> None:
        self.client, self.model, self.max_tokens = client, model, max_tokens
        self.messages = [{"role": "system", "content": system}]
        self.extra_body = {} if cache_salt is None else {"cache_salt": cache_salt}

    async def turn(self, question: str) -> Turn:
        self.messages.append({"role": "user", "content": question})
        start = time.perf_counter()
        ttft, text, usage = None, "", None
        stream = await self.client.chat.completions.create(
            model=self.model,
            messages=self.messages,
            temperature=0,
            max_tokens=self.max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=self.extra_body,
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                ttft = ttft or time.perf_counter() - start
                text += chunk.choices[0].delta.content
            usage = chunk.usage or usage
        self.messages.append({"role": "assistant", "content": text})
        return Turn(
            ttft or float("nan"),
            usage.prompt_tokens,
            usage.prompt_tokens_details.cached_tokens,
            usage.completion_tokens,
        )


async def one_conversation_each(
    cached_url: str, uncached_url: str, args: argparse.Namespace
) -> dict[str, list[Turn]]:
    """The same questions through the three paths, turn by turn interleaved, so load that
    drifts during the run (a shared machine) hits all three alike."""
    async with _client(cached_url) as cached, _client(uncached_url) as uncached:
        model = (await cached.models.list()).data[0].id
        paths = {
            "responses": ResponsesConversation(
                cached, model, instructions("responses", True), args.max_tokens
            ),
            "chat": ChatConversation(cached, model, instructions("chat", True), args.max_tokens),
            "no_cache": ResponsesConversation(
                uncached, model, instructions("responses", True), args.max_tokens
            ),
        }
        turns: dict[str, list[Turn]] = {name: [] for name in paths}
        for question in QUESTIONS[: args.turns]:
            for name, conversation in paths.items():
                turns[name].append(await conversation.turn(question))
    return turns


async def throughput(
    url: str, api: str, session: str, args: argparse.Namespace
) -> tuple[int, float]:
    """Output tokens and seconds of `--concurrency` conversations at once. Both APIs are
    given the same `session`'s prompts, so that greedy decoding writes the same answers
    (a tag that differed would change their lengths, and with them the share of each
    turn's fixed costs); chat's are salted apart from the Responses ones in the cache."""
    async with _client(url) as client:
        model = (await client.models.list()).data[0].id

        def conversation(i: int) -> ResponsesConversation | ChatConversation:
            system = instructions(f"{session} {i}", False)
            if api == "responses":
                return ResponsesConversation(client, model, system, args.max_tokens)
            return ChatConversation(client, model, system, args.max_tokens, cache_salt="chat")

        async def run(i: int) -> int:
            conversation_i = conversation(i)
            return sum(
                [
                    (await conversation_i.turn(q)).output_tokens
                    for q in QUESTIONS[: args.concurrent_turns]
                ]
            )

        start = time.perf_counter()
        tokens = await asyncio.gather(*(run(i) for i in range(args.concurrency)))
        return sum(tokens), time.perf_counter() - start


async def throughputs(url: str, args: argparse.Namespace) -> dict[str, list[tuple[int, float]]]:
    rates: dict[str, list[tuple[int, float]]] = {"responses": [], "chat": []}
    for round_ in range(args.rounds):  # alternating, for the same reason as above
        order = ("chat", "responses") if round_ % 2 == 0 else ("responses", "chat")
        for api in order:
            rates[api].append(await throughput(url, api, f"round {round_}", args))
    return rates


def server_argv(args: argparse.Namespace, port: int, data_dir: str, *extra: str) -> list[str]:
    return serve_argv(
        port, "--model", args.model, "--data-dir", data_dir, *shlex.split(args.server_args), *extra
    )


@contextlib.contextmanager
def with_server(args: argparse.Namespace, name: str, *extra: str) -> Iterator[str]:
    """A server on a scratch data directory; yields its URL."""
    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-") as data_dir:
        argv = server_argv(args, port := free_port(), data_dir, *extra)
        print(f"{name}: {shlex.join(argv)}", file=sys.stderr)
        with running_server(name, argv, port, args.startup_timeout) as url:
            yield url


def _isa() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    found = [f for f in ("avx512_vnni", "avx_vnni", "avx2") if re.search(rf"\b{f}\b", flags)]
    return ", ".join(found) or platform.machine()


def report(
    turns: dict[str, list[Turn]],
    rates: dict[str, list[tuple[int, float]]],
    args: argparse.Namespace,
) -> None:
    print(
        f"\n{datetime.date.today()}  ISA: {_isa()}  model: {args.model}  "
        f"max_output_tokens {args.max_tokens}"
    )
    print(f"command: python benchmarks/bench_product.py {shlex.join(sys.argv[1:])}\n")
    print("turn | /v1/responses         | /v1/chat/completions  | no prefix cache")
    print("     | TTFT ms  cached/input  | TTFT ms  cached/input  | TTFT ms  input")
    for i, (r, c, u) in enumerate(
        zip(turns["responses"], turns["chat"], turns["no_cache"], strict=True), 1
    ):
        print(
            f"{i:4} | {r.ttft * 1e3:7.0f}  {r.cached_tokens:5}/{r.input_tokens:<6} "
            f"| {c.ttft * 1e3:7.0f}  {c.cached_tokens:5}/{c.input_tokens:<6} "
            f"| {u.ttft * 1e3:7.0f}  {u.input_tokens:5}"
        )
    last, previous = turns["responses"][-1], turns["responses"][-2]
    n = len(turns["responses"])
    print(
        f"\nturn-{n} TTFT, responses / no-cache server: "
        f"{last.ttft / turns['no_cache'][-1].ttft:.2f}x (target <= 0.3); "
        f"chat / no-cache: {turns['chat'][-1].ttft / turns['no_cache'][-1].ttft:.2f}x"
    )
    later = [
        r.ttft / u.ttft for r, u in zip(turns["responses"][1:], turns["no_cache"][1:], strict=True)
    ]
    print(f"turns 2-{n}, median TTFT ratio responses / no-cache: {statistics.median(later):.2f}x")
    print(
        f"turn-{n} cached tokens / turn-{n - 1} input+output: "
        f"{last.cached_tokens / (previous.input_tokens + previous.output_tokens):.2f} "
        "(target >= 0.9)"
    )
    per_round = {api: [tokens / seconds for tokens, seconds in runs] for api, runs in rates.items()}
    mean = {api: statistics.fmean(values) for api, values in per_round.items()}
    print(
        f"{args.concurrency} concurrent conversations x {args.concurrent_turns} turns, "
        f"output tok/s: responses {mean['responses']:.1f}, chat {mean['chat']:.1f} -> "
        f"{mean['responses'] / mean['chat']:.2f}x (target >= 0.95); rounds: "
        f"responses {[round(r, 1) for r in per_round['responses']]}, "
        f"chat {[round(r, 1) for r in per_round['chat']]}; output tokens a round: "
        f"responses {[t for t, _ in rates['responses']]}, chat {[t for t, _ in rates['chat']]}"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--turns", type=int, default=10, help="turns of the measured conversation")
    p.add_argument("--max-tokens", type=int, default=48, help="max output tokens per turn")
    p.add_argument("--concurrency", type=int, default=16, help="conversations at once")
    p.add_argument(
        "--concurrent-turns", type=int, default=3, help="turns of each concurrent conversation"
    )
    p.add_argument("--rounds", type=int, default=4, help="throughput rounds per API")
    p.add_argument("--server-args", default="", help="extra engine.serve flags for both servers")
    p.add_argument("--startup-timeout", type=float, default=900)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not 2 <= args.turns <= len(QUESTIONS):
        raise SystemExit(f"--turns must be from 2 to {len(QUESTIONS)}")
    with with_server(args, "tokenmill") as cached:
        with with_server(
            args, "tokenmill, no prefix cache", "--no-enable-prefix-caching"
        ) as uncached:
            turns = asyncio.run(one_conversation_each(cached, uncached, args))
        rates = asyncio.run(throughputs(cached, args))
    report(turns, rates, args)


if __name__ == "__main__":
    main()
