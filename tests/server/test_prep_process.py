"""The preparation process (server/prep_process.py) and what goes to it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from starlette.requests import Request

from server.errors import APIError, invalid
from server.prep_process import NICENESS, PrepProcess, PromptContext
from server.request_body import OFFLOAD_BYTES, parse_json, read_json_body
from tests.server import prep_probe
from tests.server.fake_tokenizer import FakeTokenizer


def where(context: PromptContext) -> tuple[int, int, int, int | None]:
    policy = os.sched_getscheduler(0) if hasattr(os, "SCHED_IDLE") else None
    return os.getpid(), os.getpriority(os.PRIO_PROCESS, 0), context.max_model_len, policy


def refuse(field: str) -> None:
    raise invalid("refused there", field, code="too_big")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope="module")
def prep():
    # Its jobs are this module's functions: imported as the child starts, not at SCHED_IDLE.
    process = PrepProcess(
        PromptContext(FakeTokenizer(), 77, 100, 1000, native_tools=False), preload=(__name__,)
    )
    process.start()
    yield process
    process.close()


def test_work_runs_in_a_child_at_the_lowest_priority_with_the_context(prep):
    pid, nice, max_len, policy = asyncio.run(prep.run_with_context(where))
    assert pid != os.getpid() and nice == NICENESS and max_len == 77
    assert policy == getattr(os, "SCHED_IDLE", None)
    assert asyncio.run(prep.run(parse_json, b'{"a": [1, 2]}')) == {"a": [1, 2]}


def test_the_jobs_modules_are_imported_before_the_priority_drops():
    """A job's function is unpickled in the child, at SCHED_IDLE: importing its module
    there (torch, for the server's prompt functions) waited for as long as the cores stayed
    busy. The modules named to preload are imported while the child starts, at the
    server's own priority."""
    process = PrepProcess(
        PromptContext(FakeTokenizer(), 8, 8, 8, native_tools=False),
        preload=("tests.server.prep_probe",),
    )
    try:
        assert asyncio.run(process.run(prep_probe.nice_at_import)) == os.getpriority(
            os.PRIO_PROCESS, 0
        )
    finally:
        process.close()


def test_a_body_parsed_through_shared_memory_is_the_body(prep):
    body = json.dumps({"text": "x" * 200_000, "n": [1.5, None]}).encode()
    assert asyncio.run(prep.parse_json(body)) == json.loads(body)
    with pytest.raises(APIError) as raised:
        asyncio.run(prep.parse_json(b"[" * 100))
    assert raised.value.status == 400


def test_large_bodies_reuse_one_shared_block(prep, monkeypatch):
    taken: list[str] = []
    take = prep._blocks.take

    def recording_take(size: int):
        block = take(size)
        taken.append(block.name)
        return block

    monkeypatch.setattr(prep._blocks, "take", recording_take)
    for size in (300_000, 100_000):
        body = json.dumps({"text": "x" * size}).encode()
        assert asyncio.run(prep.parse_json(body)) == json.loads(body)
    assert len(taken) == 2 and taken[0] == taken[1]


def test_a_jobs_done_callback_waits_for_the_child_even_when_its_request_goes(prep):
    """A block goes back for reuse only once the child has read it."""
    done = threading.Event()

    async def abandoned() -> None:
        job = asyncio.ensure_future(prep._submit(time.sleep, 0.3, done=done.set))
        await asyncio.sleep(0.05)
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)

    asyncio.run(abandoned())
    assert not done.is_set()
    assert done.wait(5)


def test_a_refusal_comes_back_whole(prep):
    with pytest.raises(APIError) as raised:
        asyncio.run(prep.run(refuse, "messages"))
    error = raised.value
    assert (error.status, error.message, error.param, error.code) == (
        400,
        "refused there",
        "messages",
        "too_big",
    )


def test_a_child_killed_between_jobs_is_replaced_for_the_next_one(prep):
    first, *_ = asyncio.run(prep.run_with_context(where))
    os.kill(first, signal.SIGKILL)
    second, *_ = asyncio.run(prep.run_with_context(where))  # not a 503
    assert second not in (first, os.getpid())


def test_a_job_its_children_die_under_is_a_503_after_one_retry(prep):
    first, *_ = asyncio.run(prep.run_with_context(where))
    with pytest.raises(APIError) as raised:
        asyncio.run(prep.run(die))
    assert raised.value.status == 503
    second, *_ = asyncio.run(prep.run_with_context(where))
    assert second not in (first, os.getpid())


class RecordingOffLoop:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def parse_json(self, body: bytes) -> Any:
        self.calls.append("parse_json")
        return json.loads(body)

    async def offload(self, fn, *args):
        self.calls.append("offload")
        return fn(*args)


def body_request(body: bytes) -> Request:
    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    return Request({"type": "http", "method": "POST", "headers": headers}, receive)


@pytest.mark.parametrize(
    ("size", "calls"), [(100, []), (OFFLOAD_BYTES + 1, ["parse_json", "offload"])]
)
def test_only_a_large_body_leaves_the_event_loop(size, calls):
    body = json.dumps({"text": "x" * size}).encode()
    off_loop = RecordingOffLoop()
    value = asyncio.run(read_json_body(body_request(body), 1 << 30, off_loop, lambda v: v["text"]))
    assert len(value) == size and off_loop.calls == calls


CHILD_OF_A_KILLED_SERVER = """
import asyncio, os, sys
from server.prep_process import PrepProcess, PromptContext
from tests.server.fake_tokenizer import FakeTokenizer

prep = PrepProcess(PromptContext(FakeTokenizer(), 8, 8, 8, native_tools=False))
prep.start()
print(asyncio.run(prep.run(os.getpid)), flush=True)
os.kill(os.getpid(), 9)
"""


def test_the_child_ends_when_its_server_is_killed():
    """A server killed outright (it stops nothing) leaves no preparation process behind."""
    script = [sys.executable, "-c", CHILD_OF_A_KILLED_SERVER]
    done = subprocess.run(script, capture_output=True, text=True, timeout=60)
    child = int(done.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_close_does_not_wait_for_a_child_that_gets_no_cpu(prep):
    """At SCHED_IDLE on a busy machine the child may not run for a long while (a stopped
    child stands in for it here); the server's exit must not wait for it. (The module's
    process serves: a closed one starts a new child on its next use, as after a death.)"""
    child = asyncio.run(prep.run(os.getpid))
    os.kill(child, signal.SIGSTOP)
    closing = threading.Thread(target=prep.close, daemon=True)
    closing.start()
    closing.join(30)
    assert not closing.is_alive()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:  # killed and reaped
        time.sleep(0.1)
    assert not _alive(child)
