"""Servers sharing one PostgreSQL database (orchestrator/store/servers.py): the turns a
crashed server left in flight (its responses, usage checkpoints and quota reservations)
are ended by another server, and only those: a live server's, this server's own and rows
of no known server are left alone."""

from __future__ import annotations

import asyncio
import time

from sqlalchemy import create_engine, func, select

from orchestrator import Product
from orchestrator.store import Page, Repository, Store, servers
from orchestrator.store import accounts as db
from orchestrator.store.accounts import UsageRecord, UserRow
from orchestrator.store.tables import usage_checkpoints
from tests.product.test_store import _message
from tests.product.test_vector_stores import _terminate_claimants
from tests.server.fake_engine import FakeEngine


def _turn_in_flight(repo: Repository, name: str) -> None:
    """What a server running a turn has written: a user, a conversation, the response
    in progress with output checkpointed, a quota reservation and a usage checkpoint."""
    owner = f"user_{name}"
    assert db.create_user(repo, UserRow(owner, name, 1, 100, "total"))
    repo.create_conversation(owner, f"conv_{name}", 1, {}, [])
    body = {
        "id": f"resp_{name}",
        "created_at": 2.0,
        "status": "in_progress",
        "previous_response_id": None,
        "conversation": {"id": f"conv_{name}"},
        "output": [],
    }
    repo.begin_response(owner, body, [_message(f"msg_in_{name}", "Tell me a story.")])
    partial = {**_message(f"msg_out_{name}", "Once upon"), "role": "assistant"}
    repo.checkpoint_response(owner, body["id"], [{**partial, "status": "in_progress"}])
    assert db.reserve(repo, f"rsv_{name}", owner, 0, 50, 100, 1.0)
    record = UsageRecord(owner, None, "responses", "m", 10, 0, 5, "incomplete", 0, 0, 1, 2.0)
    db.checkpoint_usage(repo, f"ckpt_{name}", f"rsv_{name}", record)


def _state(repo: Repository, name: str) -> tuple:
    """The turn's response status, its conversation's item ids, the user's quota and
    whether its usage checkpoint is still there."""
    owner = f"user_{name}"
    items = repo.list_conversation_items(owner, f"conv_{name}", Page(order="asc")).items
    with repo.engine.connect() as conn:
        checkpoints = conn.execute(
            select(func.count()).where(usage_checkpoints.c.id == f"ckpt_{name}")
        ).scalar_one()
    return (
        repo.get_response(owner, f"resp_{name}")["status"],
        [item["id"] for item in items],
        db.quota_state(repo, owner, 0),
        checkpoints,
    )


IN_FLIGHT = ("in_progress", [], db.QuotaState(used=0, reserved=50), 1)
RECOVERED = (
    "incomplete",
    ["msg_in_gone", "msg_out_gone"],
    db.QuotaState(used=15, reserved=0),  # the tokens it had checkpointed, charged
    0,
)


def test_the_turns_of_a_crashed_server_are_ended_by_another(postgres):
    url = postgres.create_database()
    gone, alive, own = Store(url), Store(url), Store(url)
    _turn_in_flight(gone.repo, "gone")
    _turn_in_flight(alive.repo, "alive")
    _turn_in_flight(own.repo, "own")
    _turn_in_flight(Repository(own.engine), "unknown")  # a row written before migration 0010
    gone.close()  # its session, and so its lock, is gone (as with a crash)
    try:
        assert servers.recover_departed(own.repo, own.server_lock) == [gone.server_lock.server_id]
        assert _state(own.repo, "gone") == RECOVERED
        assert own.repo.get_response("user_gone", "resp_gone")["output"][0]["status"] == (
            "incomplete"
        )
        assert [r.status for r in db.usage_rows(own.repo, "user_gone")] == ["incomplete"]
        for name in ("alive", "own", "unknown"):
            assert _state(own.repo, name) == IN_FLIGHT, name
        assert servers.recover_departed(own.repo, own.server_lock) == []  # nothing left
    finally:
        alive.close()
        own.close()


def test_a_server_whose_lock_is_held_is_left_alone(postgres):
    """Its lock held from another session (a live server, or one recovering it)."""
    url = postgres.create_database()
    other, own = Store(url), Store(url)
    _turn_in_flight(other.repo, "other")
    other_id = other.server_lock.server_id
    other.close()
    holder = create_engine(url).connect()
    holder.execute(select(func.pg_advisory_lock(servers.server_key(other_id))))
    holder.commit()
    try:
        assert servers.recover_departed(own.repo, own.server_lock) == []
        assert _state(own.repo, "other") == IN_FLIGHT
        holder.close()  # and now it is gone
        holder.engine.dispose()
        assert servers.recover_departed(own.repo, own.server_lock) == [other_id]
    finally:
        own.close()


def test_a_server_whose_lock_session_was_cut_takes_it_again(postgres):
    """A session cut (the database restarted, say) loses the lock: the server takes it
    again before it recovers others, so that they do not take it for gone."""
    url = postgres.create_database()
    own = Store(url)
    _turn_in_flight(own.repo, "own")
    _terminate_claimants(own.repo)
    other = Store(url)
    try:
        assert servers.recover_departed(own.repo, own.server_lock) == []
        assert servers.recover_departed(other.repo, other.server_lock) == []
        assert _state(own.repo, "own") == IN_FLIGHT
    finally:
        other.close()
        own.close()


def test_a_server_that_crashes_later_is_recovered_by_the_periodic_sweep(postgres, monkeypatch):
    """At start-up, then every RECOVERY_SECONDS, from the task `resume` starts."""
    monkeypatch.setattr(servers, "RECOVERY_SECONDS", 0.05)
    url = postgres.create_database()

    async def crash_beside_a_running_server() -> tuple:
        product = Product.open(FakeEngine(), url)
        product.resume()
        gone = Store(url)
        _turn_in_flight(gone.repo, "gone")
        gone.close()
        deadline = time.monotonic() + 30
        while _state(product.store.repo, "gone")[0] == "in_progress":
            assert time.monotonic() < deadline, "never recovered"
            await asyncio.sleep(0.05)
        await product.stop_background()
        assert product.recovery.done()
        state = _state(product.store.repo, "gone")
        product.close()
        return state

    assert asyncio.run(crash_beside_a_running_server()) == RECOVERED


def test_a_crashed_server_is_recovered_when_the_next_one_starts(postgres):
    url = postgres.create_database()
    gone = Store(url)
    _turn_in_flight(gone.repo, "gone")
    gone.close()
    product = Product.open(FakeEngine(), url)
    try:
        assert _state(product.store.repo, "gone") == RECOVERED
    finally:
        product.close()
