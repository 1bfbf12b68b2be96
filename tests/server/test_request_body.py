"""Reading JSON bodies: the nesting depth read from the bytes equals the parsed value's."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.errors import APIError
from server.request_body import MAX_JSON_CONTAINERS, MAX_JSON_DEPTH, json_shape, parse_json

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


def walked_depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max((walked_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((walked_depth(v) for v in value), default=0)
    return 0


@given(VALUES, st.sampled_from(["utf-8", "utf-16", "utf-32-le"]), st.booleans())
def test_shape_from_bytes_equals_the_parsed_values(value, encoding, ascii_only):
    text = json.dumps(value, ensure_ascii=ascii_only, indent=None if ascii_only else 1)
    assert json_shape(text.encode(encoding)) == (walked_depth(value), containers(value))


def test_too_deep_a_body_is_a_400_and_escaped_brackets_do_not_count():
    deep = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    with pytest.raises(APIError, match="deeper than") as refused:
        parse_json(deep.encode())
    assert refused.value.status == 400 and refused.value.code == "invalid_json"
    shallow = json.dumps({"content": '\\"' + "[" * 500 + '\\\\"'})
    assert parse_json(shallow.encode()) == json.loads(shallow)


def test_a_body_of_too_many_objects_is_refused_before_it_is_parsed(monkeypatch):
    many = json.dumps({"messages": [{"role": "user", "content": "hi"}] * MAX_JSON_CONTAINERS})
    monkeypatch.setattr(json, "loads", lambda *_: pytest.fail("parsed a body it must refuse"))
    with pytest.raises(APIError, match=f"at most {MAX_JSON_CONTAINERS}") as refused:
        parse_json(many.encode())
    assert refused.value.status == 400 and refused.value.code == "invalid_json"
