"""Load generator for any OpenAI-compatible server: a streaming concurrency sweep.

For each concurrency level C, C workers each send streaming chat (or completions)
requests back to back, drawn in a fixed order from a fixed prompt set, until the
level's request count is done. Per request it records the time to first token
(TTFT), the gaps between streamed chunks (inter-token latency, ITL) and the
end-to-end latency; per level it reports their p50/p99 and the aggregate output
rate (completion tokens / wall time of the level).

    python benchmarks/loadgen.py --base-url http://127.0.0.1:8000/v1 \\
        --concurrency 1 4 16 32 --max-tokens 64

Output tokens are counted from the usage chunk (`stream_options.include_usage`),
falling back to one per content chunk for servers that do not send it. Sending
`ignore_eos` (a vLLM/tokenmill extension) makes every request generate exactly
--max-tokens, so levels are comparable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import httpx

PROMPTS = [
    "Explain how a bicycle stays upright while moving.",
    "Write a short poem about the sea at night.",
    "What are three tips for learning a new language?",
    "Describe the water cycle to a ten-year-old.",
    "Summarize the plot of a detective story in a few sentences.",
    "Why is the sky blue? Answer in simple terms.",
    "Give a recipe for a quick vegetable soup.",
    "List some advantages of public transport in cities.",
    "How do vaccines train the immune system?",
    "Write a friendly email inviting a colleague to lunch.",
    "What is the difference between weather and climate?",
    "Describe a sunrise in the mountains.",
    "How does a refrigerator keep food cold?",
    "Give advice to someone starting their first job.",
    "Explain what a prime number is, with examples.",
    "Tell a short story about a robot who learns to paint.",
]


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    gaps: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0  # from the usage chunk; 0 when the server sends none
    error: str = ""


@dataclass
class LevelReport:
    concurrency: int
    requests: int
    failed: int
    duration_s: float
    output_tokens: int
    output_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    e2e_p50_s: float
    e2e_p99_s: float
    prompt_tokens_mean: float = 0.0  # what the server counted, to check prompt lengths


def percentile(values: list[float], q: float) -> float:
    """Linearly interpolated percentile, q in [0, 100]; 0 for no data."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _payload(args: argparse.Namespace, prompt: str) -> dict:
    body: dict = {
        "model": args.model,
        "max_tokens": args.max_tokens,
        "stream": True,
        "temperature": args.temperature,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def _chunk_text(chunk: dict, endpoint: str) -> str:
    if not chunk.get("choices"):
        return ""
    choice = chunk["choices"][0]
    if endpoint == "chat":
        return choice.get("delta", {}).get("content") or ""
    return choice.get("text") or ""


async def _open_stream(
    stack: contextlib.AsyncExitStack, client: httpx.AsyncClient, path: str, body: dict
) -> httpx.Response:
    """Send the request, and once more if the connection closed before any response.

    llama.cpp's server now and then drops a connection without answering; nothing was
    generated then, so resending is safe, and the time lost stays in the request's TTFT.
    """
    try:
        return await stack.enter_async_context(client.stream("POST", path, json=body))
    except httpx.RemoteProtocolError:
        return await stack.enter_async_context(client.stream("POST", path, json=body))


async def one_request(
    client: httpx.AsyncClient, args: argparse.Namespace, prompt: str
) -> RequestResult:
    path = "/chat/completions" if args.endpoint == "chat" else "/completions"
    start = time.perf_counter()
    result = RequestResult(ok=False)
    last = None
    chunks = 0
    try:
        async with contextlib.AsyncExitStack() as stack:
            response = await _open_stream(stack, client, path, _payload(args, prompt))
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"].get("completion_tokens", 0)
                    result.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                if not _chunk_text(chunk, args.endpoint):
                    continue
                now = time.perf_counter()
                chunks += 1
                if last is None:
                    result.ttft = now - start
                else:
                    result.gaps.append(now - last)
                last = now
    except httpx.HTTPError as exc:
        result.error = repr(exc)
        return result
    result.e2e = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    result.ok = last is not None
    if not result.ok:
        result.error = "no content received"
    return result


async def run_level(
    args: argparse.Namespace, concurrency: int, prompts: Sequence[str] = PROMPTS, first: int = 0
) -> LevelReport:
    """One closed-loop level; request i sends prompts[(first + i) % len(prompts)].

    `first` lets a caller give each level prompts the earlier levels did not send, so a
    server's prefix cache cannot turn later levels into cache hits.
    """
    results, duration = await run_requests(args, concurrency, prompts, first)
    return summarize(concurrency, results, duration)


async def run_requests(
    args: argparse.Namespace, concurrency: int, prompts: Sequence[str] = PROMPTS, first: int = 0
) -> tuple[list[RequestResult], float]:
    """`run_level`'s requests and their wall time, unsummarized: a caller measuring in
    several rounds pools the results of all of them before taking percentiles."""
    total = args.requests or max(4 * concurrency, 8)
    next_index = 0
    results: list[RequestResult] = []

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < total:
            prompt = prompts[(first + next_index) % len(prompts)]
            next_index += 1
            results.append(await one_request(client, args, prompt))

    limits = httpx.Limits(max_connections=concurrency + 4)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(
        base_url=args.base_url, timeout=args.timeout, limits=limits, headers=headers
    ) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        duration = time.perf_counter() - started
    for r in results:
        if not r.ok:
            print(f"  request failed: {r.error}", file=sys.stderr)
    return results, duration


def summarize(concurrency: int, results: list[RequestResult], duration: float) -> LevelReport:
    """The level's report: throughput over `duration`, percentiles over the successes."""
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    ttft = [r.ttft for r in ok]
    gaps = [g for r in ok for g in r.gaps]
    e2e = [r.e2e for r in ok]
    return LevelReport(
        concurrency=concurrency,
        requests=len(results),
        failed=len(results) - len(ok),
        duration_s=round(duration, 3),
        output_tokens=tokens,
        output_tok_s=round(tokens / duration, 1),
        ttft_p50_ms=round(1000 * percentile(ttft, 50), 1),
        ttft_p99_ms=round(1000 * percentile(ttft, 99), 1),
        itl_p50_ms=round(1000 * percentile(gaps, 50), 1),
        itl_p99_ms=round(1000 * percentile(gaps, 99), 1),
        e2e_p50_s=round(percentile(e2e, 50), 3),
        e2e_p99_s=round(percentile(e2e, 99), 3),
        prompt_tokens_mean=round(sum(r.prompt_tokens for r in ok) / len(ok), 1) if ok else 0.0,
    )


def markdown(reports: list[LevelReport]) -> str:
    lines = [
        "| concurrency | requests | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) "
        "| E2E p50 (s) | E2E p99 (s) | output tok/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in reports:
        failed = f" ({r.failed} failed)" if r.failed else ""
        lines.append(
            f"| {r.concurrency} | {r.requests}{failed} | {r.ttft_p50_ms} | {r.ttft_p99_ms} "
            f"| {r.itl_p50_ms} | {r.itl_p99_ms} | {r.e2e_p50_s} | {r.e2e_p99_s} "
            f"| {r.output_tok_s} |"
        )
    return "\n".join(lines)


def options_for(url: str, model: str, max_tokens: int, *more: str) -> argparse.Namespace:
    """The options of a run against the server at `url` (its root), for a benchmark that
    drives `run_level` in-process; `more` are further command-line options."""
    argv = ["--base-url", f"{url}/v1", "--model", model, "--max-tokens", str(max_tokens)]
    return build_parser().parse_args([*argv, *more])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--base-url", default="http://127.0.0.1:8000/v1", help="the server's OpenAI API root"
    )
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--api-key", default=None)
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument(
        "--requests",
        type=int,
        default=0,
        help="requests per level; 0: 4 x concurrency (at least 8)",
    )
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ask the server to generate exactly --max-tokens (vLLM extension)",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    p.add_argument("--json", default=None, metavar="PATH", help="also write results as JSON")
    return p


async def sweep(args: argparse.Namespace) -> list[LevelReport]:
    warmup = argparse.Namespace(**{**vars(args), "max_tokens": 4})
    async with httpx.AsyncClient(
        base_url=args.base_url,
        timeout=args.timeout,
        headers=({"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}),
    ) as client:
        first = await one_request(client, warmup, PROMPTS[0])
    if not first.ok:
        raise SystemExit(f"warm-up request failed: {first.error}")
    reports = []
    for concurrency in args.concurrency:
        report = await run_level(args, concurrency)
        print(
            f"concurrency {concurrency}: {report.output_tok_s} tok/s, "
            f"TTFT p50 {report.ttft_p50_ms} ms",
            file=sys.stderr,
        )
        reports.append(report)
    return reports


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    reports = asyncio.run(sweep(args))
    print(markdown(reports))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "levels": [asdict(r) for r in reports]}, f, indent=2)


if __name__ == "__main__":
    main()
