"""Large JSON answers encoded in pieces off the event loop read as `JSONResponse`'s."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st
from starlette.responses import JSONResponse

from server import json_body

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(), inner, max_size=6),
    max_leaves=60,
)


@given(_JSON)
def test_a_body_encoded_in_pieces_is_the_bytes_json_response_renders(value):
    """Pieces of at most 3 containers and values: every object and array of any size
    is split, and the joined pieces must still be the one-shot encoding, byte for byte."""
    original = json_body.PIECE_NODES
    json_body.PIECE_NODES = 3
    try:
        assert json_body.encode_json(value) == JSONResponse(value).body
    finally:
        json_body.PIECE_NODES = original


def test_small_and_large_bodies_answer_alike():
    for value in ({"a": [1, 2]}, {"data": [{"x": [i, "é"]} for i in range(5_000)]}):
        response = asyncio.run(json_body.json_response(value, 201, {"ETag": '"1"'}))
        assert response.body == JSONResponse(value).body and response.status_code == 201
        assert response.headers["content-type"] == "application/json"
        assert response.headers["etag"] == '"1"'
