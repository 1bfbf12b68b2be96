"""The operator's CLI for accounts: users, API keys and usage.

    python -m orchestrator.admin --data-dir DIR users create alice --token-quota 100000 \\
        --quota-period month --rpm 60 --tpm 20000 --storage-quota-mb 500
    python -m orchestrator.admin --data-dir DIR keys create alice     # prints the key once
    python -m orchestrator.admin --data-dir DIR keys create alice --expires-in 30d
    python -m orchestrator.admin --data-dir DIR usage --user alice --json

It opens the same store as the server (`--data-dir`, or `--database-url`), migrating it
if needed, and may run while the server does: a new key works, and a revoked one is
refused, on the server's next request; a key issued with an expiry is refused from then on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from orchestrator.accounts import keys
from orchestrator.accounts.periods import PERIODS
from orchestrator.store import Store, database_error, sqlite_url
from orchestrator.store import accounts as db
from orchestrator.store.accounts import KeyRow, UserRow

NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._@-")


MAX_LIMIT = 2**63 - 1  # what the database's integer columns hold


class AdminError(Exception):
    """A command that cannot be done as asked (printed, exit status 1)."""


def _whole(text: str, most: int) -> int | None:
    """A limit from 0 to `most`, or "none" for no limit."""
    if text.lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1  # argparse would name this function in its message
    if not 0 <= value <= most:
        raise argparse.ArgumentTypeError(
            f"must be a whole number from 0 to {most} (or 'none'), got {text!r}"
        )
    return value


def _count(text: str) -> int | None:
    return _whole(text, MAX_LIMIT)


def _mebibytes(text: str) -> int | None:
    """A storage limit in MiB, whose bytes must fit the store's 64-bit column."""
    return _whole(text, MAX_LIMIT >> 20)


def _positive(text: str) -> int | None:
    value = _count(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 (or 'none'), got {text!r}")
    return value


# What `--expires-in` counts in: m(inutes), h(ours), d(ays), w(eeks).
DURATION_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _duration(text: str) -> int:
    """A key's lifetime in seconds: a whole number >= 1 and a unit (`30d`), short enough
    that its expiry fits the store's 64-bit column."""
    number, unit = text[:-1], text[-1:].lower()
    seconds = (
        int(number) * DURATION_UNITS[unit]
        if number.isascii() and number.isdigit() and unit in DURATION_UNITS
        else 0
    )
    if not 0 < seconds <= MAX_LIMIT // 2:
        raise argparse.ArgumentTypeError(
            f"must be a whole number >= 1 and a unit, m, h, d or w (minutes, hours, days, "
            f"weeks), such as 30d, got {text!r}"
        )
    return seconds


def _instant(text: str) -> int:
    """An ISO 8601 date or date and time (UTC unless it gives an offset) as a Unix time,
    rounded up: a key never expires before the instant the operator named."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        when = None
    if when is None:
        raise argparse.ArgumentTypeError(
            f"must be an ISO 8601 date or time, such as 2027-01-31 or 2027-01-31T18:00:00+01:00 "
            f"(UTC unless it gives an offset), got {text!r}"
        )
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return math.ceil(when.timestamp())


def _limit_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    default = None if defaults else argparse.SUPPRESS
    parser.add_argument(
        "--token-quota",
        type=_count,
        default=default,
        metavar="N",
        help="tokens (input + output) per period; 'none': unlimited",
    )
    parser.add_argument(
        "--quota-period", choices=PERIODS, default="month" if defaults else argparse.SUPPRESS
    )
    parser.add_argument(
        "--rpm",
        type=_positive,
        default=default,
        metavar="N",
        help="requests per minute; 'none': unlimited",
    )
    parser.add_argument(
        "--tpm",
        type=_positive,
        default=default,
        metavar="N",
        help="tokens per minute (prompt + max output); 'none': unlimited",
    )
    parser.add_argument(
        "--storage-quota-mb",
        type=_mebibytes,
        default=default,
        metavar="MIB",
        help="uploaded files' bytes, all told, in MiB; 'none': unlimited",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.admin", description="Manage tokenmill's users, keys and usage."
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--data-dir", type=Path, help="the server's --data-dir (its SQLite store)")
    where.add_argument("--database-url", help="the server's --database-url")
    groups = parser.add_subparsers(dest="group", required=True)

    users = groups.add_parser("users", help="create, list, update, delete users")
    user_commands = users.add_subparsers(dest="command", required=True)
    create = user_commands.add_parser("create", help="add a user")
    create.add_argument("name")
    _limit_options(create, defaults=True)
    user_commands.add_parser("list", help="list users and their limits")
    update = user_commands.add_parser("update", help="change a user's limits")
    update.add_argument("name")
    _limit_options(update, defaults=False)
    delete = user_commands.add_parser(
        "delete",
        help="delete a user with their keys, conversations, responses, files and "
        "vector stores (their usage records stay)",
    )
    delete.add_argument("name")

    key_group = groups.add_parser("keys", help="create, list, revoke API keys")
    key_commands = key_group.add_subparsers(dest="command", required=True)
    create_key = key_commands.add_parser("create", help="issue a key (printed once, as JSON)")
    create_key.add_argument("name")
    expiry = create_key.add_mutually_exclusive_group()
    expiry.add_argument(
        "--expires-in",
        type=_duration,
        metavar="DURATION",
        help="refuse the key after this long: a number and m, h, d or w (30d); default: never",
    )
    expiry.add_argument(
        "--expires-at",
        type=_instant,
        metavar="WHEN",
        help="refuse the key from this ISO 8601 date or time (2027-01-31: its first second, "
        "UTC unless an offset is given); default: never",
    )
    key_commands.add_parser("list", help="a user's keys").add_argument("name")
    key_commands.add_parser("revoke", help="revoke a key (refused at once)").add_argument("key_id")

    usage = groups.add_parser("usage", help="tokens used, per day, model and user")
    usage.add_argument("--user", help="one user's usage")
    usage.add_argument("--since", help="from this UTC date (YYYY-MM-DD)")
    usage.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _user(store: Store, name: str) -> UserRow:
    user = db.get_user(store.repo, name)
    if user is None:
        raise AdminError(f"no user named {name!r}")
    return user


def _cell(value: object) -> str:
    """A table's cell: "-" for an unset value (no limit, not revoked), as in every table."""
    return "-" if value is None else str(value)


def _print_table(rows: list[dict]) -> None:
    if not rows:
        print("(none)")
        return
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(_cell(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(_cell(row[c]).ljust(widths[c]) for c in columns))


def _bytes(mib: int | None) -> int | None:
    return None if mib is None else mib * 2**20


def _limits(user: UserRow) -> dict:
    return {k: v for k, v in asdict(user).items() if k != "created_at"}


def users_command(store: Store, args: argparse.Namespace) -> None:
    if args.command == "create":
        if not args.name or set(args.name) - NAME_CHARS or len(args.name) > 64:
            raise AdminError("a user name is 1 to 64 of the characters A-Z a-z 0-9 . _ @ -")
        user = UserRow(
            f"user_{secrets.token_hex(12)}",
            args.name,
            int(time.time()),
            args.token_quota,
            args.quota_period,
            args.rpm,
            args.tpm,
            _bytes(args.storage_quota_mb),
        )
        if not db.create_user(store.repo, user):
            raise AdminError(f"a user named {args.name!r} exists already")
        print(json.dumps(_limits(user)))
    elif args.command == "list":
        _print_table([_limits(u) for u in db.list_users(store.repo)])
    elif args.command == "update":
        _user(store, args.name)
        changes = {
            k: getattr(args, k)
            for k in ("token_quota", "quota_period", "rpm", "tpm")
            if hasattr(args, k)
        }
        if hasattr(args, "storage_quota_mb"):
            changes["storage_quota_bytes"] = _bytes(args.storage_quota_mb)
        if not changes:
            raise AdminError(
                "nothing to change: give --token-quota, --quota-period, --rpm, --tpm or "
                "--storage-quota-mb"
            )
        updated = db.update_user(store.repo, args.name, changes)
        assert updated is not None
        print(json.dumps(_limits(updated)))
    else:
        user = _user(store, args.name)
        removed = db.delete_user(store.repo, user.id)
        if removed is None:
            raise AdminError(f"no user named {args.name!r}")
        print(json.dumps({"deleted": user.name, "id": user.id, "files": len(removed)}))


def keys_command(store: Store, args: argparse.Namespace) -> None:
    if args.command == "create":
        user = _user(store, args.name)
        now = int(time.time())
        expires_at = args.expires_at if args.expires_in is None else now + args.expires_in
        if expires_at is not None and expires_at <= now:
            raise AdminError(f"--expires-at is not in the future (now: {now}, UTC seconds)")
        secret = keys.new_secret()
        key = KeyRow(keys.new_key_id(), user.id, keys.hint(secret), now, expires_at=expires_at)
        db.add_key(store.repo, key, keys.digest(secret))
        print(
            json.dumps(
                {
                    "id": key.id,
                    "user": user.name,
                    "key": secret,
                    "created_at": key.created_at,
                    "expires_at": key.expires_at,
                }
            )
        )
    elif args.command == "list":
        user = _user(store, args.name)
        _print_table(
            [
                {
                    "id": k.id,
                    "key": k.hint,
                    "created_at": k.created_at,
                    "expires_at": k.expires_at,
                    "revoked_at": k.revoked_at,
                }
                for k in db.list_keys(store.repo, user.id)
            ]
        )
    elif not db.revoke_key(store.repo, args.key_id, int(time.time())):
        raise AdminError(f"no live key with id {args.key_id!r}")
    else:
        print(json.dumps({"revoked": args.key_id}))


def usage_command(store: Store, args: argparse.Namespace) -> None:
    names = {u.id: u.name for u in db.list_users(store.repo)}
    if args.user is not None:
        days = db.usage_by_day(store.repo, _user(store, args.user).id, args.since)
    else:
        days = db.usage_by_day(store.repo, since=args.since)
    rows = [
        # date first, then the user, then the report's columns (dict order is the table's)
        {"date": d.date, "user": names.get(d.user_id, d.user_id) if d.user_id else None}
        | d.report()
        for d in days
    ]
    if args.json:
        print(json.dumps({"object": "list", "data": rows}))
    else:
        _print_table(rows)


COMMANDS = {"users": users_command, "keys": keys_command, "usage": usage_command}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "since", None) is not None and not db.is_day(args.since):
        print("error: --since must be a date, YYYY-MM-DD", file=sys.stderr)
        return 2
    if args.data_dir is not None and not args.data_dir.expanduser().is_dir():
        print(
            f"error: no data directory at {args.data_dir}: give the server's --data-dir",
            file=sys.stderr,
        )
        return 1
    try:
        store = Store(args.database_url or sqlite_url(args.data_dir))
    except SQLAlchemyError as exc:
        print(f"error: cannot open the store: {database_error(exc)}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: cannot open the store: {exc}", file=sys.stderr)
        return 1
    try:
        COMMANDS[args.group](store, args)
    except AdminError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except SQLAlchemyError as exc:  # locked past its busy timeout, a connection lost...
        print(f"error: the store failed: {database_error(exc)}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


def run() -> int:
    """`main` for a command line, where stdout may be a pipe whose reader stops early
    (`usage --json | head`): the CLI then exits quietly with the status a shell gives a
    tool SIGPIPE ends (141), as Unix tools do, instead of printing a traceback."""
    try:
        status = main()
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
    except BrokenPipeError:
        # what is still buffered goes nowhere, so the interpreter's exit cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return status


if __name__ == "__main__":
    sys.exit(run())
