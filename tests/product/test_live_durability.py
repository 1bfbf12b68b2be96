"""A server killed with SIGKILL in the middle of 8 streams restarts on the same data
directory with an intact database: every response a client saw complete is there, and
a conversation started before the kill goes on after it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3

import openai

from tests.server.live_server import start_server

MODEL = "smollm2-135m-instruct"


async def _streams_then_kill(url: str, pid: int) -> tuple[dict, set[str]]:
    """8 streams: the even ones short (they complete), the odd ones long (in flight at
    the kill). Returns the responses seen completed and the ids of those cut off."""
    completed: dict = {}
    started: set[str] = set()
    begun = [asyncio.Event() for _ in range(8)]

    async def one(client: openai.AsyncOpenAI, i: int) -> None:
        try:
            stream = await client.responses.create(
                model=MODEL,
                input=f"Tell a long story about the number {i}.",
                stream=True,
                max_output_tokens=4 if i % 2 == 0 else 400,
            )
            async for event in stream:
                if event.type == "response.created":
                    started.add(event.response.id)
                if event.type == "response.output_text.delta":
                    begun[i].set()
                elif event.type in ("response.completed", "response.incomplete"):
                    completed[event.response.id] = event.response
        except openai.APIConnectionError:
            pass  # the kill
        finally:
            begun[i].set()

    async with openai.AsyncOpenAI(
        base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600
    ) as client:
        tasks = [asyncio.create_task(one(client, i)) for i in range(8)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in begun)), 600)
        while len(completed) < 4 and not all(t.done() for t in tasks):
            await asyncio.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        await asyncio.gather(*tasks)
    return completed, started - set(completed)


def test_sigkill_mid_streams_leaves_an_intact_store(tmp_path):
    data_dir = str(tmp_path / "data")
    server = start_server("--compile", "off", "--data-dir", data_dir)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        conv = client.conversations.create()
        first = client.responses.create(
            model=MODEL,
            conversation=conv.id,
            temperature=0,
            input="My name is Ada.",
            max_output_tokens=8,
        )
        completed, cut = asyncio.run(_streams_then_kill(server.url, server.process.pid))
        assert server.process.wait(30) == -signal.SIGKILL
    finally:
        server.stop()
    assert len(completed) >= 4 and cut  # the kill came mid-stream

    db = sqlite3.connect(os.path.join(data_dir, "tokenmill.db"))
    assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    # the usage of the turns cut off, as last checkpointed
    checkpointed = db.execute("SELECT count(*) FROM usage_checkpoints").fetchone()[0]
    incomplete = "SELECT count(*) FROM usage_records WHERE status = 'incomplete'"
    recorded = db.execute(incomplete).fetchone()[0]  # the short ones end at their budget
    db.close()

    server = start_server("--compile", "off", "--data-dir", data_dir)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        for response_id, seen in completed.items():
            stored = client.responses.retrieve(response_id)
            assert stored.status == seen.status
            assert stored.output_text == seen.output_text
            assert stored.usage == seen.usage
        # A response cut off by the kill is recorded as incomplete (if its start was).
        for response_id in cut:
            with contextlib.suppress(openai.NotFoundError):
                assert client.responses.retrieve(response_id).status == "incomplete"
        # Their usage is recorded, charged to no one twice.
        db = sqlite3.connect(os.path.join(data_dir, "tokenmill.db"))
        assert db.execute("SELECT count(*) FROM usage_checkpoints").fetchone() == (0,)
        assert db.execute(incomplete).fetchone() == (recorded + checkpointed,)
        db.close()
        # The conversation from before the kill goes on.
        again = client.responses.create(
            model=MODEL,
            conversation=conv.id,
            temperature=0,
            input="What is my name?",
            max_output_tokens=8,
        )
        assert again.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
        texts = [i.content[0].text for i in client.conversations.items.list(conv.id, order="asc")]
        assert texts == [
            "My name is Ada.",
            first.output_text,
            "What is my name?",
            again.output_text,
        ]
    finally:
        assert server.stop() == 0
