"""Servers sharing one PostgreSQL database (orchestrator/store/servers.py): the turns a
crashed server left in flight (its responses, usage checkpoints and quota reservations)
are ended by another server, and only those: a live server's, this server's own and rows
of no known server are left alone."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import create_engine, func, select, text

from orchestrator import Product
from orchestrator.accounts import Accounts, Identity, Meter
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


def _request_in_flight(store: Store) -> Meter:
    """A request of the server on `store`, running: its tokens reserved (100 of its user's
    1,000) and its usage so far checkpointed (10 in, 5 out)."""
    user = UserRow("user_ann", "ann", 1, 1000, "total")
    assert db.create_user(store.repo, user)
    meter = Meter(Accounts(store), "chat.completions", Identity.of(user, None), "m")

    async def start() -> None:
        await meter.reserve(100)
        await meter.checkpoint(10, 0, 5)

    asyncio.run(start())
    return meter


def _charged_once(repo: Repository) -> None:
    """The request's one usage row is its own final count, and the quota charged that."""
    rows = db.usage_rows(repo, "user_ann")
    assert [(r.status, r.input_tokens, r.output_tokens) for r in rows] == [("completed", 10, 20)]
    assert db.quota_state(repo, "user_ann", 0) == db.QuotaState(used=30, reserved=0)


def test_a_request_recovered_while_its_server_lives_is_settled_once(postgres):
    """The session holding a live server's lock is cut (the database restarted, a network
    blip) while a request of it runs: another server takes it for gone and settles the
    request from its checkpoint; then the request ends and settles itself. It is charged
    once, what it used, in one usage row."""
    url = postgres.create_database()
    live, other = Store(url), Store(url)
    try:
        meter = _request_in_flight(live)
        _terminate_claimants(live.repo)  # the live server's lock session is cut
        assert servers.recover_departed(other.repo, other.server_lock) == [
            live.server_lock.server_id
        ]
        asyncio.run(meter.settle("completed", 10, 0, 20))
        _charged_once(other.repo)
    finally:
        live.close()
        other.close()


def _lock_waits(repo: Repository) -> int:
    """Sessions of the database waiting for a row lock."""
    with repo.engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database()"
            )
        ).scalar_one()


def test_a_recovery_and_the_requests_own_settlement_at_once_charge_it_once(postgres):
    """The same two settlements at the same moment, each in its transaction: whichever
    commits second finds the request settled, and neither releases the reservation twice
    nor writes a second row."""
    url = postgres.create_database()
    live, other = Store(url), Store(url)
    holder = other.engine.connect()
    try:
        meter = _request_in_flight(live)
        _terminate_claimants(live.repo)
        # Both settlements stop at the user's quota row, which `holder` locks, so that both
        # run their statements before either commits.
        holder.execute(text("SELECT * FROM quota_periods WHERE user_id = 'user_ann' FOR UPDATE"))
        with ThreadPoolExecutor(2) as pool:
            recovery = pool.submit(servers.recover_departed, other.repo, other.server_lock)
            _until(lambda: _lock_waits(other.repo) == 1)
            settling = pool.submit(asyncio.run, meter.settle("completed", 10, 0, 20))
            _until(lambda: _lock_waits(other.repo) == 2)
            holder.commit()
            assert recovery.result(10) == [live.server_lock.server_id]
            settling.result(10)
        _charged_once(other.repo)
    finally:
        holder.close()
        live.close()
        other.close()


def _until(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)
