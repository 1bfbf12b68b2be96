"""The repositories of users, API keys, token quotas and usage records.

Plain functions taking the `Repository` first, like `knowledge.py`, so they run through
`await store.call(fn, ...)` on the store's thread (the admin CLI calls them directly).

A quota is enforced by one conditional UPDATE (`reserved = reserved + n WHERE used +
reserved + n <= limit`): the database applies it atomically per row, on SQLite (one writer
at a time) and on PostgreSQL (the row lock makes a concurrent UPDATE re-check the WHERE
on the row's newest version), so concurrent requests can never reserve past the limit.
Settling a reservation, recording the request's usage row and charging the tokens
actually used happen in one transaction: a request is billed once, or not at all. It is
billed once also when it is settled twice: by itself as it ends, and by a PostgreSQL
server's recovery that took its server for gone (the session holding that server's lock
was cut while the request ran: `servers.py`), one after the other or at the same moment.
Its usage row is unique by its request id and its reservation is released by whichever
settlement deletes it (`_write_usage`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime

from sqlalchemy import Select, delete, exists, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql import ColumnElement

from orchestrator.store.knowledge import delete_file, delete_vector_store
from orchestrator.store.repository import Repository, written_by
from orchestrator.store.tables import (
    api_keys,
    conversation_items,
    conversations,
    cursor_tombstones,
    files,
    quota_periods,
    quota_reservations,
    response_items,
    responses,
    usage_checkpoints,
    usage_records,
    users,
    vector_stores,
)


@dataclass(frozen=True)
class UserRow:
    id: str
    name: str
    created_at: int
    token_quota: int | None = None
    quota_period: str = "month"
    rpm: int | None = None
    tpm: int | None = None
    storage_quota_bytes: int | None = None  # uploaded files' bytes, all told


@dataclass(frozen=True)
class KeyRow:
    id: str
    user_id: str
    hint: str
    created_at: int
    revoked_at: int | None = None
    expires_at: int | None = None  # the second from which it is refused (None: never)


@dataclass(frozen=True)
class UsageRecord:
    """One request's usage row (see `tables.usage_records`)."""

    user_id: str | None
    key_id: str | None
    endpoint: str
    model: str
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    status: str
    queue_time: float | None
    ttft: float | None
    duration: float
    created_at: float
    # The request's own id (its meter's), which its row is unique by; None in a usage
    # checkpoint written before migration 0021.
    request_id: str | None = None

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def stored(self) -> bool:
        """Whether the request gets a usage row: all but a refusal before any compute
        (`rejected`), which cost nothing, which neither the quota nor the usage report
        counts, and which any key holder can make by the thousand a second (a row each
        would grow the table without bound). /metrics counts refusals."""
        return self.status != "rejected"


@dataclass(frozen=True)
class UsageDay:
    """Usage aggregated over one UTC day and model."""

    date: str
    model: str
    requests: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    user_id: str | None = None

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def report(self) -> dict:
        """The day as the usage report shows it (`GET /v1/usage`, `admin usage`)."""
        return {
            "date": self.date,
            "model": self.model,
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True)
class QuotaState:
    used: int = 0
    reserved: int = 0


def utc_day(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d")


# -- users -------------------------------------------------------------------------------


def _user(row) -> UserRow:
    return UserRow(
        row.id,
        row.name,
        row.created_at,
        row.token_quota,
        row.quota_period,
        row.rpm,
        row.tpm,
        row.storage_quota_bytes,
    )


def create_user(repo: Repository, user: UserRow) -> bool:
    """Add a user; False if the name is taken (also by another admin at the same moment:
    the unique name refuses the second insert)."""
    try:
        with repo.engine.begin() as conn:
            if conn.execute(select(users.c.id).where(users.c.name == user.name)).first():
                return False
            conn.execute(insert(users).values(**asdict(user)))
    except IntegrityError:
        return False
    return True


def get_user(repo: Repository, name: str) -> UserRow | None:
    with repo.engine.connect() as conn:
        row = conn.execute(select(users).where(users.c.name == name)).first()
    return None if row is None else _user(row)


def get_user_by_id(repo: Repository, user_id: str) -> UserRow | None:
    with repo.engine.connect() as conn:
        row = conn.execute(select(users).where(users.c.id == user_id)).first()
    return None if row is None else _user(row)


def list_users(repo: Repository) -> list[UserRow]:
    with repo.engine.connect() as conn:
        rows = conn.execute(select(users).order_by(users.c.created_at, users.c.name)).all()
    return [_user(r) for r in rows]


def update_user(repo: Repository, name: str, changes: dict) -> UserRow | None:
    """Change a user's limits (`changes`: column -> value); None if there is no such user.
    A new quota period recounts the user's period rows from their usage rows: a row of a
    period left and now taken again (month, day, month) missed what was spent meanwhile."""
    with repo.engine.begin() as conn:
        if changes:
            conn.execute(update(users).where(users.c.name == name).values(**changes))
        if "quota_period" in changes:
            user_id = select(users.c.id).where(users.c.name == name).scalar_subquery()
            period = quota_periods.c
            conn.execute(
                update(quota_periods)
                .where(period.user_id == user_id)
                .values(used=_usage_since(period.user_id, period.period_start).scalar_subquery())
            )
    return get_user(repo, name)


def delete_user(repo: Repository, user_id: str) -> list[str] | None:
    """Delete a user with everything they own: conversations, responses, files, vector
    stores (with their index rows), keys and quota rows, in one transaction. Returns the
    ids of the deleted files, None if no such user.
    Usage records stay: they are the billing history."""
    file_ids = _owned_ids(repo, files.c.id, files.c.owner_id, user_id)
    store_ids = _owned_ids(repo, vector_stores.c.id, vector_stores.c.owner_id, user_id)
    for store_id in store_ids:
        delete_vector_store(repo, user_id, store_id)
    for file_id in file_ids:
        delete_file(repo, user_id, file_id, None)
    with repo.engine.begin() as conn:
        for table in (
            conversation_items,
            conversations,
            response_items,
            responses,
            cursor_tombstones,
        ):
            conn.execute(delete(table).where(table.c.owner_id == user_id))
        for table in (api_keys, quota_reservations, quota_periods):
            conn.execute(delete(table).where(table.c.user_id == user_id))
        deleted = conn.execute(delete(users).where(users.c.id == user_id)).rowcount
    return file_ids if deleted else None


def _owned_ids(repo: Repository, column, owner_column, owner: str) -> list[str]:
    with repo.engine.connect() as conn:
        return list(conn.execute(select(column).where(owner_column == owner)).scalars())


# -- keys --------------------------------------------------------------------------------


def add_key(repo: Repository, key: KeyRow, digest: str) -> None:
    with repo.engine.begin() as conn:
        conn.execute(insert(api_keys).values(digest=digest, **asdict(key)))


def list_keys(repo: Repository, user_id: str) -> list[KeyRow]:
    with repo.engine.connect() as conn:
        rows = conn.execute(
            select(api_keys)
            .where(api_keys.c.user_id == user_id)
            .order_by(api_keys.c.created_at, api_keys.c.id)
        ).all()
    return [KeyRow(r.id, r.user_id, r.hint, r.created_at, r.revoked_at, r.expires_at) for r in rows]


def revoke_key(repo: Repository, key_id: str, now: int) -> bool:
    """Revoke a key (at once: every request looks its key up); False if unknown or
    already revoked."""
    with repo.engine.begin() as conn:
        return (
            conn.execute(
                update(api_keys)
                .where(
                    api_keys.c.id == key_id,
                    api_keys.c.revoked_at.is_(None),
                )
                .values(revoked_at=now)
            ).rowcount
            > 0
        )


def find_key(repo: Repository, digest: str) -> tuple[str, UserRow, int | None] | None:
    """The key id, user and expiry (None: never) of a key with this digest that is not
    revoked. Its expiry is the caller's to compare with its clock: an expired key is
    refused with a message of its own."""
    with repo.engine.connect() as conn:
        row = conn.execute(
            select(
                api_keys.c.id.label("key_id"), api_keys.c.expires_at.label("key_expires_at"), users
            )
            .join(users, users.c.id == api_keys.c.user_id)
            .where(api_keys.c.digest == digest, api_keys.c.revoked_at.is_(None))
        ).first()
    return None if row is None else (row.key_id, _user(row), row.key_expires_at)


def any_keys(repo: Repository) -> bool:
    """Whether any key was ever issued (revoked ones count): then every request needs one."""
    with repo.engine.connect() as conn:
        return bool(conn.execute(select(exists().select_from(api_keys))).scalar())


# -- quotas ------------------------------------------------------------------------------


def _dialect_insert(conn: Connection):
    """The INSERT of `conn`'s dialect, which has ON CONFLICT clauses."""
    return pg_insert if conn.dialect.name == "postgresql" else sqlite_insert


def _ensure_period(conn: Connection, user_id: str, period_start: int) -> None:
    """The period's row, made at its first reservation with what the user's usage rows
    already hold since it began: a period changed by the operator (month to day, say)
    counts the tokens spent in it, as a fresh count would give a new allowance."""
    period = quota_periods.c
    found = select(period.used).where(
        period.user_id == user_id, period.period_start == period_start
    )
    if conn.execute(found).first() is not None:  # the request was over the limit
        return
    used = _used_since(conn, user_id, period_start)
    values = {"user_id": user_id, "period_start": period_start, "used": used, "reserved": 0}
    conn.execute(_dialect_insert(conn)(quota_periods).values(**values).on_conflict_do_nothing())


def _usage_since(user_id: str | ColumnElement, since: int | ColumnElement) -> Select:
    """The tokens of the user's usage rows recorded from `since` on (values, or columns of
    an enclosing statement)."""
    rows = usage_records.c
    return select(func.coalesce(func.sum(rows.input_tokens + rows.output_tokens), 0)).where(
        rows.user_id == user_id, rows.created_at >= since
    )


def _used_since(conn: Connection, user_id: str, period_start: int) -> int:
    return int(conn.execute(_usage_since(user_id, period_start)).scalar_one())


def reserve(
    repo: Repository,
    reservation_id: str,
    user_id: str,
    period_start: int,
    tokens: int,
    limit: int | None,
    now: float,
    extend: bool = False,
) -> bool:
    """Reserve `tokens` of the user's quota period (at most `limit` used + reserved; None:
    no limit, the tokens are only counted), under `reservation_id` (new, or with `extend`
    one this request holds already). False, and nothing changed, when they do not fit."""
    period = quota_periods.c
    stmt = (
        update(quota_periods)
        .where(
            period.user_id == user_id,
            period.period_start == period_start,
        )
        .values(reserved=period.reserved + tokens)
    )
    if limit is not None:
        stmt = stmt.where(period.used + period.reserved + tokens <= limit)
    with repo.engine.begin() as conn:
        if conn.execute(stmt).rowcount != 1:  # over the limit, or the period's first request
            _ensure_period(conn, user_id, period_start)
            if conn.execute(stmt).rowcount != 1:
                return False
        extended = (
            extend
            and conn.execute(
                update(quota_reservations)
                .where(
                    quota_reservations.c.id == reservation_id,
                )
                .values(tokens=quota_reservations.c.tokens + tokens)
            ).rowcount
        )
        if not extended:
            conn.execute(
                insert(quota_reservations).values(
                    id=reservation_id,
                    user_id=user_id,
                    period_start=period_start,
                    tokens=tokens,
                    created_at=now,
                    server_id=repo.server_id,
                )
            )
    return True


def settle(
    repo: Repository,
    reservation_id: str | None,
    record: UsageRecord,
    checkpoint_id: str | None = None,
    period_start: int | None = None,
) -> None:
    """Record a request's usage row as it ends (none for a refusal: `UsageRecord.stored`)
    and, if it holds a reservation, release it and charge the tokens it used to the
    reservation's period (`period_start`, which it is charged to also when a recovery
    released the reservation first); drop its usage checkpoint, if any: one transaction.
    Its own count is the truth: it replaces a row a recovery wrote for it from a checkpoint,
    and the quota is charged the difference."""
    with repo.engine.begin() as conn:
        _write_usage(conn, reservation_id, record, final=True, period_start=period_start)
        if checkpoint_id is not None:
            conn.execute(delete(usage_checkpoints).where(usage_checkpoints.c.id == checkpoint_id))


def _write_usage(
    conn: Connection,
    reservation_id: str | None,
    record: UsageRecord,
    *,
    final: bool,
    period_start: int | None = None,
) -> None:
    """Settle one request: release its reservation if it is still held (the settlement
    whose DELETE takes it gives back what it held: no other can), write or correct its
    usage row, and charge its period what the row gained. `final`: the request's own
    settlement, whose count replaces the row's; a recovery's checkpoint (not `final`)
    only raises a row that counted less (a later checkpoint of a request recovered
    before). Statements take their locks in one order (reservation, usage row, period),
    so concurrent settlements of one request wait for each other, never deadlock."""
    released = _release(conn, reservation_id) if reservation_id is not None else None
    charge = _record_once(conn, record, final)
    if released is not None:
        user_id, period_start, held = released
        _charge(conn, user_id, period_start, charge, held)
    elif charge and record.user_id is not None and period_start is not None:
        _charge(conn, record.user_id, period_start, charge, 0)  # released by another


def _release(conn: Connection, reservation_id: str) -> tuple[str, int, int] | None:
    """Delete the reservation: its user, period and tokens, or None when another
    settlement deleted it already (on PostgreSQL, this waits for one deleting it now)."""
    held = quota_reservations.c
    row = conn.execute(
        delete(quota_reservations)
        .where(held.id == reservation_id)
        .returning(held.user_id, held.period_start, held.tokens)
    ).first()
    return None if row is None else (row.user_id, row.period_start, row.tokens)


def _record_once(conn: Connection, record: UsageRecord, final: bool) -> int:
    """Write the request's usage row, or correct the one an earlier settlement of it
    wrote; returns the tokens the quota is to be charged for it (the difference)."""
    if not record.stored:
        return record.total_tokens
    values = {"day": utc_day(record.created_at), **asdict(record)}
    if record.request_id is None:  # a checkpoint from before migration 0021
        conn.execute(insert(usage_records).values(**values))
        return record.total_tokens
    rows = usage_records.c
    written = conn.execute(
        _dialect_insert(conn)(usage_records)
        .values(**values)
        .on_conflict_do_nothing(index_elements=[rows.request_id])
        .returning(rows.seq)
    ).first()
    if written is not None:
        return record.total_tokens
    before = conn.execute(
        select(rows.seq, (rows.input_tokens + rows.output_tokens).label("tokens"))
        .where(rows.request_id == record.request_id)
        .with_for_update()
    ).one()
    if not final and record.total_tokens <= before.tokens:
        return 0
    conn.execute(update(usage_records).where(rows.seq == before.seq).values(**values))
    return record.total_tokens - before.tokens


def _charge(conn: Connection, user_id: str, period_start: int, used: int, released: int) -> None:
    period = quota_periods.c
    conn.execute(
        update(quota_periods)
        .where(period.user_id == user_id, period.period_start == period_start)
        .values(reserved=period.reserved - released, used=period.used + used)
    )


def checkpoint_usage(
    repo: Repository,
    checkpoint_id: str,
    reservation_id: str | None,
    record: UsageRecord,
    period_start: int | None = None,
) -> None:
    """Write (or overwrite) a running request's usage so far (`period_start`: its
    reservation's quota period)."""
    values = {
        "id": checkpoint_id,
        "reservation_id": reservation_id,
        "record": asdict(record),
        "server_id": repo.server_id,
        "period_start": period_start,
    }
    with repo.engine.begin() as conn:
        stmt = _dialect_insert(conn)(usage_checkpoints).values(**values)
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[usage_checkpoints.c.id], set_={"record": stmt.excluded.record}
            )
        )


def settle_checkpoints(repo: Repository, server_id: str | None = None) -> int:
    """Settle every request (with `server_id`, every one that server ran) a crash cut off
    after a usage checkpoint, as `incomplete` with the usage last checkpointed: at
    start-up on a database only this server uses, or for a crashed server on a shared one
    (`servers.py`); before `release_reservations`, which would charge them nothing."""
    with repo.engine.begin() as conn:
        rows = conn.execute(
            select(usage_checkpoints).where(*written_by(usage_checkpoints, server_id))
        ).all()
        for row in rows:
            record = UsageRecord(**row.record)
            _write_usage(
                conn, row.reservation_id, record, final=False, period_start=row.period_start
            )
            conn.execute(delete(usage_checkpoints).where(usage_checkpoints.c.id == row.id))
    return len(rows)


def release_reservations(repo: Repository, server_id: str | None = None) -> int:
    """Release every reservation (with `server_id`, every one that server holds),
    charging nothing: at start-up on a database only this server uses, where one left
    behind was cut off by a crash, or for a crashed server on a shared one (`servers.py`)."""
    with repo.engine.begin() as conn:
        held = (
            conn.execute(
                select(quota_reservations.c.id).where(*written_by(quota_reservations, server_id))
            )
            .scalars()
            .all()
        )
        for reservation_id in held:
            if (released := _release(conn, reservation_id)) is not None:
                user_id, period_start, tokens = released
                _charge(conn, user_id, period_start, 0, tokens)
    return len(held)


def quota_state(repo: Repository, user_id: str, period_start: int) -> QuotaState:
    """The period's count; before its first reservation, what its row will start from."""
    with repo.engine.connect() as conn:
        row = conn.execute(
            select(quota_periods.c.used, quota_periods.c.reserved).where(
                quota_periods.c.user_id == user_id, quota_periods.c.period_start == period_start
            )
        ).first()
        if row is None:
            return QuotaState(used=_used_since(conn, user_id, period_start))
    return QuotaState(row.used, row.reserved)


# -- usage -------------------------------------------------------------------------------

_ANY = object()


def is_day(text: str) -> bool:
    """Whether `text` is a date as the usage rows' `day` holds it, YYYY-MM-DD (compared as
    text, "2026-9-1" would select the wrong days)."""
    try:
        return date.fromisoformat(text).isoformat() == text
    except ValueError:
        return False


def _reported(user_id: str | object | None, since: str | None) -> list[ColumnElement]:
    """The usage rows a report counts: of `user_id` (None: of no user, as admin keys' and
    an open server's requests; `_ANY`: of everyone), from the day `since` on. `rejected`
    rows (refusals before any compute, often before their model was known), which a store
    written by an older server may hold, are left out: they cost nothing."""
    u = usage_records.c
    where = [u.status != "rejected"]
    if user_id is not _ANY:
        where.append(u.user_id.is_(None) if user_id is None else u.user_id == user_id)
    if since is not None:
        where.append(u.day >= since)
    return where


def usage_days(
    repo: Repository, user_id: str | object | None, since: str | None, count: int
) -> list[str]:
    """The first `count` days (YYYY-MM-DD, from `since` on) on which `user_id` has usage:
    what a page of the usage report spans (`usage_by_day`'s `until`)."""
    u = usage_records.c
    query = select(u.day).where(*_reported(user_id, since)).distinct().order_by(u.day).limit(count)
    with repo.engine.connect() as conn:
        return list(conn.execute(query).scalars())


def usage_by_day(
    repo: Repository,
    user_id: str | object | None = _ANY,
    since: str | None = None,
    until: str | None = None,
) -> list[UsageDay]:
    """Usage per UTC day and model (and user, when not asked for one user), oldest first,
    of the days from `since` to `until` (both included); `user_id` as `_reported` takes it."""
    u = usage_records.c
    keys = [u.day, u.model] + ([u.user_id] if user_id is _ANY else [])
    query = (
        select(
            *keys,
            func.count().label("requests"),
            func.sum(u.input_tokens).label("input_tokens"),
            func.sum(u.cached_input_tokens).label("cached_input_tokens"),
            func.sum(u.output_tokens).label("output_tokens"),
        )
        .where(*_reported(user_id, since))
        .group_by(*keys)
    )
    if until is not None:
        query = query.where(u.day <= until)
    with repo.engine.connect() as conn:
        rows = conn.execute(query.order_by(*keys)).all()
    return [
        UsageDay(
            r.day,
            r.model,
            r.requests,
            int(r.input_tokens),
            int(r.cached_input_tokens),
            int(r.output_tokens),
            r.user_id if user_id is _ANY else user_id,
        )
        for r in rows
    ]


def usage_total(repo: Repository, user_id: str | None) -> int:
    """All tokens a user (None: no user) has used, from the usage rows."""
    u = usage_records.c
    where = u.user_id.is_(None) if user_id is None else u.user_id == user_id
    with repo.engine.connect() as conn:
        total = conn.execute(select(func.sum(u.input_tokens + u.output_tokens)).where(where))
        return int(total.scalar() or 0)


def usage_rows(repo: Repository, user_id: str | object | None = _ANY) -> list[UsageRecord]:
    """Every usage row (of one user), oldest first: for tests and exports."""
    u = usage_records.c
    query = select(usage_records).order_by(u.seq)
    if user_id is not _ANY:
        query = query.where(u.user_id.is_(None) if user_id is None else u.user_id == user_id)
    with repo.engine.connect() as conn:
        rows = conn.execute(query).all()
    names = [f for f in UsageRecord.__dataclass_fields__]
    return [UsageRecord(**{n: getattr(r, n) for n in names}) for r in rows]
