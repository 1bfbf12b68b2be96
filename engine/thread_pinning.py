"""Pinning the engine thread's OpenMP team to one CPU per thread.

Why: with as many engine threads as CPUs, Linux's scheduler now and then places two of
the team's threads on one CPU (a wake-up that arrived while the other CPU was busy) and
leaves them there for tens of milliseconds while the other CPU runs lower-priority work,
such as the server's SCHED_IDLE preparation process; the two then take turns in 3-4 ms
slices, and a parallel region runs at half speed or worse. Pinned, each thread keeps a
CPU that only other tasks share, and a woken thread preempts SCHED_IDLE work on it at
once. Measured 2026-12-03 on a 2-vCPU Intel Xeon (avx512_vnni, Linux 6.18):
- `python benchmarks/bench_abuse.py --requests 64 --rounds 4`, p99 TTFT ratio: 0.94-1.26
  in eight runs pinned, 1.14-2.12 in eighteen unpinned (`perf sched timehist` showed the
  two threads sharing CPU 0 during the slowest steps, 80-160 ms against 27);
- `bench_serving.py --skip-transformers`, 16 streams: the same tok/s (720-744 pinned,
  714-738 not) with ITL p99 20 ms against 28-128 ms; one stream (16 requests) 4-8%
  slower, 162-164 tok/s against 177-179: the event loop's work for each token now
  always waits for a team thread's CPU. Pinning only the workers kept the single
  stream's speed but not the abuse ratio (1.73-2.10).

Only a team that fills the process's CPUs is pinned: a smaller one, pinned to the first
CPUs, would crowd another process doing the same (two servers on one machine), where
left alone the scheduler spreads them.

Threads and processes that the pinned engine thread starts afterwards inherit its single
CPU; `keep_cpus()` gives a thread pool's threads the CPUs of the thread that made it.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)

# OpenMP runtimes that torch may have loaded (GNU, Intel, LLVM); each exports GCC's
# GOMP_parallel, the call a `#pragma omp parallel` compiles to.
_RUNTIMES = ("libgomp.so.1", "libiomp5.so", "libomp.so")


def pin_openmp_team(num_threads: int) -> list[int] | None:
    """Pin the calling thread's OpenMP team of `num_threads` (itself, thread 0, and its
    workers) to one CPU each, in order; the CPUs, or None if it was left alone (why is
    logged). The team is the one the calling thread's parallel regions reuse."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if num_threads < 2 or num_threads != len(cpus):
        log.info(
            "engine threads not pinned: %d thread(s) for %d CPU(s); only a team that "
            "fills the CPUs is pinned",
            num_threads,
            len(cpus),
        )
        return None
    runtime = _loaded_runtime()
    if runtime is None:
        log.info("engine threads not pinned: no OpenMP runtime is loaded")
        return None
    pinned: dict[int, int] = {}
    failures: list[BaseException] = []

    def pin_self(_: ctypes.c_void_p) -> None:  # runs on every thread of the team, with the GIL
        index = runtime.omp_get_thread_num()
        try:
            os.sched_setaffinity(0, {cpus[index]})
        except (OSError, IndexError) as exc:
            failures.append(exc)
            return
        pinned[index] = cpus[index]

    callback = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(pin_self)
    runtime.GOMP_parallel(callback, None, ctypes.c_uint(num_threads), ctypes.c_uint(0))
    if failures or len(pinned) != num_threads:
        os.sched_setaffinity(0, cpus)  # this thread back to them all; workers may stay
        log.warning(
            "engine threads not pinned: the OpenMP team ran %d of %d threads (%s)",
            len(pinned),
            num_threads,
            failures[0] if failures else "fewer threads than asked",
        )
        return None
    log.info("engine threads pinned, one per CPU: %s", cpus)
    return cpus


def keep_cpus() -> Callable[[], None]:
    """A thread-pool initializer that gives the pool's threads the CPUs the calling thread
    has now, whatever the thread that later starts them is pinned to."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None

    def restore() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    return restore


def _loaded_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime already in the process (never a second one loaded here)."""
    for name in _RUNTIMES:
        try:
            runtime = ctypes.CDLL(name, mode=os.RTLD_NOLOAD)
        except OSError:
            continue
        runtime.GOMP_parallel.restype = None
        runtime.omp_get_thread_num.restype = ctypes.c_int
        return runtime
    return None
