"""The page's server side, in process: `/` and its static files with their policies, the
deny-all policy on API responses, `GET /v1/conversations`, the list the page's sidebar
shows (on both databases), and `GET /v1/tools`."""

from __future__ import annotations

import re

import httpx
import pytest

from orchestrator.tools import Calculator, ToolRegistry
from server import ServerConfig, build_app
from server.web import API_POLICY, PAGE_POLICY, STATIC_DIR
from tests.server.fake_engine import FakeEngine


def _get(server, path: str, **kwargs) -> httpx.Response:
    return httpx.get(f"{server.url}{path}", timeout=10, **kwargs)


def test_the_page_and_its_files_carry_the_page_policy(product_server):
    server = product_server()
    page = _get(server, "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == PAGE_POLICY
    assert page.headers["x-content-type-options"] == "nosniff"
    referenced = re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text)
    assert "/static/app.js" in referenced and "/static/chat.css" in referenced
    for path in referenced:
        response = _get(server, path)
        assert response.status_code == 200, path
        assert response.headers["content-security-policy"] == PAGE_POLICY
    # Every module the page imports is shipped, and none comes from elsewhere.
    for script in STATIC_DIR.glob("*.js"):
        imports = re.findall(r'^import\b[^;]*?\bfrom "([^"]+)"', script.read_text(), re.M)
        for target in imports:
            assert target.startswith("./") and (STATIC_DIR / target[2:]).is_file(), target
    assert _get(server, "/static/../server/web.py").status_code == 404


def test_api_responses_allow_nothing_to_run(product_server, tmp_path):
    server = product_server(data_dir=tmp_path)
    uploaded = httpx.post(
        f"{server.url}/v1/files",
        timeout=10,
        data={"purpose": "assistants"},
        files={"file": ("x.html", b"<script>alert(1)</script>", "text/html")},
    )
    content = _get(server, f"/v1/files/{uploaded.json()['id']}/content")
    assert content.headers["content-type"].startswith("text/html")
    assert content.headers["content-security-policy"] == API_POLICY  # sandboxed, no script
    assert content.headers["x-content-type-options"] == "nosniff"
    assert _get(server, "/v1/models").headers["content-security-policy"] == API_POLICY


def test_the_page_is_public_while_the_api_needs_the_key(product_server):
    server = product_server(api_keys=["sk-page"])
    assert _get(server, "/").status_code == 200
    assert _get(server, "/static/app.js").status_code == 200
    denied = _get(server, "/v1/conversations")
    assert denied.status_code == 401 and denied.headers["content-security-policy"] == API_POLICY
    assert (
        _get(server, "/v1/conversations", headers={"Authorization": "Bearer sk-page"}).status_code
        == 200
    )


def test_without_a_product_there_is_no_page():
    from tests.server.conftest import serve_in_thread

    app = build_app(FakeEngine(), ServerConfig(served_model_names=["fake-model"]))
    url, stop = serve_in_thread(app)
    try:
        assert httpx.get(f"{url}/", timeout=10).status_code == 404
    finally:
        stop()


def test_conversations_are_listed_newest_first_and_paginated(product_server, database_url):
    server = product_server(database_url=database_url)
    client = server.client
    made = [client.conversations.create(metadata={"title": f"chat {i}"}).id for i in range(5)]
    listed = _get(server, "/v1/conversations", params={"limit": 100}).json()
    assert listed["object"] == "list" and not listed["has_more"]
    ids = [c["id"] for c in listed["data"]]
    assert sorted(ids) == sorted(made)
    assert [c["created_at"] for c in listed["data"]] == sorted(
        (c["created_at"] for c in listed["data"]), reverse=True
    )
    assert {c["metadata"]["title"] for c in listed["data"]} == {f"chat {i}" for i in range(5)}
    # Pages of two, in both orders, cover the list exactly once.
    for order, expected in (("desc", ids), ("asc", ids[::-1])):
        seen, after = [], None
        while True:
            params = {"limit": 2, "order": order, **({"after": after} if after else {})}
            page = _get(server, "/v1/conversations", params=params).json()
            seen += [c["id"] for c in page["data"]]
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert seen == expected
    client.conversations.delete(made[0])
    assert made[0] not in [c["id"] for c in _get(server, "/v1/conversations").json()["data"]]


@pytest.mark.parametrize(
    "query, param",
    [({"limit": "0"}, "limit"), ({"order": "up"}, "order"), ({"after": "conv_unknown"}, "after")],
)
def test_bad_list_queries_name_the_field(product_server, query, param):
    response = _get(product_server(), "/v1/conversations", params=query)
    assert response.status_code in (400, 404)
    assert response.json()["error"]["param"] == param


def test_the_built_in_tools_are_listed_without_why_others_are_missing(product_server):
    """`GET /v1/tools`: the built-ins this server runs and whether each is a default (the
    page offers "Run Python code" from it); one it cannot run is left out, its reason
    (a path on the server) unsaid."""
    server = product_server()
    responses = server.product.responses
    responses.tools = ToolRegistry([Calculator()], {"code_interpreter": "/usr/bin/bwrap not found"})
    responses.default_tools = ("calculator",)
    listed = _get(server, "/v1/tools")
    assert listed.status_code == 200
    assert listed.json() == {"object": "list", "data": [{"name": "calculator", "default": True}]}
    assert "bwrap" not in listed.text
    responses.file_search = object()  # vector stores: file_search runs too
    assert [t["name"] for t in _get(server, "/v1/tools").json()["data"]] == [
        "calculator",
        "file_search",
    ]
