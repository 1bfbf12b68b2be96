"""Tool benchmarks (issue 17): what the code sandbox costs, and what it takes from serving.

1. Sandbox start-to-result latency: `Sandbox().run("print(1)")` end to end (bwrap,
   namespaces, the launcher, Python start-up, collecting the result), against the same
   Python started unsandboxed (`python3 -I -c "print(1)"`) in the same loop, the two
   alternating so that machine noise hits both. Target: p50 <= 150 ms.
2. CPU share: one busy loop per core on the host (each in a session of its own, as a
   server is) next to 4 busy-looping sandboxes, for a few seconds: the CPU time each
   side got. This isolates the scheduling bound from the engine's own noise.
3. 16 streams' output tok/s from `python -m engine.serve` while 4 sandboxes run busy
   loops, against the same load without them, alternating rounds on one server.
   Target: >= 0.8x. The sandboxes run at nice 19 (see orchestrator/sandbox.py).

    python benchmarks/bench_tools.py                 # both
    python benchmarks/bench_tools.py --no-serving    # latency and CPU share (seconds)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts
import bench_serving  # noqa: E402
import loadgen  # noqa: E402

from orchestrator.sandbox import Sandbox, SandboxLimits, running_pids  # noqa: E402

BUSY_LOOP = "while True:\n    pass\n"


async def _unsandboxed(python: str) -> float:
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        python, "-I", "-c", "print(1)", stdout=asyncio.subprocess.PIPE
    )
    await proc.communicate()
    return time.perf_counter() - started


async def latency(runs: int) -> dict[str, list[float]]:
    sandbox = Sandbox()
    times: dict[str, list[float]] = {"sandbox": [], "unsandboxed": []}
    await sandbox.run("print(1)")  # page cache warm for both
    for _ in range(runs):
        started = time.perf_counter()
        result = await sandbox.run("print(1)")
        assert result.stdout == "1\n", result
        times["sandbox"].append(time.perf_counter() - started)
        times["unsandboxed"].append(await _unsandboxed(sandbox.python))
    return times


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, IndexError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


async def cpu_share(busy: int, seconds: float, nice: int) -> dict[str, float]:
    """CPU seconds the host's busy loops and the sandboxes' got over `seconds`."""
    sandbox = Sandbox(max_concurrent=busy)
    labels = [uuid.uuid4().hex for _ in range(busy)]
    limits = replace(SandboxLimits(), wall_seconds=3600, cpu_seconds=3600, nice=nice)
    loops = [asyncio.create_task(sandbox.run(BUSY_LOOP, limits, label)) for label in labels]
    host = [
        subprocess.Popen([sys.executable, "-c", BUSY_LOOP], start_new_session=True)
        for _ in range(os.cpu_count() or 1)
    ]
    try:
        await asyncio.sleep(2)  # every run started and lowered
        groups = {
            "host": lambda: [p.pid for p in host],
            "sandboxes": lambda: [pid for label in labels for pid in running_pids(label)],
        }
        before = {name: _cpu_seconds(pids()) for name, pids in groups.items()}
        await asyncio.sleep(seconds)
        return {name: _cpu_seconds(pids()) - before[name] for name, pids in groups.items()}
    finally:
        for process in host:
            process.kill()
            process.wait()
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)


async def _level(args: argparse.Namespace, url: str, model: str, first: int) -> float:
    level = loadgen.options_for(url, model, args.tokens, "--requests", str(args.requests))
    report = await loadgen.run_level(
        level, args.streams, bench_serving.bench_prompts(), first=first
    )
    if report.failed:
        raise RuntimeError(f"{report.failed} requests failed")
    return report.output_tok_s


async def serving_rounds(args: argparse.Namespace, url: str) -> dict[str, list[float]]:
    model = bench_serving.served_model(url)
    sandbox = Sandbox(max_concurrent=args.busy)
    busy = replace(SandboxLimits(), wall_seconds=3600, cpu_seconds=3600)
    rates: dict[str, list[float]] = {"alone": [], "with busy sandboxes": []}
    await _level(argparse.Namespace(**{**vars(args), "requests": args.streams}), url, model, 0)
    sent = args.streams
    for _ in range(args.rounds):
        rates["alone"].append(await _level(args, url, model, sent))
        sent += args.requests
        loops = [asyncio.create_task(sandbox.run(BUSY_LOOP, busy)) for _ in range(args.busy)]
        await asyncio.sleep(1)  # the loops are spinning
        try:
            rates["with busy sandboxes"].append(await _level(args, url, model, sent))
        finally:
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
        sent += args.requests
        print(
            f"round: alone {rates['alone'][-1]} tok/s, with {args.busy} busy sandboxes "
            f"{rates['with busy sandboxes'][-1]} tok/s",
            file=sys.stderr,
        )
    return rates


def serving(args: argparse.Namespace) -> dict[str, list[float]]:
    port = bench_serving.free_port()
    argv = bench_serving.serve_argv(port)
    with bench_serving.running_server("tokenmill", argv, port, args.startup_timeout) as url:
        return asyncio.run(serving_rounds(args, url))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=30, help="sandbox runs for the latency")
    p.add_argument("--no-serving", action="store_true", help="skip the serving figure")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--busy", type=int, default=4, help="busy-looping sandboxes")
    p.add_argument("--requests", type=int, default=32, help="requests per measured level")
    p.add_argument("--tokens", type=int, default=32, help="output tokens per request")
    p.add_argument("--rounds", type=int, default=2, help="alone/busy pairs")
    p.add_argument("--share-seconds", type=float, default=5, help="CPU-share window")
    p.add_argument("--startup-timeout", type=float, default=600)
    args = p.parse_args(argv)

    isa = sorted(
        set(Path("/proc/cpuinfo").read_text().split()) & {"avx2", "avx512_vnni", "avx_vnni"}
    )
    print(
        f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs, ISA "
        f"{'/'.join(isa)}, load average {os.getloadavg()[0]:.1f}: "
        f"python benchmarks/bench_tools.py {' '.join(argv or sys.argv[1:])}\n"
    )
    times = asyncio.run(latency(args.runs))
    print("| start-to-result, print(1) | p50 (ms) | p90 (ms) |\n|---|---:|---:|")
    for name, values in times.items():
        print(
            f"| {name} | {1000 * loadgen.percentile(values, 50):.0f} "
            f"| {1000 * loadgen.percentile(values, 90):.0f} |"
        )
    ratio = loadgen.percentile(times["sandbox"], 50) / loadgen.percentile(times["unsandboxed"], 50)
    print(f"\nsandbox p50 / unsandboxed p50 = {ratio:.2f}x (target: sandbox p50 <= 150 ms)\n")
    print(
        f"| CPU seconds over {args.share_seconds:g} s, against {os.cpu_count()} host busy "
        f"loops | host loops | {args.busy} busy sandboxes |\n|---|---:|---:|"
    )
    for nice in (SandboxLimits().nice, 0):
        share = asyncio.run(cpu_share(args.busy, args.share_seconds, nice))
        print(
            f"| sandboxes at nice {nice}{' (baseline)' if nice == 0 else ''} "
            f"| {share['host']:.2f} | {share['sandboxes']:.2f} |"
        )
    print()
    if args.no_serving:
        return
    rates = serving(args)
    print(
        f"| {args.streams} streams, {args.tokens} tokens each | output tok/s (rounds) | mean |"
        "\n|---|---|---:|"
    )
    for name, values in rates.items():
        print(
            f"| {name} | {', '.join(f'{v:.1f}' for v in values)} | {statistics.mean(values):.1f} |"
        )
    ratio = statistics.mean(rates["with busy sandboxes"]) / statistics.mean(rates["alone"])
    print(f"\nwith {args.busy} busy sandboxes / alone = {ratio:.2f}x (target >= 0.8x)")


if __name__ == "__main__":
    main()
