"""Serving benchmark (issue 7): tokenmill's HTTP server against llama.cpp and transformers.

One command measures, one system after another, the same closed-loop workload at each
concurrency C and prints one table:

  * tokenmill: `python -m engine.serve` as a subprocess, driven through its OpenAI API
    by `loadgen.py` (C clients, each sending its next streaming chat request when the
    previous one finishes);
  * llama.cpp: `llama-server -t <cores> -np <max C> -cb` on the same GGUF, driven the
    same way, only when `--llama-server PATH` is given (building it is the user's step);
  * transformers: no server; for each C one left-padded batch of C prompts through
    `generate` (float32, greedy), timed per decoding step.

Every request is greedy and generates exactly `--tokens` tokens (`ignore_eos`), from a
fixed prompt set of about 130 tokens after SmolLM2's chat template. Within one system's
run no prompt is sent twice, so prefix caches only ever share the chat template's
system header, as they would between real users.

    python benchmarks/bench_serving.py                               # 1/4/16/32 streams
    python benchmarks/bench_serving.py --llama-server ~/llama.cpp/build/bin/llama-server \\
        --markdown results.md
    python benchmarks/bench_serving.py --quick --skip-transformers   # smoke run

`--rounds N` runs the systems in turn N times (each server started afresh, so every round
sees cold prefix caches and the same prompts) and reports each level's median: on a shared
VM every system's rate drifts from minute to minute, and one round compares whichever
minutes each system happened to get.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # loadgen is a sibling script
import loadgen

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages
import kernels.native

ROOT = Path(__file__).resolve().parents[1]
# The caps torch's own kernels (ATen's vectorized ops, MKL, oneDNN) read when they load.
# With a tokenmill target forced, every system compared runs that instruction set:
# tokenmill's torch ops and transformers as well as its own kernels, like the llama.cpp
# build the comparison names. (Uncapped, transformers' float32 matmuls ran 1.5x faster
# on AVX-512 than on AVX2 here.)
_AVX2_CAPS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
# A CPU with AVX-VNNI and no AVX-512 (Intel's client CPUs) runs torch's AVX2 kernels too.
TORCH_ISA_CAPS = {"avx2": _AVX2_CAPS, "avx_vnni": _AVX2_CAPS}
TOKENMILL = "tokenmill"
LLAMA = "llama.cpp"
TRANSFORMERS = "transformers"

# 40 topics x 4 audiences = 160 distinct user messages, enough that the default sweep
# (109 requests with the warm-up) never repeats one.
TOPICS = [
    "volcanoes",
    "the water cycle",
    "photosynthesis",
    "black holes",
    "the printing press",
    "honey bees",
    "the moon landing",
    "earthquakes",
    "coral reefs",
    "the internet",
    "electric cars",
    "the Silk Road",
    "glaciers",
    "vaccines",
    "jazz music",
    "tides",
    "the Roman roads",
    "rainbows",
    "compound interest",
    "the human heart",
    "bread yeast",
    "solar panels",
    "bird migration",
    "the periodic table",
    "lighthouses",
    "recycling",
    "the Great Wall",
    "thunderstorms",
    "coffee farming",
    "sound waves",
    "the stock market",
    "desert plants",
    "steam engines",
    "the immune system",
    "maps and compasses",
    "the northern lights",
    "paper making",
    "octopuses",
    "wind turbines",
    "sleep",
]
AUDIENCES = ["curious adults", "new volunteers", "high school pupils", "retired engineers"]
TEMPLATE = (
    "I am putting together a short lesson on {topic} for {audience}. Please write an "
    "explanation that starts with where the idea comes from, then covers the main facts a "
    "beginner should know, one common misunderstanding and why people tend to believe it, "
    "and an everyday example that makes the idea easier to remember. Keep the tone friendly "
    "and avoid jargon; when a technical word cannot be avoided, explain it in plain "
    "language the first time it appears. End with two open questions the group could "
    "discuss afterwards."
)
WARMUP_PROMPT = "Say hello in three languages."


def bench_prompts() -> list[str]:
    """The fixed prompt set; neighbours differ in topic so batches are not all alike."""
    return [
        TEMPLATE.format(topic=topic, audience=audience)
        for audience in AUDIENCES
        for topic in TOPICS
    ]


@dataclass
class Row:
    system: str
    concurrency: int
    requests: int
    failed: int
    output_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    round: int = 0


def requests_for(concurrency: int, args: argparse.Namespace) -> int:
    return max(args.requests_per_stream * concurrency, args.min_requests)


# -- servers -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(log, limit: int = 3000) -> str:
    log.seek(0)
    return log.read()[-limit:]


@contextlib.contextmanager
def running_server(name: str, argv: list[str], port: int, timeout: float) -> Iterator[str]:
    """Start `argv` listening on `port`, yield its base URL once /health answers 200.

    The server gets its own session, so a Ctrl-C at the terminal reaches only this script,
    which then stops the server itself (SIGTERM, then SIGKILL) on the way out, as it does
    after an error or at the end.
    """
    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_ready(name, process, url, timeout, log)
            yield url
        finally:
            _stop(process)


def _wait_ready(name: str, process: subprocess.Popen, url: str, timeout: float, log) -> None:
    """Until /health answers 200 and, for tokenmill, its background compile has finished:
    the benchmark measures the steady state, not the first seconds of eager serving."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"{name} exited with code {process.returncode} during start-up:\n{_log_tail(log)}"
            )
        with contextlib.suppress(httpx.HTTPError):
            health = httpx.get(f"{url}/health", timeout=5)
            state = _compile_state(health)
            if health.status_code == 200 and state != "compiling":
                if state == "failed":
                    print(
                        f"warning: {name}'s compile failed; measuring eager mode", file=sys.stderr
                    )
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} was not ready after {timeout:.0f} s:\n{_log_tail(log)}")
        time.sleep(0.5)


def _compile_state(health: httpx.Response) -> str | None:
    """tokenmill's /health says how far its background compile is; other servers' don't."""
    try:
        body = health.json()
    except ValueError:
        return None
    return body.get("compile") if isinstance(body, dict) else None


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(wait)
            return


def served_model(url: str) -> str:
    """The id the server lists first: tokenmill checks the `model` field, llama.cpp not."""
    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]


async def _drive(
    url: str, model: str, args: argparse.Namespace, prompts: list[str], system: str
) -> list[Row]:
    base = loadgen.options_for(url, model, args.tokens, "--timeout", str(args.request_timeout))
    warmup = argparse.Namespace(**{**vars(base), "max_tokens": min(8, args.tokens)})
    async with httpx.AsyncClient(base_url=base.base_url, timeout=base.timeout) as client:
        first = await loadgen.one_request(client, warmup, WARMUP_PROMPT)
    if not first.ok:
        raise RuntimeError(f"{system}: warm-up request failed: {first.error}")
    rows, sent = [], 0
    for concurrency in args.concurrency:
        level = argparse.Namespace(**{**vars(base), "requests": requests_for(concurrency, args)})
        report = await loadgen.run_level(level, concurrency, prompts, first=sent)
        sent += report.requests
        expected = args.tokens * (report.requests - report.failed)
        if report.output_tokens != expected:
            print(
                f"warning: {system} at {concurrency} streams generated "
                f"{report.output_tokens} tokens, expected {expected}",
                file=sys.stderr,
            )
        rows.append(
            Row(
                system,
                concurrency,
                report.requests,
                report.failed,
                report.output_tok_s,
                report.ttft_p50_ms,
                report.ttft_p99_ms,
                report.itl_p50_ms,
                report.itl_p99_ms,
            )
        )
        _progress(rows[-1])
    return rows


def measure_server(
    system: str, argv_for: Callable[[int], list[str]], args: argparse.Namespace, prompts: list[str]
) -> list[Row]:
    """Start the server that `argv_for(port)` runs, sweep it, stop it."""
    argv = argv_for(port := free_port())
    print(f"{system}: starting {shlex.join(argv)}", file=sys.stderr)
    with running_server(system, argv, port, args.startup_timeout) as url:
        return asyncio.run(_drive(url, served_model(url), args, prompts, system))


def serve_argv(port: int, *options: str) -> list[str]:
    """`python -m engine.serve` on `port`, quiet (warnings only, no access log), plus
    `options`: every benchmark starts tokenmill's server through this. Without a data
    directory or database in `options`, the server gets a scratch directory of its own,
    removed at exit: not the user's (a server running there holds it, and benchmark
    responses do not belong in it)."""
    if "--data-dir" not in options and "--database-url" not in options:
        options = (*options, "--data-dir", tempfile.mkdtemp(dir=_scratch().name))
    return [
        sys.executable, "-m", "engine.serve", "--port", str(port),
        "--log-level", "warning", "--no-access-log", *options,
    ]  # fmt: skip


@functools.cache
def _scratch() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="tokenmill-bench-")


def tokenmill_argv(args: argparse.Namespace, port: int) -> list[str]:
    return serve_argv(port, "--model", args.model, *shlex.split(args.tokenmill_args))


def llama_argv(args: argparse.Namespace, gguf: str, prompt_tokens: int, port: int) -> list[str]:
    """-np slots for the largest level, each with room for a prompt and its output."""
    slots = max(args.concurrency)
    context = slots * (prompt_tokens + args.tokens + 16)
    return [
        args.llama_server,
        "-m",
        gguf,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-t",
        str(args.llama_threads),
        "-np",
        str(slots),
        "-cb",
        "-c",
        str(context),
        *shlex.split(args.llama_args),
    ]


# -- transformers ------------------------------------------------------------------------


def measure_transformers(
    args: argparse.Namespace, gguf_or_folder: str, prompt_ids: list[list[int]], pad_id: int
) -> list[Row]:
    """One left-padded batch of C prompts per level; every stream shares the step clock."""
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer

    class StepClock(BaseStreamer):
        """`generate` hands the streamer the prompt, then each step's new tokens."""

        def __init__(self) -> None:
            self.prompt_seen = False
            self.times: list[float] = []

        def put(self, value) -> None:
            if self.prompt_seen:
                self.times.append(time.perf_counter())
            self.prompt_seen = True

        def end(self) -> None:
            pass

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{TRANSFORMERS}: loading {gguf_or_folder} (float32, {device})", file=sys.stderr)
    path = Path(gguf_or_folder)
    if path.is_file():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = model.to(device).eval()

    def generate(prompts: list[list[int]], tokens: int) -> StepClock:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        clock = StepClock()
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=pad_id,
            streamer=clock,
        )
        return clock

    generate(prompt_ids[:1], min(8, args.tokens))  # warm-up
    rows = []
    for concurrency in args.concurrency:
        batch = [prompt_ids[i % len(prompt_ids)] for i in range(concurrency)]
        start = time.perf_counter()
        clock = generate(batch, args.tokens)
        total = time.perf_counter() - start
        assert len(clock.times) == args.tokens, "generate stopped early"
        ttft_ms = 1000 * (clock.times[0] - start)
        gaps = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
        rows.append(
            Row(
                TRANSFORMERS,
                concurrency,
                concurrency,
                0,
                round(concurrency * args.tokens / total, 1),
                round(ttft_ms, 1),
                round(ttft_ms, 1),
                round(1000 * loadgen.percentile(gaps, 50), 1),
                round(1000 * loadgen.percentile(gaps, 99), 1),
            )
        )
        _progress(rows[-1])
    return rows


# -- the table ---------------------------------------------------------------------------


def _progress(row: Row) -> None:
    print(
        f"  {row.system} at {row.concurrency} streams: {row.output_tok_s} tok/s, "
        f"TTFT p50 {row.ttft_p50_ms} ms, ITL p50 {row.itl_p50_ms} ms",
        file=sys.stderr,
    )


def _ratio(ours: float, theirs: float | None) -> str:
    return f"{ours / theirs:.2f}x" if theirs else ""


def table(rows: list[Row]) -> str:
    """Markdown, grouped by concurrency; ratios sit on tokenmill's rows.

    "tok/s vs X" is tokenmill's output rate over X's at the same concurrency (higher is
    better); "TTFT vs llama.cpp" is tokenmill's TTFT p50 over llama.cpp's (lower is better).
    """
    by_key = {(r.system, r.concurrency): r for r in rows}
    systems = [s for s in (TOKENMILL, LLAMA, TRANSFORMERS) if any(r.system == s for r in rows)]
    has_llama = LLAMA in systems
    header = [
        "system",
        "streams",
        "requests",
        "output tok/s",
        "TTFT p50 (ms)",
        "TTFT p99 (ms)",
        "ITL p50 (ms)",
        "ITL p99 (ms)",
    ]
    if TRANSFORMERS in systems:
        header.append("tok/s vs transformers")
    if has_llama:
        header += ["tok/s vs llama.cpp", "TTFT vs llama.cpp"]
    body = []
    for concurrency in sorted({r.concurrency for r in rows}):
        for system in systems:
            row = by_key.get((system, concurrency))
            if row is None:
                continue
            requests = f"{row.requests}" + (f" ({row.failed} failed)" if row.failed else "")
            cells = [
                system,
                str(concurrency),
                requests,
                f"{row.output_tok_s:.1f}",
                f"{row.ttft_p50_ms:.1f}",
                f"{row.ttft_p99_ms:.1f}",
                f"{row.itl_p50_ms:.1f}",
                f"{row.itl_p99_ms:.1f}",
            ]
            hf = by_key.get((TRANSFORMERS, concurrency))
            llama = by_key.get((LLAMA, concurrency))
            ours = system == TOKENMILL
            if TRANSFORMERS in systems:
                cells.append(_ratio(row.output_tok_s, hf and hf.output_tok_s) if ours else "")
            if has_llama:
                cells.append(_ratio(row.output_tok_s, llama and llama.output_tok_s) if ours else "")
                cells.append(_ratio(row.ttft_p50_ms, llama and llama.ttft_p50_ms) if ours else "")
            body.append(cells)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2)) for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([fmt(header), rule, *(fmt(cells) for cells in body)])


_MEASURES = ("output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")


def medians(rows: list[Row]) -> list[Row]:
    """One row per system and level: each measure's median over the rounds, the failures
    summed. Each measure's median is taken on its own, so a row need not be one round's."""
    groups: dict[tuple[str, int], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.system, row.concurrency), []).append(row)
    return [
        Row(
            system,
            concurrency,
            group[0].requests,
            sum(r.failed for r in group),
            *(round(statistics.median(getattr(r, name) for r in group), 1) for name in _MEASURES),
        )
        for (system, concurrency), group in groups.items()
    ]


def round_ratios(rows: list[Row]) -> str:
    """Each round's tok/s ratios (and TTFT p50 against llama.cpp), tokenmill over each
    baseline: the systems of a round ran minutes apart, so these show the spread that the
    medians hide."""
    by_key = {(r.system, r.concurrency, r.round): r for r in rows}
    rounds = sorted({r.round for r in rows})
    lines = []
    for concurrency in sorted({r.concurrency for r in rows}):
        for baseline, measure, label in (
            (TRANSFORMERS, "output_tok_s", "tok/s vs transformers"),
            (LLAMA, "output_tok_s", "tok/s vs llama.cpp"),
            (LLAMA, "ttft_p50_ms", "TTFT p50 vs llama.cpp"),
        ):
            pairs = [
                (by_key.get((TOKENMILL, concurrency, n)), by_key.get((baseline, concurrency, n)))
                for n in rounds
            ]
            ratios = [
                _ratio(getattr(ours, measure), getattr(theirs, measure))
                for ours, theirs in pairs
                if ours and theirs
            ]
            if ratios:
                streams = f"{concurrency} stream" + ("s" if concurrency != 1 else "")
                lines.append(f"- {streams}, {label}: {', '.join(ratios)}")
    return "\n".join(lines)


def torch_isa() -> str:
    """The instruction set torch's vectorized ops run, and the caps given to MKL/oneDNN."""
    import torch

    caps = [f"{name}={os.environ[name]}" for name in _AVX2_CAPS if name in os.environ]
    return torch.backends.cpu.get_cpu_capability() + (f" ({', '.join(caps)})" if caps else "")


def describe(
    args: argparse.Namespace,
    prompt_lengths: list[int],
    loads: dict[str, list[tuple[float, float]]],
) -> str:
    """What was run, and how busy the machine was: the benchmark itself keeps about as
    many cores busy as the machine has, so a 1-minute load average well above the core
    count means other work competed with the system being measured."""
    used = prompt_lengths[: sum(requests_for(c, args) for c in args.concurrency)]
    levels = ", ".join(f"{c}: {requests_for(c, args)}" for c in args.concurrency)
    return "\n".join(
        [
            f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, {platform.node()}, "
            f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); "
            f"systems: {', '.join(loads)}.",
            f"CPU kernel targets: the CPU runs {', '.join(kernels.native.runnable_isas())}; "
            f"tokenmill used {kernels.native.cpu_isa()}"
            + (
                f" ({kernels.native.ISA_ENV}={os.environ[kernels.native.ISA_ENV]})"
                if os.environ.get(kernels.native.ISA_ENV)
                else ""
            )
            + f"; torch's kernels: {torch_isa()}.",
            f"Model {args.model}; greedy, {args.tokens} output tokens per request (ignore_eos); "
            f"prompts {min(used)}-{max(used)} tokens (mean {sum(used) / len(used):.1f}) after "
            f"the chat template; closed-loop streams; requests per level ({levels})"
            + (
                f"; {args.rounds} rounds, the systems in turn, each level's medians below."
                if args.rounds > 1
                else "."
            ),
            "1-minute load average before/after each system"
            + (", round by round: " if args.rounds > 1 else ": ")
            + "; ".join(
                f"{system} " + ", ".join(f"{a:.2f}/{b:.2f}" for a, b in runs)
                for system, runs in loads.items()
            )
            + ".",
        ]
    )


# -- main ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="short name, GGUF file or HF folder; llama.cpp needs a GGUF",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1, 4, 16, 32],
        help="closed-loop streams per level",
    )
    p.add_argument("--tokens", type=int, default=128, help="output tokens per request")
    p.add_argument(
        "--requests-per-stream",
        type=int,
        default=2,
        help="requests per level = this x streams (at least --min-requests)",
    )
    p.add_argument("--min-requests", type=int, default=4)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: levels 1 and 4, 16 output tokens (overrides both)",
    )
    p.add_argument(
        "--tokenmill-args",
        default="",
        help='extra `python -m engine.serve` options, e.g. "--max-num-seqs 32"',
    )
    p.add_argument(
        "--llama-server",
        default=None,
        metavar="PATH",
        help="a llama.cpp `llama-server` binary; without it llama.cpp is skipped",
    )
    p.add_argument("--llama-threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--llama-args", default="", help="extra llama-server options")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument(
        "--skip-tokenmill",
        action="store_true",
        help="baselines only, e.g. to re-measure llama.cpp alone",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the systems in turn this many times and report each level's median",
    )
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds per server")
    p.add_argument("--request-timeout", type=float, default=1800.0, help="seconds per request")
    p.add_argument(
        "--markdown",
        default=None,
        metavar="FILE",
        help="also write the description and table to FILE",
    )
    return p


def cap_torch_isa() -> None:
    """Run this script again with torch's kernels capped to the forced target (see
    TORCH_ISA_CAPS) unless they already are: they read the caps only when they load."""
    caps = TORCH_ISA_CAPS.get(os.environ.get(kernels.native.ISA_ENV, ""), {})
    missing = {name: value for name, value in caps.items() if os.environ.get(name) != value}
    if missing:
        argv = [sys.executable, *sys.argv]
        os.execve(sys.executable, argv, {**os.environ, **missing})


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.tokens = [1, 4], 16
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    prompts = bench_prompts()
    sent = sum(requests_for(c, args) for c in args.concurrency)
    if sent > len(prompts):
        # A repeated prompt is a prefix-cache hit for tokenmill (its whole prompt, across
        # requests) but only within a slot for llama.cpp: the levels would not compare.
        parser.error(
            f"the levels send {sent} requests, more than the {len(prompts)} distinct "
            "prompts: lower --min-requests or --requests-per-stream"
        )

    from engine.loader import resolve_model  # after parsing, so --help stays instant
    from engine.loader.gguf import read_gguf
    from engine.tokenizer import Tokenizer

    resolved = resolve_model(args.model)
    if args.llama_server and resolved.kind != "gguf":
        raise SystemExit(f"llama-server needs a GGUF file; {args.model} is a {resolved.kind}")
    if resolved.kind == "gguf":
        tokenizer = Tokenizer.from_gguf(read_gguf(resolved.path).metadata)
    else:
        tokenizer = Tokenizer.from_hf_folder(resolved.path)
    prompt_ids = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts]
    lengths = [len(ids) for ids in prompt_ids]

    runs = {}
    if not args.skip_tokenmill:
        runs[TOKENMILL] = partial(
            measure_server, TOKENMILL, partial(tokenmill_argv, args), args, prompts
        )
    if args.llama_server:
        llama = partial(llama_argv, args, resolved.path, max(lengths))
        runs[LLAMA] = partial(measure_server, LLAMA, llama, args, prompts)
    if not args.skip_transformers:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        runs[TRANSFORMERS] = partial(measure_transformers, args, resolved.path, prompt_ids, pad_id)
    rows: list[Row] = []
    loads: dict[str, list[tuple[float, float]]] = {system: [] for system in runs}
    for number in range(args.rounds):
        for system, run in runs.items():
            if args.rounds > 1:
                print(f"round {number + 1} of {args.rounds}: {system}", file=sys.stderr)
            before = os.getloadavg()[0]
            rows += [replace(row, round=number) for row in run()]
            loads[system].append((before, os.getloadavg()[0]))

    report = describe(args, lengths, loads) + "\n\n" + table(medians(rows))
    if args.rounds > 1 and (ratios := round_ratios(rows)):
        report += "\n\nTokenmill over each baseline, round by round:\n" + ratios
    print(report)
    if args.markdown:
        Path(args.markdown).write_text(report + "\n")
    return rows


if __name__ == "__main__":
    cap_torch_isa()
    try:
        main()
    except KeyboardInterrupt:  # the servers are already stopped by then
        sys.exit("interrupted")
