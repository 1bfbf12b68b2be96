"""A server killed with SIGKILL in the middle of 8 streams restarts on the same database
(SQLite in its data directory, or PostgreSQL) intact: every response a client saw complete
is there, those cut off are incomplete with their usage recorded, and a conversation
started before the kill goes on after it. On PostgreSQL the restarted server is another
server id: it recovers the killed one's turns because nobody holds that one's lock. The
servers run without the embedder: nothing here embeds, and each of the four start-ups and
stops would load and close it. They run a tiny random Llama with the default model's
tokenizer and chat template (tests/conftest.py's tiny_chat_model_dir): what is tested is
the store, which sees the same requests, turns and usage as with SmolLM2-135M, while the
start-ups and generations cost a fraction of SmolLM2's, which took most of the time."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import openai
import pytest
from sqlalchemy import create_engine, text

from tests.server.live_server import start_server

MODEL = "tiny-chat"


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


@pytest.fixture(params=["sqlite", "postgresql"])
def store_args(request, tmp_path) -> tuple[tuple[str, ...], str]:
    """The server's arguments for a store of each kind, and the store's URL."""
    data_dir = str(tmp_path / "data")
    if request.param == "sqlite":
        return ("--data-dir", data_dir), f"sqlite:///{os.path.join(data_dir, 'tokenmill.db')}"
    url = request.getfixturevalue("postgres").create_database()
    return ("--data-dir", data_dir, "--database-url", url), url


def _counts(url: str) -> tuple[int, int]:
    """The usage checkpoints left, and the usage rows of turns ended incomplete."""
    engine = create_engine(url)
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            assert conn.exec_driver_sql("PRAGMA integrity_check").fetchall() == [("ok",)]
        checkpoints = conn.execute(text("SELECT count(*) FROM usage_checkpoints")).scalar_one()
        incomplete = conn.execute(
            text("SELECT count(*) FROM usage_records WHERE status = 'incomplete'")
        ).scalar_one()
    engine.dispose()
    return checkpoints, incomplete


def test_sigkill_mid_streams_leaves_an_intact_store(store_args, tiny_chat_model_dir):
    store, url = store_args
    args = ("--model", tiny_chat_model_dir, "--served-model-name", MODEL)
    args += ("--quantization", "none", "--compile", "off", "--no-embeddings", *store)
    server = start_server(*args)
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

    # the usage of the turns cut off, as last checkpointed; the short ones end at their
    # budget, incomplete
    checkpointed, recorded = _counts(url)

    server = start_server(*args)
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
        assert _counts(url) == (0, recorded + checkpointed)
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
