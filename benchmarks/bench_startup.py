"""Server start-up time: from `python -m engine.serve` to its "serving on" line.

    python benchmarks/bench_startup.py --runs 3
    python benchmarks/bench_startup.py --runs 3 --baseline /tmp/base   # another checkout

Each run starts the server on a fresh data directory, so its store is migrated from empty
as on a first start, and stops it once it prints its URL. With `--baseline` (a checkout of
an earlier tree, e.g. `git worktree add /tmp/base <commit>`), the runs alternate between
that checkout and this one, so that the machine's slower minutes hit both alike; each
server runs from its own checkout with this interpreter.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def time_to_ready(checkout: Path, extra: list[str]) -> float:
    """Seconds from the server's launch to its "serving on" line."""
    with tempfile.TemporaryDirectory(prefix="tokenmill-startup-") as data_dir:
        start = time.monotonic()
        command = [sys.executable, "-m", "engine.serve", "--port", "0", "--data-dir", data_dir]
        server = subprocess.Popen(
            [*command, "--log-level", "warning", *extra],
            cwd=checkout,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert server.stdout is not None
        try:
            for line in server.stdout:
                if "serving on" in line:
                    return time.monotonic() - start
            raise RuntimeError(f"the server in {checkout} exited before serving")
        finally:
            server.terminate()
            server.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline", type=Path, default=None, help="a checkout to alternate with")
    ap.add_argument("--server-args", default="", help="extra engine.serve flags, one string")
    args = ap.parse_args()
    checkouts = [args.baseline, ROOT] if args.baseline is not None else [ROOT]
    times: dict[Path, list[float]] = {c: [] for c in checkouts}
    for _ in range(args.runs):
        for checkout in checkouts:
            times[checkout].append(time_to_ready(checkout, args.server_args.split()))
            print(f"{checkout}: {times[checkout][-1]:.2f} s", flush=True)
    for checkout, took in times.items():
        print(
            f"{checkout}: median {statistics.median(took):.2f} s "
            f"(min {min(took):.2f}, max {max(took):.2f}, {len(took)} runs)"
        )


if __name__ == "__main__":
    main()
