"""Reading JSON bodies: the nesting depth read from the bytes equals the parsed value's."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.errors import APIError
from server.request_body import (
    MAX_JSON_CONTAINERS,
    MAX_JSON_DEPTH,
    MAX_JSON_VALUES,
    SCAN_CHUNK_BYTES,
    json_shape,
    parse_json,
)

# Strings full of the characters a byte scan could mistake for structure.
TRICKY = st.text(alphabet='[]{}"\\,:ab é\n', max_size=12)
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TRICKY,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TRICKY, inner, max_size=4),
    max_leaves=30,
)


def containers(value) -> int:
    if isinstance(value, dict):
        return 1 + sum(containers(v) for v in value.values())
    if isinstance(value, list):
        return 1 + sum(containers(v) for v in value)
    return 0


def commas(value) -> int:
    if isinstance(value, dict | list):
        children = list(value.values() if isinstance(value, dict) else value)
        return max(len(children) - 1, 0) + sum(commas(v) for v in children)
    return 0


def walked_depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max((walked_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((walked_depth(v) for v in value), default=0)
    return 0


@given(
    VALUES,
    st.sampled_from(["utf-8", "utf-16", "utf-32-le"]),
    st.booleans(),
    st.sampled_from([1, 2, 3, 7, SCAN_CHUNK_BYTES]),
)
def test_shape_from_bytes_equals_the_parsed_values(value, encoding, ascii_only, chunk_bytes):
    """Whatever the chunk size, so a string or a run of backslashes may span chunks."""
    text = json.dumps(value, ensure_ascii=ascii_only, indent=None if ascii_only else 1)
    shape = (walked_depth(value), containers(value), commas(value))
    assert json_shape(text.encode(encoding), chunk_bytes) == shape


def test_the_scan_stops_at_the_first_chunk_over_a_limit():
    body = json.dumps([{"a": "\\"}] * (4 * MAX_JSON_CONTAINERS)).encode()
    assert json_shape(body).containers == 4 * MAX_JSON_CONTAINERS + 1
    partial = json_shape(body, stop_over_limits=True)
    assert MAX_JSON_CONTAINERS < partial.containers < 2 * MAX_JSON_CONTAINERS


def test_too_deep_a_body_is_a_400_and_escaped_brackets_do_not_count():
    deep = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    with pytest.raises(APIError, match="deeper than") as refused:
        parse_json(deep.encode())
    assert refused.value.status == 400 and refused.value.code == "invalid_json"
    shallow = json.dumps({"content": '\\"' + "[" * 500 + '\\\\"'})
    assert parse_json(shallow.encode()) == json.loads(shallow)


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": "hi"}] * MAX_JSON_CONTAINERS},
        {"input": [[1] * 1024] * (MAX_JSON_VALUES // 1024)},
    ],
    ids=["objects", "numbers"],
)
def test_a_body_of_too_many_values_is_refused_before_it_is_parsed(monkeypatch, body):
    text = json.dumps(body).encode()
    monkeypatch.setattr(json, "loads", lambda *_: pytest.fail("parsed a body it must refuse"))
    with pytest.raises(APIError, match=f"at most {MAX_JSON_CONTAINERS}") as refused:
        parse_json(text)
    assert refused.value.status == 400 and refused.value.code == "invalid_json"


def test_the_largest_embeddings_request_is_within_the_value_limit():
    """300,000 token ids in 2,048 inputs: the most an embeddings request may hold."""
    ids = [[7] * 146] * 2047 + [[7] * 1138]
    assert sum(map(len, ids)) == 300_000
    assert parse_json(json.dumps({"input": ids}).encode())["input"] == ids
