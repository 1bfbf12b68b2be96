"""OpenAI's attribute filters (`ComparisonFilter`, `CompoundFilter`): validation, and
compilation to a SQL condition on a JSON attributes column.

A comparison matches only an attribute of the value's own kind: a string matches string
attributes, a number numeric ones, a boolean boolean ones (so `eq 1` never matches
`true`, nor `"1"`). `ne` and `nin` are the negations of `eq` and `in`, so a file without
the attribute matches them. Strings order by code point under gt/gte/lt/lte on either
database, whatever language PostgreSQL's database sorts text in (ISO dates compare as
dates).

Filtering happens in SQL, before ranking, so a selective filter still returns up to
`max_num_results` hits instead of thinning a ranked list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import ColumnElement, and_, bindparam, case, false, func, not_, or_, select

COMPARISONS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "nin")
# The fields of OpenAI's CompoundFilter and ComparisonFilter.
COMPOUND_FIELDS = ("type", "filters")
COMPARISON_FIELDS = ("type", "key", "value")
MAX_DEPTH = 8
MAX_KEY_LENGTH = 64
# Every comparison is SQL the database runs on every candidate chunk: a filter holds at
# most MAX_COMPARISONS of them, and its `in`/`nin` lists at most MAX_VALUES values in all.
MAX_COMPARISONS = 100
MAX_VALUES = 1000

Scalar = str | int | float | bool


@dataclass(frozen=True)
class Comparison:
    key: str
    type: str
    value: Scalar | tuple[str | int | float, ...]


@dataclass(frozen=True)
class Compound:
    type: str  # "and" | "or"
    filters: tuple[Filter, ...]


Filter = Comparison | Compound


# Integers the databases store as they are (SQLite's INTEGER, PostgreSQL's bigint).
_INT64 = range(-(2**63), 2**63)


def is_number(value: Any) -> bool:
    """A JSON number an attribute or a filter may hold: not a boolean, and an integer only
    within 64 bits (a larger one fails in the database's comparison, not at the client)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return not isinstance(value, int) or value in _INT64


def parse_filter(value: Any, path: str = "filters") -> Filter:
    """Validate a request's `filters`; raises ValueError whose message names the field."""
    parsed = _parse(value, path, 0)
    comparisons = list(_comparisons(parsed))
    values = sum(len(c.value) if isinstance(c.value, tuple) else 1 for c in comparisons)
    if len(comparisons) > MAX_COMPARISONS or values > MAX_VALUES:
        raise ValueError(
            f"{path} has {len(comparisons)} comparisons and {values} values; at most "
            f"{MAX_COMPARISONS} comparisons and {MAX_VALUES} values (each value of an "
            "in/nin list counts) are allowed"
        )
    return parsed


def _comparisons(f: Filter):
    if isinstance(f, Comparison):
        yield f
        return
    for child in f.filters:
        yield from _comparisons(child)


def _refuse_other_fields(value: dict, path: str, fields: tuple[str, ...]) -> None:
    """A field the filter does not have is an error, not something left out of the
    condition (`values` beside `value`, `key` beside `filters`)."""
    for name in value:
        if name not in fields:
            raise ValueError(f"{path}.{name} is not a field of this filter ({', '.join(fields)})")


def _parse(value: Any, path: str, depth: int) -> Filter:
    if not isinstance(value, dict):
        raise ValueError(f"{path} must be an object")
    kind = value.get("type")
    if kind in ("and", "or"):
        _refuse_other_fields(value, path, COMPOUND_FIELDS)
        if depth >= MAX_DEPTH:
            raise ValueError(f"{path} nests compound filters deeper than {MAX_DEPTH} levels")
        items = value.get("filters")
        if not isinstance(items, list) or not items:
            raise ValueError(f"{path}.filters must be a non-empty array")
        return Compound(
            kind,
            tuple(_parse(f, f"{path}.filters[{i}]", depth + 1) for i, f in enumerate(items)),
        )
    if kind not in COMPARISONS:
        raise ValueError(f"{path}.type must be one of {', '.join((*COMPARISONS, 'and', 'or'))}")
    _refuse_other_fields(value, path, COMPARISON_FIELDS)
    key = value.get("key")
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH or "\x00" in key:
        raise ValueError(
            f"{path}.key must be a string of 1 to {MAX_KEY_LENGTH} characters, without NUL"
        )
    if "value" not in value:
        raise ValueError(f"{path}.value is required")
    operand = value["value"]
    if _holds_nul(operand):
        raise ValueError(f"{path}.value must not hold a NUL character (no attribute does)")
    if kind in ("in", "nin"):
        if (
            not isinstance(operand, list)
            or not operand
            or not all(isinstance(v, str) or is_number(v) for v in operand)
        ):
            raise ValueError(
                f"{path}.value must be a non-empty array of strings or numbers (an integer "
                f"must fit in 64 bits) for '{kind}'"
            )
        return Comparison(key, kind, tuple(operand))
    if kind in ("gt", "gte", "lt", "lte") and not (isinstance(operand, str) or is_number(operand)):
        raise ValueError(
            f"{path}.value must be a number (an integer must fit in 64 bits) or a string for "
            f"'{kind}'"
        )
    if not (isinstance(operand, str | bool) or is_number(operand)):
        raise ValueError(
            f"{path}.value must be a string, number or boolean (an integer must fit in 64 bits)"
        )
    return Comparison(key, kind, operand)


def _holds_nul(operand: Any) -> bool:
    """Whether a comparison's value (or one of its list's) is a string holding a NUL, which
    no attribute does: the chunks' attributes are PostgreSQL's `jsonb`, which cannot store
    one, nor take one in a parameter."""
    values = operand if isinstance(operand, list) else [operand]
    return any(isinstance(v, str) and "\x00" in v for v in values)


class JsonAttributes(Protocol):
    """How a database reads one attribute out of the JSON column: its JSON kind ("string",
    "number", "boolean", or "other" when absent or null) and its value (`like` tells a
    database that needs a cast which one)."""

    def kind(self, key: str) -> ColumnElement: ...

    def value(self, key: str, like: Scalar) -> ColumnElement: ...


class SqliteJsonAttributes:
    """SQLite's JSON1 functions over `column`. An attribute is looked up through
    `json_each`, whose keys are decoded: a JSON path (`$."key"`) is matched against the key
    as the stored text escapes it, so a key with a backslash or non-ASCII letters (stored
    as \\u escapes) would never match."""

    def __init__(self, column: ColumnElement) -> None:
        self.column = column

    def _field(self, key: str, part: str) -> ColumnElement:
        entries = func.json_each(self.column).table_valued("key", "type", "value")
        return select(entries.c[part]).where(entries.c.key == key).scalar_subquery()

    def kind(self, key: str) -> ColumnElement:
        raw = self._field(key, "type")
        return case(
            (raw == "text", "string"),
            (raw.in_(("integer", "real")), "number"),
            (raw.in_(("true", "false")), "boolean"),
            else_="other",
        )

    def value(self, key: str, like: Scalar) -> ColumnElement:
        return self._field(key, "value")


def _kind_of(value: Scalar) -> str:
    if isinstance(value, bool):
        return "boolean"
    return "number" if is_number(value) else "string"


def _equals(attrs: JsonAttributes, key: str, value: Scalar) -> ColumnElement:
    operand = int(value) if isinstance(value, bool) else value  # JSON true reads back as 1
    return and_(attrs.kind(key) == _kind_of(value), attrs.value(key, value) == operand)


def _one_of(attrs: JsonAttributes, key: str, values: tuple) -> ColumnElement:
    """The attribute is one of `values`: one IN list per kind of value (strings, integers,
    fractions), so the attribute is read once per kind rather than once per value. A
    list is bound as the attribute's own type (left to SQLAlchemy, it took its first
    value's, and PostgreSQL cast [2019, 2023.5] to integers: 2023.5 became 2024), and
    integers apart from fractions, as PostgreSQL compares a list's values as one type:
    among fractions, 2**53 + 1 was compared as a double, equal to 2**53."""
    groups: dict[tuple[str, type], list] = {}
    for v in values:
        groups.setdefault((_kind_of(v), type(v)), []).append(v)
    parts = []
    for (kind, _), same in groups.items():
        value = attrs.value(key, same[0])
        listed = bindparam(None, same, type_=value.type, expanding=True)
        parts.append(and_(attrs.kind(key) == kind, value.in_(listed)))
    return or_(*parts)


def compile_filter(f: Filter, attrs: JsonAttributes) -> ColumnElement:
    """The SQL condition for `f`; never NULL, so negation is exact."""
    if isinstance(f, Compound):
        parts = [compile_filter(child, attrs) for child in f.filters]
        return and_(*parts) if f.type == "and" else or_(*parts)
    if f.type in ("in", "nin"):
        assert isinstance(f.value, tuple)
        condition = _one_of(attrs, f.key, f.value)
    elif f.type in ("eq", "ne"):
        assert not isinstance(f.value, tuple)
        condition = _equals(attrs, f.key, f.value)
    else:
        assert not isinstance(f.value, tuple)
        value = attrs.value(f.key, f.value)
        compare = {
            "gt": value > f.value,
            "gte": value >= f.value,
            "lt": value < f.value,
            "lte": value <= f.value,
        }[f.type]
        condition = and_(attrs.kind(f.key) == _kind_of(f.value), compare)
    condition = func.coalesce(condition, false())
    return not_(condition) if f.type in ("ne", "nin") else condition
