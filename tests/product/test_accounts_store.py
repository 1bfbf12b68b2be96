"""The accounts repositories on SQLite and PostgreSQL: keys, quotas under concurrency,
settlement, usage aggregation, and deleting a user with everything they own."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from orchestrator.accounts import keys
from orchestrator.accounts.periods import period_start, resets_at
from orchestrator.errors import StorageQuotaExceededError
from orchestrator.store import Store
from orchestrator.store import accounts as db
from orchestrator.store import knowledge as kb
from orchestrator.store.accounts import KeyRow, UsageRecord, UserRow
from orchestrator.store.tables import (
    conversation_items,
    conversations,
    files,
    quota_periods,
    quota_reservations,
    response_items,
    responses,
    storage_holds,
    usage_records,
)
from tests.product.test_store import _record as _turn


@pytest.fixture
def store(database_url):
    opened = Store(database_url)
    yield opened
    opened.close()


def _user(repo, name: str, quota: int | None = None, period: str = "total") -> UserRow:
    user = UserRow(f"user_{name}", name, int(time.time()), quota, period)
    assert db.create_user(repo, user)
    return user


def _record(
    user_id: str | None,
    input_tokens: int,
    output_tokens: int,
    model: str = "m",
    created_at: float | None = None,
    status: str = "completed",
    request_id: str | None = None,
) -> UsageRecord:
    return UsageRecord(
        user_id,
        None,
        "chat.completions",
        model,
        input_tokens,
        1,
        output_tokens,
        status,
        0.01,
        0.02,
        0.5,
        created_at if created_at is not None else time.time(),
        request_id,
    )


def test_a_key_is_found_by_its_digest_until_it_is_revoked(store):
    repo = store.repo
    alice = _user(repo, "alice")
    assert not db.any_keys(repo)
    secret = keys.new_secret()
    assert secret.startswith("sk-tm-") and len(secret) > 40
    db.add_key(repo, KeyRow("key_1", alice.id, keys.hint(secret), 1), keys.digest(secret))
    assert db.any_keys(repo)
    assert db.find_key(repo, keys.digest(secret)) == ("key_1", alice, None)
    assert db.find_key(repo, keys.digest(secret + "x")) is None
    assert db.revoke_key(repo, "key_1", 2)
    assert db.find_key(repo, keys.digest(secret)) is None
    assert not db.revoke_key(repo, "key_1", 3)  # already revoked
    assert db.any_keys(repo)  # a revoked key still closes the server
    assert db.list_keys(repo, alice.id)[0].revoked_at == 2
    with store.engine.connect() as conn:  # only the digest is stored
        rows = conn.exec_driver_sql("SELECT digest, hint FROM api_keys").all()
    assert secret not in str(rows)


def test_a_keys_expiry_is_read_with_it_and_listed(store):
    """The lookup that finds a key gives its expiry, for the server to compare with its
    clock; the admin's list shows it."""
    repo = store.repo
    alice = _user(repo, "alice")
    db.add_key(repo, KeyRow("key_1", alice.id, "h1", 1, expires_at=1000), "digest_1")
    db.add_key(repo, KeyRow("key_2", alice.id, "h2", 2), "digest_2")
    assert db.find_key(repo, "digest_1") == ("key_1", alice, 1000)
    assert db.find_key(repo, "digest_2") == ("key_2", alice, None)
    assert [(k.id, k.expires_at) for k in db.list_keys(repo, alice.id)] == [
        ("key_1", 1000),
        ("key_2", None),
    ]


def test_user_names_are_unique_and_updates_apply(store):
    repo = store.repo
    _user(repo, "alice", 10)
    assert not db.create_user(repo, UserRow("user_other", "alice", 0))
    updated = db.update_user(repo, "alice", {"token_quota": None, "rpm": 5})
    assert updated.token_quota is None and updated.rpm == 5
    assert db.update_user(repo, "nobody", {"rpm": 1}) is None


def test_one_of_several_admins_creating_the_same_name_at_once_wins(store):
    """The others are told the name is taken (the unique name refuses their insert),
    never a database error."""
    barrier = threading.Barrier(6)

    def create(i: int) -> bool:
        barrier.wait()
        return db.create_user(store.repo, UserRow(f"user_{i}", "dana", int(time.time())))

    with ThreadPoolExecutor(6) as pool:
        created = list(pool.map(create, range(6)))
    assert created.count(True) == 1


def test_fifty_concurrent_reservations_never_exceed_the_quota(store):
    """50 threads reserve 30 tokens each at once against a 500-token quota: exactly 16 fit
    (16 x 30 = 480); each settles having used 20; the database holds the sums."""
    repo = store.repo
    alice = _user(repo, "alice", 500)
    barrier = threading.Barrier(50)

    def attempt(i: int) -> bool:
        barrier.wait()
        return db.reserve(repo, f"rsv_{i}", alice.id, 0, 30, 500, time.time())

    with ThreadPoolExecutor(50) as pool:
        granted = [i for i, ok in enumerate(pool.map(attempt, range(50))) if ok]
    assert len(granted) == 16
    assert db.quota_state(repo, alice.id, 0) == db.QuotaState(used=0, reserved=480)
    for i in granted:
        db.settle(repo, f"rsv_{i}", _record(alice.id, 12, 8))
    assert db.quota_state(repo, alice.id, 0) == db.QuotaState(used=16 * 20, reserved=0)
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(quota_reservations)).scalar() == 0
        assert conn.execute(select(func.count()).select_from(usage_records)).scalar() == 16


def test_a_reservation_can_be_extended_and_is_settled_once(store):
    repo = store.repo
    alice = _user(repo, "alice", 100)
    assert db.reserve(repo, "rsv_a", alice.id, 0, 40, 100, 1.0)
    assert db.reserve(repo, "rsv_a", alice.id, 0, 40, 100, 1.0, extend=True)  # a next turn
    assert not db.reserve(repo, "rsv_a", alice.id, 0, 40, 100, 1.0, extend=True)  # 120 > 100
    assert db.quota_state(repo, alice.id, 0).reserved == 80
    db.settle(repo, "rsv_a", _record(alice.id, 30, 20))
    db.settle(repo, "rsv_a", _record(alice.id, 30, 20))  # a second settle charges nothing
    assert db.quota_state(repo, alice.id, 0) == db.QuotaState(used=50, reserved=0)


def test_a_period_changed_by_the_operator_counts_what_was_spent_in_it(store):
    """Moving a user from a monthly to a daily quota (or to "total") starts the new period
    from the usage rows already in it, not from zero: a fresh count was a new allowance."""
    repo = store.repo
    alice = _user(repo, "alice", 200, "month")
    now = time.time()
    month, day = period_start("month", now), period_start("day", now)
    assert db.reserve(repo, "rsv_1", alice.id, month, 189, 200, now)
    db.settle(repo, "rsv_1", _record(alice.id, 150, 39, created_at=now))
    db.settle(repo, None, _record(alice.id, 1000, 0, created_at=now - 40 * 86400))  # before
    db.update_user(repo, "alice", {"quota_period": "day"})
    assert db.quota_state(repo, alice.id, day) == db.QuotaState(used=189, reserved=0)
    assert db.reserve(repo, "rsv_2", alice.id, day, 11, 200, now)
    assert not db.reserve(repo, "rsv_3", alice.id, day, 1, 200, now)
    assert db.quota_state(repo, alice.id, 0).used == 1189
    # Back to the month: its row, made before, is recounted with what the day spent.
    db.settle(repo, "rsv_2", _record(alice.id, 5, 5, created_at=now))
    db.update_user(repo, "alice", {"quota_period": "month"})
    assert db.quota_state(repo, alice.id, month) == db.QuotaState(used=199, reserved=0)


def test_release_reservations_frees_what_a_crash_left_held(store):
    repo = store.repo
    alice = _user(repo, "alice", 100)
    assert db.reserve(repo, "rsv_a", alice.id, 0, 60, 100, 1.0)
    assert db.release_reservations(repo) == 1
    assert db.quota_state(repo, alice.id, 0) == db.QuotaState(used=0, reserved=0)


def test_usage_a_crash_cut_off_after_a_checkpoint_is_charged_and_recorded(store):
    """A checkpoint overwrites the last; at the next start the request settles with the
    usage last checkpointed (its reservation charged that much), and one that settled
    normally leaves no checkpoint behind."""
    repo = store.repo
    alice = _user(repo, "alice", 100)
    assert db.reserve(repo, "rsv_a", alice.id, 0, 60, 100, 1.0)
    db.checkpoint_usage(repo, "ckpt_a", "rsv_a", _record(alice.id, 10, 2, status="incomplete"))
    db.checkpoint_usage(repo, "ckpt_a", "rsv_a", _record(alice.id, 10, 7, status="incomplete"))
    assert db.reserve(repo, "rsv_b", alice.id, 0, 20, 100, 1.0)
    db.checkpoint_usage(repo, "ckpt_b", "rsv_b", _record(alice.id, 5, 1, status="incomplete"))
    db.settle(repo, "rsv_b", _record(alice.id, 5, 3), "ckpt_b")  # finished before the crash
    assert db.settle_checkpoints(repo) == 1
    assert db.release_reservations(repo) == 0
    assert db.quota_state(repo, alice.id, 0) == db.QuotaState(used=17 + 8, reserved=0)
    rows = [(r.status, r.input_tokens, r.output_tokens) for r in db.usage_rows(repo, alice.id)]
    assert sorted(rows) == [("completed", 5, 3), ("incomplete", 10, 7)]
    assert db.settle_checkpoints(repo) == 0


def _race_with_uploads(repo, owner: str, racer, racers: int, uploads: int):
    """`racer(i)` for each i below `racers`, beside `uploads` uploads of a 100-byte file, all
    released at once for the storage-quota races: the racers that won (those that returned
    True), and how many uploads were stored."""
    barrier = threading.Barrier(racers + uploads)

    def released(fn):
        def run(i: int) -> bool:
            barrier.wait()
            return fn(i)

        return run

    def upload(i: int) -> bool:
        body = {"id": f"file_{i}", "purpose": "assistants", "created_at": 0, "expires_at": None}
        try:
            kb.add_file(repo, owner, body, None, b"x" * 100)
        except StorageQuotaExceededError:
            return False
        return True

    with ThreadPoolExecutor(racers + uploads) as pool:
        won = pool.map(released(racer), range(racers))
        stored = pool.map(released(upload), range(uploads))
        return [i for i, ok in enumerate(won) if ok], sum(stored)


def test_concurrent_items_given_back_never_pass_the_storage_quota(store):
    """Items a client gives keep an earlier run's images as copies of their own: 24
    writes of them at once (responses' input, new conversations, items appended to one),
    100 bytes each, with 4 uploads of 100 bytes, against a 1,000-byte quota: exactly 10
    fit, each refused one stores nothing, and deleting makes room again."""
    repo = store.repo
    alice = UserRow("user_alice", "alice", 1, storage_quota_bytes=1000)
    assert db.create_user(repo, alice)
    repo.create_conversation(alice.id, "conv_shared", 0, {}, [])

    def give(i: int) -> bool:
        items = [_image_call(f"ci_{i}", 100)]
        try:
            if i % 3 == 0:
                body = {"id": f"resp_{i}", "created_at": 0, "status": "in_progress"}
                body |= {"previous_response_id": None, "conversation": None, "output": []}
                repo.begin_response(alice.id, body, items)
            elif i % 3 == 1:
                repo.create_conversation(alice.id, f"conv_{i}", 0, {}, items)
            else:
                assert repo.add_conversation_items(alice.id, "conv_shared", 0, items)
        except StorageQuotaExceededError as exc:
            assert exc.code == "storage_quota_exceeded" and "1000 bytes" in exc.message
            assert exc.param == ("input" if i % 3 == 0 else "items")
            return False
        return True

    kept, stored = _race_with_uploads(repo, alice.id, give, 24, 4)
    assert len(kept) + stored == 10 and kb.storage_used(repo, alice.id, 0) == 1000
    with store.engine.connect() as conn:
        counted = (
            conn.execute(
                select(func.count())
                .select_from(response_items)
                .where(response_items.c.id.like("ci_%"))
            ).scalar()
            + conn.execute(
                select(func.count())
                .select_from(conversation_items)
                .where(conversation_items.c.id.like("ci_%"))
            ).scalar()
        )
        conversations_made = conn.execute(
            select(func.count())
            .select_from(conversations)
            .where(conversations.c.id != "conv_shared")
        ).scalar()
    assert counted == len(kept)  # a refused write stored none of its items
    assert conversations_made == sum(1 for i in kept if i % 3 == 1)  # nor its conversation
    with pytest.raises(StorageQuotaExceededError):
        repo.add_conversation_items(alice.id, "conv_shared", 0, [_image_call("ci_x", 22)])
    message = {"id": "msg_1", "type": "message", "role": "user", "status": "completed"}
    message["content"] = [{"type": "input_text", "text": "no image: not checked"}]
    assert repo.add_conversation_items(alice.id, "conv_shared", 0, [message])
    for i in kept:
        if i % 3 == 0:
            assert repo.delete_response(alice.id, f"resp_{i}")
        elif i % 3 == 1:
            assert repo.delete_conversation(alice.id, f"conv_{i}")
        else:
            assert repo.delete_conversation_item(alice.id, "conv_shared", f"ci_{i}")
    assert kb.storage_used(repo, alice.id, 0) == 100 * stored
    room = _image_call("ci_again", 1000 - 100 * stored)
    repo.create_conversation(alice.id, "conv_again", 0, {}, [room])
    assert kb.storage_used(repo, alice.id, 0) == 1000


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.integers(1, 200),
    st.lists(st.tuples(st.integers(1, 80), st.integers(0, 100)), min_size=1, max_size=12),
)
def test_property_used_plus_reserved_never_exceeds_the_limit(store, limit, requests):
    """Any sequence of reservations (tokens) each settled with some actual use (at most
    what it reserved) keeps used + reserved within the limit, and used equals the sum of
    what the granted requests used."""
    repo = store.repo
    user = _user(repo, f"u{uuid.uuid4().hex[:8]}", limit)
    used = 0
    open_reservations = []
    for i, (tokens, use_percent) in enumerate(requests):
        rid = f"rsv_{user.id}_{i}"
        if db.reserve(repo, rid, user.id, 0, tokens, limit, 1.0):
            open_reservations.append((rid, tokens * use_percent // 100))
        state = db.quota_state(repo, user.id, 0)
        assert state.used + state.reserved <= limit
        if i % 3 == 2 and open_reservations:  # settle the oldest now and then
            rid, actual = open_reservations.pop(0)
            db.settle(repo, rid, _record(user.id, actual, 0))
            used += actual
    for rid, actual in open_reservations:
        db.settle(repo, rid, _record(user.id, actual, 0))
        used += actual
    assert db.quota_state(repo, user.id, 0) == db.QuotaState(used=used, reserved=0)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.sampled_from(["checkpoint", "recover"]), max_size=8), st.integers(0, 20))
def test_property_a_request_settled_again_by_recoveries_is_charged_once(store, steps, more):
    """A request checkpoints its usage as it runs, recoveries (another server taking its
    server for gone) settle it from its checkpoint at any moment, as often as they run, and
    then it settles itself: at every step the quota's `used` is what its usage rows hold,
    and at the end it has one row, its own final count, and holds nothing reserved."""
    repo = store.repo
    user = _user(repo, f"u{uuid.uuid4().hex[:8]}", 1000)
    rid, ckpt, request = f"rsv_{user.id}", f"ckpt_{user.id}", f"req_{user.id}"
    assert db.reserve(repo, rid, user.id, 0, 500, 1000, 1.0)
    output = 0

    def charged_as_recorded() -> None:
        rows = db.usage_rows(repo, user.id)
        assert db.quota_state(repo, user.id, 0).used == sum(r.total_tokens for r in rows)

    for step in steps:
        if step == "checkpoint":  # the request's usage so far grows
            output += 3
            record = _record(user.id, 10, output, status="incomplete", request_id=request)
            db.checkpoint_usage(repo, ckpt, rid, record, 0)
        else:
            db.settle_checkpoints(repo)
            db.release_reservations(repo)
        charged_as_recorded()
    final = _record(user.id, 10, output + more, request_id=request)
    db.settle(repo, rid, final, ckpt, 0)
    db.settle_checkpoints(repo)  # a recovery after its end finds nothing to settle
    charged_as_recorded()
    assert db.usage_rows(repo, user.id) == [final]
    assert db.quota_state(repo, user.id, 0) == db.QuotaState(used=final.total_tokens, reserved=0)


def test_usage_is_aggregated_per_day_and_model(store):
    repo = store.repo
    alice = _user(repo, "alice")
    day1, day2 = 1_700_000_000.0, 1_700_000_000.0 + 86400
    for record in (
        _record(alice.id, 10, 5, "a", day1),
        _record(alice.id, 7, 3, "a", day1),
        _record(alice.id, 1, 1, "b", day1),
        _record(alice.id, 2, 2, "a", day2),
        _record(None, 100, 100, "a", day1),
    ):
        db.settle(repo, None, record)
    days = db.usage_by_day(repo, alice.id)
    assert [
        (d.date, d.model, d.requests, d.input_tokens, d.output_tokens, d.total_tokens) for d in days
    ] == [
        ("2023-11-14", "a", 2, 17, 8, 25),
        ("2023-11-14", "b", 1, 1, 1, 2),
        ("2023-11-15", "a", 1, 2, 2, 4),
    ]
    assert days[0].cached_input_tokens == 2
    assert [d.date for d in db.usage_by_day(repo, alice.id, "2023-11-15")] == ["2023-11-15"]
    assert db.usage_by_day(repo, None)[0].input_tokens == 100
    assert db.usage_total(repo, alice.id) == 25 + 2 + 4
    assert {d.user_id for d in db.usage_by_day(repo)} == {alice.id, None}


def test_deleting_a_user_deletes_what_they_own_and_keeps_others(store):
    repo = store.repo
    alice, bob = _user(repo, "alice", 100), _user(repo, "bob")
    for owner in (alice.id, bob.id):
        repo.create_conversation(owner, f"conv_{owner}", 1, {}, [])
        _turn(repo, owner, f"resp_{owner}", None, "hi", conversation=f"conv_{owner}")
    db.add_key(repo, KeyRow("key_a", alice.id, "h", 1), "digest_a")
    assert db.reserve(repo, "rsv_a", alice.id, 0, 5, 100, 1.0)
    db.settle(repo, None, _record(alice.id, 1, 1))
    for file_id, expires_at in (("file_live", None), ("file_expired", 1)):
        body = {"id": file_id, "purpose": "assistants", "bytes": 1, "created_at": 0}
        kb.add_file(repo, alice.id, {**body, "expires_at": expires_at}, None, b"x")
    assert sorted(db.delete_user(repo, alice.id)) == ["file_expired", "file_live"]
    assert db.get_user(repo, "alice") is None and db.find_key(repo, "digest_a") is None
    with store.engine.connect() as conn:
        owners = {
            t.name: set(conn.execute(select(t.c.owner_id)).scalars())
            for t in (conversations, responses)
        }
        periods = conn.execute(select(func.count()).select_from(quota_periods)).scalar()
        owners["files"] = set(conn.execute(select(files.c.owner_id)).scalars())
    assert owners == {"conversations": {bob.id}, "responses": {bob.id}, "files": set()}
    assert periods == 0
    assert repo.get_response(bob.id, f"resp_{bob.id}") is not None
    assert db.usage_total(repo, alice.id) == 2  # the billing history stays
    assert db.delete_user(repo, alice.id) is None


def test_periods_start_and_reset_on_utc_boundaries():
    moment = 1_700_000_000  # 2023-11-14 22:13:20 UTC
    assert period_start("day", moment) == 1_699_920_000
    assert resets_at("day", moment) == 1_699_920_000 + 86400
    assert period_start("month", moment) == 1_698_796_800  # 2023-11-01
    assert resets_at("month", moment) == 1_701_388_800  # 2023-12-01
    assert resets_at("month", 1_703_000_000) == 1_704_067_200  # December -> 2024-01-01
    assert period_start("total", moment) == 0 and resets_at("total", moment) is None
    with pytest.raises(ValueError):
        period_start("week", moment)


def test_concurrent_uploads_never_pass_the_storage_quota_and_deleting_makes_room(store):
    """20 threads upload 100 bytes each at once against a 1,000-byte quota: exactly 10
    fit; another user, without a quota, is not limited by it."""
    repo = store.repo
    alice = UserRow("user_alice", "alice", 1, storage_quota_bytes=1000)
    assert db.create_user(repo, alice)
    barrier = threading.Barrier(20)

    def upload(i: int, owner: str = alice.id) -> bool:
        body = {
            "id": f"file_{owner}_{i}",
            "purpose": "assistants",
            "bytes": 100,
            "created_at": 0,
            "expires_at": None,
        }
        barrier.wait()
        try:
            kb.add_file(repo, owner, body, None, b"x" * 100)
        except StorageQuotaExceededError as exc:
            assert exc.code == "storage_quota_exceeded" and "1000 bytes" in exc.message
            return False
        return True

    with ThreadPoolExecutor(20) as pool:
        stored = [i for i, ok in enumerate(pool.map(upload, range(20))) if ok]
    assert len(stored) == 10 and kb.storage_used(repo, alice.id, 0) == 1000
    assert kb.delete_file(repo, alice.id, f"file_{alice.id}_{stored[0]}", 0)
    assert kb.storage_used(repo, alice.id, 0) == 900
    barrier = threading.Barrier(1)
    assert upload(99) and not upload(100)
    assert upload(0, "user_bob") and kb.storage_used(repo, "user_bob", 0) == 100


def _running_response(repo, owner: str, response_id: str, given: tuple[dict, ...] = ()) -> dict:
    body = {
        "id": response_id,
        "created_at": 1.0,
        "status": "in_progress",
        "previous_response_id": None,
        "output": [],
        "conversation": None,
    }
    repo.begin_response(owner, body, list(given))
    return body


def test_concurrent_code_interpreter_runs_and_uploads_never_pass_the_storage_quota(store):
    """20 code_interpreter runs of running responses hold 100 bytes of images each, and
    5 uploads of 100 bytes are made, all at once, against a 1,000-byte quota: exactly 10
    fit. A response's holds give way to its items when its output is written (the same
    bytes, counted once, and only for the images it kept), as they do when a crash's
    recovery ends it, and deleting it frees them."""
    repo = store.repo
    alice = UserRow("user_alice", "alice", 1, storage_quota_bytes=1000)
    assert db.create_user(repo, alice)
    bodies = [_running_response(repo, alice.id, f"resp_{i}") for i in range(20)]

    def run(i: int) -> bool:
        try:
            kb.hold_storage(repo, alice.id, f"resp_{i}", f"ci_{i}", 100, 0)
        except StorageQuotaExceededError as exc:
            assert exc.code == "storage_quota_exceeded" and "(1000 bytes)" in exc.message
            return False
        return True

    held, stored = _race_with_uploads(repo, alice.id, run, 20, 5)
    assert len(held) + stored == 10 and kb.storage_used(repo, alice.id, 0) == 1000
    first, *_ = held
    image = "data:image/png;base64," + "A" * 78  # 100 bytes, as held
    call = {"id": f"ci_{first}", "type": "code_interpreter_call", "status": "completed"}
    call |= {"code": "", "container_id": "c", "outputs": [{"type": "image", "url": image}]}
    done = {"status": "completed"}
    repo.finish_response(alice.id, {**bodies[first], **done, "output": [call]}, [], None, None)
    assert kb.storage_used(repo, alice.id, 0) == 1000  # the item's bytes, not the hold's too
    repo.finish_response(alice.id, {**bodies[held[1]], **done, "output": []}, [], None, None)
    assert kb.storage_used(repo, alice.id, 0) == 900  # it kept no image after all
    assert repo.delete_response(alice.id, f"resp_{first}")
    assert repo.delete_response(alice.id, f"resp_{held[2]}")  # running: its hold goes too
    assert kb.storage_used(repo, alice.id, 0) == 700
    with store.engine.connect() as conn:
        holds = conn.execute(select(func.count()).select_from(storage_holds)).scalar()
    assert holds == len(held) - 3
    # A crash's recovery ends the rest, which kept none of their images (none was
    # checkpointed): their holds go.
    assert repo.interrupt_unfinished() == 20 - 3
    assert kb.storage_used(repo, alice.id, 0) == 100 * stored


def _image_call(item_id: str, size: int) -> dict:
    """A code_interpreter_call item keeping one image of `size` bytes as stored."""
    url = "data:image/png;base64," + "A" * (size - 22)
    outputs = [{"type": "logs", "logs": ""}, {"type": "image", "url": url}]
    return {"id": item_id, "type": "code_interpreter_call", "status": "completed"} | {
        "code": "",
        "container_id": "c",
        "outputs": outputs,
    }


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.integers(0, 1500),
    st.lists(
        st.tuples(st.sampled_from(["upload", "run", "give"]), st.integers(30, 400)), max_size=10
    ),
)
def test_property_uploads_and_runs_fit_the_storage_quota_exactly(store, quota, writes):
    """Any sequence of uploads, code_interpreter runs' images and responses given such
    images back as input: each is taken exactly when it fits what the quota leaves (a
    refused response is not stored), the storage used is what was taken (never past the
    quota), and it stays so as the responses' output is written and drops by their images
    as they are deleted."""
    repo = store.repo
    user = UserRow(f"user_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:8], 1, None)
    assert db.create_user(repo, replace(user, storage_quota_bytes=quota))
    used, kept = 0, {}  # response id -> its image's bytes, and the output it ends with
    for i, (kind, size) in enumerate(writes):
        response_id, call = f"resp_{user.id}_{i}", _image_call(f"ci_{user.id}_{i}", size)
        try:
            if kind == "upload":
                body = {"id": f"file_{user.id}_{i}", "purpose": "assistants", "created_at": 0}
                kb.add_file(repo, user.id, {**body, "expires_at": None}, None, b"x" * size)
            elif kind == "run":
                _running_response(repo, user.id, response_id)
                kb.hold_storage(repo, user.id, response_id, call["id"], size, 0)
                kept[response_id] = size, [call]
            else:
                _running_response(repo, user.id, response_id, (call,))
                kept[response_id] = size, []
        except StorageQuotaExceededError:
            assert used + size > quota
            assert kind != "give" or repo.get_response(user.id, response_id) is None
        else:
            assert used + size <= quota
            used += size
        assert kb.storage_used(repo, user.id, 0) == used
    for response_id, (_, output) in kept.items():
        body = {"id": response_id, "created_at": 1.0, "status": "completed", "output": output}
        repo.finish_response(user.id, body | {"conversation": None}, [], None, None)
        assert kb.storage_used(repo, user.id, 0) == used
    for response_id, (size, _) in kept.items():
        assert repo.delete_response(user.id, response_id)
        used -= size
        assert kb.storage_used(repo, user.id, 0) == used
