"""Small limits for fast sandbox tests, and a look for processes a run left behind."""

from __future__ import annotations

import os
import time
from pathlib import Path

from orchestrator.sandbox import SandboxLimits

# nice 0: on a busy machine a nice-19 run may not get its CPU-second before the deadline.
FAST = SandboxLimits(wall_seconds=10, cpu_seconds=2, memory_bytes=256 << 20, processes=16,
                     file_bytes=1 << 20, workdir_bytes=8 << 20, output_bytes=64 << 10,
                     report_bytes=64 << 10, nice=0)


def sandbox_pids(label: str) -> list[int]:
    """Host pids whose command line carries the run's label."""
    tag = f"tokenmill-sandbox:{label}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if tag in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:  # gone meanwhile
                pass
    return pids


def wait_until_gone(label: str, seconds: float = 10) -> list[int]:
    """The run's processes still alive after up to `seconds` (the kernel tears a PID
    namespace down asynchronously once its init dies)."""
    deadline = time.monotonic() + seconds
    while (left := sandbox_pids(label)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def host_can_spawn() -> bool:
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7
