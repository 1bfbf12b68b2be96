"""Fair share and the cost of the access layer, each as a ratio measured in one command.

Two servers run side by side on scratch data directories (the default model):
- "accounts": users A, B and four more, each with a key, a token quota, rpm and tpm
  limits, served with the default `--max-sequences-per-user`;
- "open": no keys issued, so every request is the local user's (not capped, not limited;
  usage rows are still written, as on any server with a store).

1. Fair share. User B sends one streaming chat request at a time and times its first
   token (TTFT), first on an idle server, then while user A holds `--flood` streams open
   (each sending its next long request as the previous ends), then idle again. Reported:
   B's TTFT p50 under the flood over idle, on the accounts server (A capped by its fair
   share), and on the open server (where A and B are the same local user: no cap), for
   contrast. Target: <= 2x on the accounts server.
2. Overhead of authentication + limits + quota reservation and settlement: `--streams`
   concurrent streaming chat requests (spread over four users on the accounts server,
   anonymous on the open server), in alternating rounds so a shared machine's drifting
   load hits both alike. Reported: output tok/s and TTFT p50, accounts over open.
   Targets: tok/s >= 0.97x, TTFT p50 within +5 ms.

    python benchmarks/bench_fairness.py
    python benchmarks/bench_fairness.py --flood 32 --probes 12 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import io
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_product import _isa
from bench_serving import free_port, running_server, serve_argv

from orchestrator.admin import main as admin

USERS = ("a", "b", "c1", "c2", "c3", "c4")


@dataclass
class Result:
    ttft: float | None
    tokens: int


def create_accounts(data_dir: str) -> dict[str, str]:
    """The users, with generous limits (so they meter and check but never refuse), and
    one key each; returns name -> key."""
    found = {}
    for name in USERS:
        with redirect_stdout(io.StringIO()):
            assert (
                admin(
                    [
                        "--data-dir",
                        data_dir,
                        "users",
                        "create",
                        name,
                        "--token-quota",
                        "1000000000",
                        "--quota-period",
                        "month",
                        "--rpm",
                        "100000",
                        "--tpm",
                        "100000000",
                    ]
                )
                == 0
            )
        out = io.StringIO()
        with redirect_stdout(out):
            assert admin(["--data-dir", data_dir, "keys", "create", name]) == 0
        found[name] = json.loads(out.getvalue())["key"]
    return found


@contextlib.contextmanager
def server(args: argparse.Namespace, name: str, accounts: bool) -> Iterator[tuple[str, dict]]:
    with tempfile.TemporaryDirectory(prefix="tokenmill-fair-") as data_dir:
        found = create_accounts(data_dir) if accounts else {}
        port = free_port()
        argv = serve_argv(
            port, "--model", args.model, "--data-dir", data_dir, *shlex.split(args.server_args)
        )
        print(f"{name}: {shlex.join(argv)}", file=sys.stderr)
        with running_server(name, argv, port, args.startup_timeout) as url:
            yield url, found


async def stream_chat(
    client: httpx.AsyncClient, model: str, key: str | None, text: str, max_tokens: int
) -> Result:
    """One streaming chat request: time to its first content token, and tokens received."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {
        "model": model,
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0,
        "messages": [{"role": "user", "content": text}],
        "ignore_eos": True,
    }
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream(
        "POST", "/v1/chat/completions", json=body, headers=headers
    ) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content"):
                first = first or time.perf_counter() - start
                tokens += 1
    return Result(first, tokens)


async def probes(
    client: httpx.AsyncClient, key: str | None, count: int, tag: str, args: argparse.Namespace
) -> list[float]:
    ttfts = []
    for i in range(count):
        result = await stream_chat(
            client, args.model, key, f"[{tag}{i:03d}] Name a colour.", args.probe_tokens
        )
        assert result.ttft is not None
        ttfts.append(result.ttft)
    return ttfts


async def fairness(
    url: str, keys: dict[str, str], args: argparse.Namespace, tag: str
) -> tuple[list[float], list[float]]:
    """B's TTFTs idle (half before, half after) and under A's flood."""
    limits = httpx.Limits(max_connections=args.flood + 8)
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as client:
        idle = await probes(client, keys.get("b"), args.probes // 2, f"{tag}i", args)
        stop = asyncio.Event()

        async def flood_stream(i: int) -> None:
            n = 0
            while not stop.is_set():
                await stream_chat(
                    client,
                    args.model,
                    keys.get("a"),
                    f"[{tag}f{i}-{n}] Tell a long story.",
                    args.flood_tokens,
                )
                n += 1

        flooders = [asyncio.create_task(flood_stream(i)) for i in range(args.flood)]
        await asyncio.sleep(args.flood_warmup)
        flooded = await probes(client, keys.get("b"), args.probes, f"{tag}b", args)
        stop.set()
        for task in flooders:
            task.cancel()
        await asyncio.gather(*flooders, return_exceptions=True)
        idle += await probes(client, keys.get("b"), args.probes - args.probes // 2, f"{tag}j", args)
    return idle, flooded


async def one_round(
    url: str, keys: list[str | None], args: argparse.Namespace, tag: str
) -> tuple[float, list[float]]:
    """`--streams` requests at once: output tok/s over the round, and each TTFT."""
    limits = httpx.Limits(max_connections=args.streams + 4)
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(
                stream_chat(
                    client,
                    args.model,
                    keys[i % len(keys)],
                    f"[{tag}{i:03d}] Describe the sea.",
                    args.stream_tokens,
                )
                for i in range(args.streams)
            )
        )
        elapsed = time.perf_counter() - start
    return sum(r.tokens for r in results) / elapsed, [r.ttft for r in results if r.ttft]


def p50(values: list[float]) -> float:
    return statistics.median(values)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with (
        server(args, "accounts", accounts=True) as (accounts_url, found),
        server(args, "open", accounts=False) as (open_url, _),
    ):
        fair = asyncio.run(fairness(accounts_url, found, args, "acc"))
        unfair = asyncio.run(fairness(open_url, {}, args, "open"))
        rates: dict[str, list[float]] = {"accounts": [], "open": []}
        ttfts: dict[str, list[float]] = {"accounts": [], "open": []}
        tenant_keys = [found[name] for name in ("c1", "c2", "c3", "c4")]
        for r in range(args.rounds):
            order = [("accounts", accounts_url, tenant_keys), ("open", open_url, [None])]
            for name, url, keys in order if r % 2 == 0 else order[::-1]:
                rate, times = asyncio.run(one_round(url, keys, args, f"{name}{r}"))
                rates[name].append(rate)
                ttfts[name] += times
    report(fair, unfair, rates, ttfts, args)


def report(fair, unfair, rates, ttfts, args: argparse.Namespace) -> None:
    load = os.getloadavg()
    print(
        f"\n{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC  ISA: {_isa()}  "
        f"model: {args.model}  load before: {args.load_before}  load after: "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(f"command: python benchmarks/bench_fairness.py {shlex.join(sys.argv[1:])}\n")
    for name, (idle, flooded) in (("accounts (fair share)", fair), ("open (no cap)", unfair)):
        print(
            f"{name}: B's TTFT p50 idle {p50(idle) * 1e3:.0f} ms, with A's {args.flood} "
            f"streams {p50(flooded) * 1e3:.0f} ms -> {p50(flooded) / p50(idle):.2f}x"
        )
    print("  (target on the accounts server: <= 2x)")
    acc_rate, open_rate = statistics.fmean(rates["accounts"]), statistics.fmean(rates["open"])
    acc_ttft, open_ttft = p50(ttfts["accounts"]), p50(ttfts["open"])
    print(
        f"\n{args.streams} streams x {args.rounds} rounds: output tok/s accounts "
        f"{acc_rate:.1f}, open {open_rate:.1f} -> {acc_rate / open_rate:.3f}x "
        f"(target >= 0.97); TTFT p50 accounts {acc_ttft * 1e3:.1f} ms, open "
        f"{open_ttft * 1e3:.1f} ms -> {(acc_ttft - open_ttft) * 1e3:+.1f} ms (target <= +5)"
    )
    print(
        f"rounds tok/s: accounts {[round(r, 1) for r in rates['accounts']]}, "
        f"open {[round(r, 1) for r in rates['open']]}"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--flood", type=int, default=32, help="user A's concurrent streams")
    p.add_argument("--flood-tokens", type=int, default=128, help="tokens of each A request")
    p.add_argument(
        "--flood-warmup", type=float, default=3.0, help="seconds of flood before B's first probe"
    )
    p.add_argument("--probes", type=int, default=12, help="B's requests per condition")
    p.add_argument("--probe-tokens", type=int, default=4)
    p.add_argument("--streams", type=int, default=16, help="concurrent streams (overhead)")
    p.add_argument("--stream-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4, help="overhead rounds per server")
    p.add_argument("--server-args", default="", help="extra engine.serve flags for both")
    p.add_argument("--startup-timeout", type=float, default=900)
    p.add_argument(
        "--load-before",
        default=" ".join(f"{x:.2f}" for x in os.getloadavg()),
        help=argparse.SUPPRESS,
    )
    return p


if __name__ == "__main__":
    main()
