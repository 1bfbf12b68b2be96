"""Quota periods: the UTC day, the UTC calendar month, or the user's whole history."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

Period = Literal["day", "month", "total"]
PERIODS: tuple[Period, ...] = ("day", "month", "total")


def period_start(period: str, now: float) -> int:
    """The first second (unix time) of the period holding `now`; 0 for "total"."""
    moment = datetime.fromtimestamp(now, UTC)
    if period == "day":
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    elif period == "month":
        start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    elif period == "total":
        return 0
    else:
        raise ValueError(f"quota period must be one of {', '.join(PERIODS)}, got {period!r}")
    return int(start.timestamp())


def resets_at(period: str, now: float) -> int | None:
    """When the period holding `now` ends (None: it never does)."""
    start = datetime.fromtimestamp(period_start(period, now), UTC)
    if period == "day":
        return int((start + timedelta(days=1)).timestamp())
    if period == "month":
        year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
        return int(start.replace(year=year, month=month).timestamp())
    return None
