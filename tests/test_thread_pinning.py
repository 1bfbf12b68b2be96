"""Pinning the engine thread's OpenMP team: one CPU per thread when the team fills the
CPUs, nothing otherwise, and never the caller's thread (AsyncLLM's use of it:
tests/test_async_llm.py)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from engine.thread_pinning import keep_cpus, pin_openmp_team

CPUS = sorted(os.sched_getaffinity(0))
needs_two_cpus = pytest.mark.skipif(len(CPUS) < 2, reason="a team of one is never pinned")


def busy_threads(work) -> dict[int, set[int]]:
    """The CPUs allowed to each of this process's threads that ran while `work()` did."""

    def run_times() -> dict[int, int]:
        times = {}
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                times[int(tid)] = int(f.read().split()[0])
        return times

    before = run_times()
    work()
    after = run_times()
    grew = [tid for tid in after if after[tid] - before.get(tid, 0) > 20_000_000]
    return {tid: os.sched_getaffinity(tid) for tid in grew}


def on_new_thread(fn):
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join()
    return result[0]


@needs_two_cpus
def test_a_team_that_fills_the_cpus_runs_one_thread_per_cpu():
    def engine_thread():
        torch.set_num_threads(len(CPUS))
        a = torch.randn(1500, 1500)
        a @ a  # the team exists before it is pinned, as after loading a model
        pool = ThreadPoolExecutor(1, initializer=keep_cpus())
        pinned = pin_openmp_team(len(CPUS))
        busy = busy_threads(lambda: [a @ a for _ in range(30)])
        later = pool.submit(os.sched_getaffinity, 0).result()
        pool.shutdown()
        return pinned, os.sched_getaffinity(0), busy, later

    pinned, own, busy, later = on_new_thread(engine_thread)
    assert pinned == CPUS and own == {CPUS[0]}
    # The matmuls ran on the pinned team: one thread per CPU, each on its own.
    assert sorted(next(iter(cpus)) for cpus in busy.values() if len(cpus) == 1) == CPUS
    assert later == set(CPUS)  # a pool started after the pinning keeps every CPU
    assert sorted(os.sched_getaffinity(0)) == CPUS  # the caller's thread is untouched


def test_a_team_smaller_than_the_cpus_is_left_alone():
    def engine_thread():
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, len(CPUS) - 1))
        try:
            return pin_openmp_team(torch.get_num_threads()), os.sched_getaffinity(0)
        finally:
            torch.set_num_threads(threads)  # MKL's count is process-wide

    pinned, own = on_new_thread(engine_thread)
    assert pinned is None and sorted(own) == CPUS
