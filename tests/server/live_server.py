"""Start `python -m engine.serve` as a subprocess on a free port, for the live tests."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "sk-tokenmill-test"
_READY = re.compile(r"serving on (http://127\.0\.0\.1:\d+)")


@dataclass
class LiveServer:
    process: subprocess.Popen
    url: str
    log: IO[str]  # the server's stderr
    scratch_dir: str | None = None  # a data directory made for this server, removed on stop

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        match = re.search(rf"^tokenmill:{name} (\S+)$", text, re.MULTILINE)
        assert match, f"metric {name} missing"
        return float(match.group(1))

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self.scratch_dir is not None:
            shutil.rmtree(self.scratch_dir, ignore_errors=True)
        return self.process.returncode


def start_server(
    *args: str,
    startup_timeout: float = 300,
    python: str = sys.executable,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    entry: str = "engine.serve",
) -> LiveServer:
    """The default model, with the given extra flags; returns once it prints its URL.
    `python`, `cwd` and `env` run it from elsewhere (an installed wheel); `entry` is the
    module to run (a test's wrapper around engine.serve). Without --data-dir or
    --database-url the server stores into a fresh scratch directory."""
    scratch = None
    if "--data-dir" not in args and "--database-url" not in args:
        scratch = tempfile.mkdtemp(prefix="tokenmill-test-")
        args = (*args, "--data-dir", scratch)
    # Lives as long as the server (closed by stop()); read back if start-up fails.
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
    process = subprocess.Popen(
        [python, "-m", entry, "--port", "0", "--log-level", "warning", "--no-access-log", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    deadline = time.monotonic() + startup_timeout
    assert process.stdout is not None
    for line in process.stdout:  # ends if the process dies
        match = _READY.search(line)
        if match:
            return LiveServer(process, match.group(1), log, scratch)
        assert time.monotonic() < deadline, "server did not start in time"
    code = process.wait()
    process.stdout.close()
    log.seek(0)
    raise AssertionError(f"server exited during start-up with code {code}:\n{log.read()[-3000:]}")
