"""OpenAI attribute filters: validation messages and their SQL meaning on SQLite, and the
same meaning on PostgreSQL for any filter (a property test)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import JSON, Column, Integer, MetaData, Table, create_engine, insert, select
from sqlalchemy.dialects.postgresql import JSONB

from orchestrator.retrieval.filters import SqliteJsonAttributes, compile_filter, parse_filter
from orchestrator.retrieval.index import sqlite_vec_engine
from orchestrator.retrieval.pg_index import PgJsonAttributes

ROWS = {
    1: {"author": "ann", "year": 2021, "draft": True, "score": 0.5},
    2: {"author": "bob", "year": 2023, "draft": False},
    3: {"author": "cy", "year": "2023", "draft": "true"},  # strings that look like others
    4: {},
    # keys the stored JSON text escapes: a backslash, a quote, non-ASCII letters
    5: {"dir\\name": "x", 'say "hi"': 1, "année": 2024, "日付": "2024-01-01"},
}


@pytest.fixture(scope="module")
def matching():
    engine = sqlite_vec_engine()
    docs = Table(
        "docs", MetaData(), Column("id", Integer, primary_key=True), Column("attributes", JSON)
    )
    with engine.begin() as conn:
        docs.create(conn)
        conn.execute(insert(docs), [{"id": i, "attributes": a} for i, a in ROWS.items()])

    def ids(filters: dict) -> set[int]:
        condition = compile_filter(parse_filter(filters), SqliteJsonAttributes(docs.c.attributes))
        with engine.connect() as conn:
            return set(conn.execute(select(docs.c.id).where(condition)).scalars())

    return ids


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"key": "author", "type": "eq", "value": "ann"}, {1}),
        ({"key": "author", "type": "ne", "value": "ann"}, {2, 3, 4, 5}),
        ({"key": "year", "type": "eq", "value": 2023}, {2}),  # not the string "2023"
        ({"key": "year", "type": "gte", "value": 2022}, {2}),
        ({"key": "year", "type": "lt", "value": 2022}, {1}),
        ({"key": "year", "type": "lte", "value": 2023.0}, {1, 2}),
        ({"key": "author", "type": "gt", "value": "b"}, {2, 3}),
        ({"key": "draft", "type": "eq", "value": True}, {1}),  # not 1, not "true"
        ({"key": "draft", "type": "eq", "value": False}, {2}),
        ({"key": "score", "type": "eq", "value": 0.5}, {1}),
        ({"key": "author", "type": "in", "value": ["bob", "cy", "zed"]}, {2, 3}),
        ({"key": "year", "type": "in", "value": [2021, "2023"]}, {1, 3}),
        ({"key": "author", "type": "nin", "value": ["ann", "bob"]}, {3, 4, 5}),
        ({"key": "dir\\name", "type": "eq", "value": "x"}, {5}),
        ({"key": 'say "hi"', "type": "eq", "value": 1}, {5}),
        ({"key": "année", "type": "gte", "value": 2024}, {5}),
        ({"key": "日付", "type": "eq", "value": "2024-01-01"}, {5}),
        ({"key": "year", "type": "lt", "value": 2**63 - 1}, {1, 2}),
        ({"key": "missing", "type": "eq", "value": "x"}, set()),
        (
            {
                "type": "and",
                "filters": [
                    {"key": "year", "type": "gte", "value": 2021},
                    {"key": "draft", "type": "eq", "value": False},
                ],
            },
            {2},
        ),
        (
            {
                "type": "or",
                "filters": [
                    {"key": "author", "type": "eq", "value": "cy"},
                    {
                        "type": "and",
                        "filters": [
                            {"key": "year", "type": "eq", "value": 2021},
                            {"key": "draft", "type": "eq", "value": True},
                        ],
                    },
                ],
            },
            {1, 3},
        ),
    ],
)
def test_filter_semantics(matching, filters, expected):
    assert matching(filters) == expected


@pytest.mark.parametrize(
    ("filters", "field"),
    [
        ([], "filters must be an object"),
        ({"type": "like", "key": "a", "value": 1}, "filters.type"),
        ({"type": "eq", "value": 1}, "filters.key"),
        ({"type": "eq", "key": "k" * 65, "value": 1}, "filters.key"),
        ({"type": "gt", "key": "a", "value": 10**30}, "filters.value"),
        ({"type": "eq", "key": "a", "value": -(2**63) - 1}, "filters.value"),
        ({"type": "in", "key": "a", "value": [1, 2**64]}, "filters.value"),
        ({"type": "eq", "key": "a"}, "filters.value"),
        ({"type": "eq", "key": "a", "value": None}, "filters.value"),
        ({"type": "gt", "key": "a", "value": True}, "filters.value"),
        ({"type": "in", "key": "a", "value": "x"}, "filters.value"),
        ({"type": "in", "key": "a", "value": [True]}, "filters.value"),
        ({"type": "and", "filters": []}, "filters.filters"),
        # a field neither filter has is refused, not left out of the condition
        ({"type": "eq", "key": "a", "value": 1, "values": [2, 3]}, r"filters\.values is not"),
        (
            {"type": "or", "filters": [{"type": "eq", "key": "a", "value": 1}], "key": "a"},
            r"filters\.key is not",
        ),
        (
            {"type": "or", "filters": [{"type": "eq", "key": "a", "value": {}}]},
            r"filters.filters\[0\].value",
        ),
    ],
)
def test_bad_filters_name_the_field(filters, field):
    with pytest.raises(ValueError, match=field):
        parse_filter(filters)


def test_nesting_is_bounded():
    deep: dict = {"type": "eq", "key": "a", "value": 1}
    for _ in range(9):
        deep = {"type": "and", "filters": [deep]}
    with pytest.raises(ValueError, match="deeper than"):
        parse_filter(deep)


def test_comparisons_and_values_are_bounded(matching):
    """At most 100 comparisons and 1,000 values in all; a long in-list is one IN per kind,
    so it runs like a short one."""
    eq = {"type": "eq", "key": "year", "value": 2021}
    with pytest.raises(ValueError, match="at most 100 comparisons"):
        parse_filter({"type": "or", "filters": [eq] * 101})
    many = [*range(3000, 3999), "bob"]
    assert matching({"key": "author", "type": "in", "value": many}) == {2}
    assert matching({"key": "year", "type": "in", "value": [*many[:-1], 2023]}) == {2}
    with pytest.raises(ValueError, match="1000 values"):
        parse_filter({"key": "author", "type": "in", "value": [*many, "x"]})
    split = [{"key": "author", "type": "in", "value": many[:500]}] * 2
    assert parse_filter({"type": "and", "filters": split})
    with pytest.raises(ValueError, match="1001 values"):
        parse_filter({"type": "and", "filters": [*split, eq]})


# Attribute values of every kind: integers up to 64 bits, fractions (exact in binary, so
# that neither database's number parsing is what is compared), booleans, strings that
# look like other kinds, and strings a language's collation orders otherwise than code
# points do: by case ("B" < "a" by code point, not in English), punctuation ("a-c" <
# "ab"), accents ("é" > "f"), and outside the BMP.
VALUES = [
    *(0, 1, -3, 2021, 2**53, 2**53 + 1, 2**63 - 1, -(2**63)),
    *(0.5, -7.25, 2021.5, 1e15 + 0.5),
    *(True, False),
    *("", "a", "B", "é", "😀", "1", "true", "a b"),
    *("ab", "a-c", "_z", "f", "Éa"),
]
KEYS = ("a", "b")
# Every pair of values under the two keys, and rows missing either.
SHARED_ROWS = (
    [{"a": a, "b": b} for a, b in itertools.product(VALUES, repeat=2)]
    + [{"a": v} for v in VALUES]
    + [{}]
)


@pytest.fixture(scope="module")
def on_both(postgres):
    """(filters -> ids on SQLite, filters -> ids on PostgreSQL) over SHARED_ROWS."""
    tables = []
    for engine, column, attrs in (
        (sqlite_vec_engine(), JSON, SqliteJsonAttributes),
        # a database sorting text in English, as many are set up: the filters must not
        # follow it (SQLite's order is by code point)
        (create_engine(postgres.create_database("en_US.UTF-8")), JSONB, PgJsonAttributes),
    ):
        docs = Table(
            "docs", MetaData(), Column("id", Integer, primary_key=True), Column("attrs", column)
        )
        with engine.begin() as conn:
            docs.create(conn)
            conn.execute(insert(docs), [{"id": i, "attrs": a} for i, a in enumerate(SHARED_ROWS)])
        tables.append((engine, docs, attrs))

    def ids(filters: dict) -> list[set[int]]:
        found = []
        for engine, docs, attrs in tables:
            condition = compile_filter(parse_filter(filters), attrs(docs.c.attrs))
            with engine.connect() as conn:
                found.append(set(conn.execute(select(docs.c.id).where(condition)).scalars()))
        return found

    yield ids
    for engine, _, _ in tables:
        engine.dispose()


_scalar = st.sampled_from(VALUES)
_comparison = st.one_of(
    st.builds(
        lambda kind, key, value: {"type": kind, "key": key, "value": value},
        st.sampled_from(["eq", "ne"]),
        st.sampled_from(KEYS),
        _scalar,
    ),
    st.builds(
        lambda kind, key, value: {"type": kind, "key": key, "value": value},
        st.sampled_from(["gt", "gte", "lt", "lte"]),
        st.sampled_from(KEYS),
        _scalar.filter(lambda v: not isinstance(v, bool)),
    ),
    st.builds(
        lambda kind, key, value: {"type": kind, "key": key, "value": value},
        st.sampled_from(["in", "nin"]),
        st.sampled_from(KEYS),
        st.lists(_scalar.filter(lambda v: not isinstance(v, bool)), min_size=1, max_size=4),
    ),
)
_filters = st.recursive(
    _comparison,
    lambda inner: st.builds(
        lambda kind, parts: {"type": kind, "filters": parts},
        st.sampled_from(["and", "or"]),
        st.lists(inner, min_size=1, max_size=3),
    ),
    max_leaves=6,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_filters)
@example({"type": "lt", "key": "a", "value": "a"})  # "B" only by code point
@example({"type": "gt", "key": "b", "value": "ab"})  # "a-c" only in English
def test_every_filter_selects_the_same_rows_on_both_databases(on_both, filters):
    """PostgreSQL read numbers as doubles (2**53 + 1 was 2**53), bound an in-list with
    its first value's type ([0, 0.5] as integers), and compared strings in the database's
    language ("B" < "a" on SQLite, not in English): a filter meant one thing per database."""
    sqlite, postgresql = on_both(filters)
    assert sqlite == postgresql
