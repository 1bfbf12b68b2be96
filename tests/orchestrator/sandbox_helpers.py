"""Small limits for fast sandbox tests, and a wait for a run's processes to be gone."""

from __future__ import annotations

import os
import time

from orchestrator.sandbox import SandboxLimits, running_pids

# nice 0: on a busy machine a nice-19 run may not get its CPU-second before the deadline.
FAST = SandboxLimits(
    wall_seconds=10,
    cpu_seconds=2,
    memory_bytes=256 << 20,
    processes=16,
    file_bytes=1 << 20,
    workdir_bytes=8 << 20,
    output_bytes=64 << 10,
    report_bytes=64 << 10,
    nice=0,
)


def wait_until_gone(label: str, seconds: float = 10) -> list[int]:
    """The run's processes still alive after up to `seconds` (the kernel tears a PID
    namespace down asynchronously once its init dies)."""
    deadline = time.monotonic() + seconds
    while (left := running_pids(label)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def host_can_spawn() -> bool:
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7
