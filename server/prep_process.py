"""The preparation process: the heavy, untrusted part of reading a request (parsing a large
JSON body, rendering and tokenizing a large prompt) in a child process at the lowest CPU
priority.

Why a process rather than low-priority threads: a thread of the server holds the server's
GIL whenever it runs Python, and a thread at nice 19 that the kernel preempts while it
holds the GIL holds up the event loop and the engine's thread until it gets a core again,
which on a busy machine takes tens to hundreds of milliseconds (a priority inversion;
measured in docs/server.md). The child has a GIL of its own, so however long a client's
megabytes take there, or however long the kernel leaves the child waiting, the server's
threads never wait for it; the server only sends the bytes and reads back the result
(the parsed body, token ids, or the error to answer).

What runs here must be picklable: module-level functions, and arguments and results made
of plain data. Functions that need the tokenizer take a `PromptContext` first; the child
receives it once, when it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import multiprocessing
import os
import signal
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any, TypeVar

from engine.tokenizer import Tokenizer
from server.errors import APIError
from server.request_body import parse_json

T = TypeVar("T")

# The child's CPU priority, the lowest: when the cores are short, the streams in flight go
# first and a client sending megabytes waits, not everyone else. On Linux the child also
# takes the SCHED_IDLE policy, because a nice value alone does not keep it out of the
# engine's way: Linux's scheduler (EEVDF) lets a nice-19 task that has waited run on for
# a while before a woken engine thread may preempt it, and a 2-thread parallel region
# waits for its slower thread. Measured 2026-12-03 on a 2-vCPU Intel Xeon (avx512_vnni,
# Linux 6.18), a 2-thread float32 matmul loop's p99.9 latency: 13 ms alone, 81 ms beside
# a busy nice-19 process, 15 ms beside a busy SCHED_IDLE one, which any normal task
# preempts at once.
NICENESS = 19
PARENT_CHECK_S = 0.5
# Shared-memory blocks kept for reuse, and the size they are rounded up to.
KEPT_BLOCKS = 2
BLOCK_GRAIN = 1 << 20


@dataclass(frozen=True)
class PromptContext:
    """What turning a prompt into token ids needs, in the server and in the child."""

    tokenizer: Tokenizer
    max_model_len: int
    vocab_size: int
    max_prompt_chars: int
    # The chat template writes the tools out itself (orchestrator.chat_prompt), worked out
    # once: the grammar and the prompt of every chat request depend on it.
    native_tools: bool


_context: PromptContext | None = None  # the child's copy, set when it starts


def _start_child(context: PromptContext, preload: tuple[str, ...]) -> None:
    global _context
    _context = context
    for module in preload:  # at the server's priority: see PrepProcess
        importlib.import_module(module)
    lowest_priority()
    parent = os.getppid()
    threading.Thread(target=_exit_with, args=(parent,), name="parent-watch", daemon=True).start()


def _exit_with(parent: int) -> None:
    """End the child when the server is gone. A server killed outright (SIGKILL, a
    crash) never tells its pool to stop, and the child, which holds both ends of the
    pool's call queue, would never see it close."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


def lowest_priority() -> None:
    """Give the calling process (its threads started from now on) the lowest CPU priority."""
    os.nice(NICENESS)
    if hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def _call_with_context(fn: Callable[..., T], args: tuple) -> T:
    assert _context is not None, "the preparation process starts with its context"
    return fn(_context, *args)


def _parse_shared(name: str, size: int) -> Any:
    block = SharedMemory(name)
    try:
        return parse_json(bytes(block.buf[:size]))
    finally:
        block.close()


class SharedBlocks:
    """Shared-memory blocks that carry large bodies to the child, reused. Writing into a
    new block costs a page fault per 4 KiB (a quarter of the server's own time receiving
    a 7 MB body: py-spy, 2026-12-03, Intel Xeon avx512_vnni) and a message to the
    resource tracker; a reused block's pages are already there. A block goes back for
    reuse only when the child has finished with it, even if its request has gone."""

    def __init__(self) -> None:
        self._free: list[SharedMemory] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> SharedMemory:
        with self._lock:
            for i, block in enumerate(self._free):
                if block.size >= size:
                    return self._free.pop(i)
        return SharedMemory(create=True, size=-(-max(size, 1) // BLOCK_GRAIN) * BLOCK_GRAIN)

    def give_back(self, block: SharedMemory) -> None:
        with self._lock:
            self._free.append(block)
            self._free.sort(key=lambda b: b.size, reverse=True)  # keep the largest
            dropped = self._free[KEPT_BLOCKS:]
            del self._free[KEPT_BLOCKS:]
        for block in dropped:
            _destroy(block)

    def close(self) -> None:
        with self._lock:
            dropped, self._free = self._free, []
        for block in dropped:
            _destroy(block)


def _destroy(block: SharedMemory) -> None:
    block.close()
    block.unlink()


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """While a child is spawned, an empty `__main__`: spawn re-imports the parent's main
    module in the child, and under `python -m engine.serve` that is the whole server
    (torch, the engine, the store), about 2 s of CPU and 300 MB in a process that only
    tokenizes (2026-12-06, AMD EPYC avx512_vnni). The child imports the modules of the
    functions it runs itself; none of them is the main module."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


class PrepProcess:
    """One child process (started on first use, or by `start`), restarted if it dies.

    `preload` names the modules of the functions it will run, imported as the child starts.
    A job's function is unpickled, and its module imported, in the child at its lowest
    priority: importing a module there waited for as long as the cores stayed busy."""

    def __init__(self, context: PromptContext, preload: tuple[str, ...] = ()) -> None:
        self.context = context
        self.preload = preload
        self._pool: ProcessPoolExecutor | None = None
        self._child: int | None = None  # the pool's one process
        self._lock = threading.Lock()
        self._blocks = SharedBlocks()

    def _executor(self) -> ProcessPoolExecutor:
        """The pool, its child started: starting one blocks for an interpreter's start-up
        (seconds), so the event loop calls this on a thread."""
        with self._lock:
            if self._pool is None:
                pool = ProcessPoolExecutor(
                    max_workers=1,
                    # Never fork: the server holds the engine's threads and OpenMP state.
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start_child,
                    initargs=(self.context, self.preload),
                )
                try:
                    with _main_module_hidden():  # the pool starts its child on this submit
                        started = pool.submit(os.getpid)
                    self._child = started.result()
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
                self._pool = pool
            return self._pool

    def start(self) -> None:
        """Start the child now, so that the first large request does not wait for it."""
        self._executor()

    async def parse_json(self, body: bytes | bytearray) -> Any:
        """`request_body.parse_json(body)` in the child. The body travels through shared
        memory, one copy: through the pool's pipe it would go in 64 KiB writes, each
        taking the server's GIL back from the engine's thread, at the pace of a child
        that only runs on an idle core."""
        block = self._blocks.take(len(body))
        block.buf[: len(body)] = body
        return await self._submit(
            _parse_shared, block.name, len(body), done=lambda: self._blocks.give_back(block)
        )

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the child."""
        return await self._submit(fn, *args)

    async def run_with_context(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(context, *args)` in the child."""
        return await self._submit(_call_with_context, fn, args)

    async def _submit(
        self, fn: Callable[..., T], *args: Any, done: Callable[[], None] | None = None
    ) -> T:
        """`fn(*args)` in the child; `done()` once the child has finished with it (or
        the job failed to run), however the awaiting request ended. A child that dies
        (killed, by an operator or the kernel's OOM killer, before or under the job) is
        replaced and the job run once more on the new one, so that its death costs the
        request a child's start, not a 503; a job under which both children die is one."""
        job = None
        try:
            for _ in range(2):
                pool = self._pool or await asyncio.to_thread(self._executor)
                try:
                    job = pool.submit(fn, *args)
                    return await asyncio.wrap_future(job)
                except BrokenProcessPool:
                    self._discard(pool)
            raise APIError(503, "the server could not prepare this request; try again")
        finally:
            if done is not None:
                if job is None or job.done():
                    done()
                else:  # when the child is done with it
                    job.add_done_callback(lambda _: done())

    def _discard(self, pool: ProcessPoolExecutor) -> None:
        """Forget a pool whose child died, so the next request starts a new one."""
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """End the child at once. It holds nothing worth finishing, and an orderly exit
        would need it to run: at SCHED_IDLE on a machine busy with other work it gets a
        sliver of a core, and the server's exit waited on it for a minute."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._child, signal.SIGKILL)
        self._blocks.close()
