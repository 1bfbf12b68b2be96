"""The web chat page at `/`, driven in headless Chromium against `python -m engine.serve`
with the default model (one server for the module, with an API key, answers kept short)."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import httpx
import pytest

from tests.server.live_server import API_KEY, ROOT, LiveServer, start_server
from tests.web.browser import chromium_path

pytestmark = pytest.mark.slow
CHROMIUM = chromium_path()

MODEL = "smollm2-135m-instruct"
LONG_PROMPT = "Write a long story about a dragon who learns to cook."  # 400 tokens, greedy
# docs/web.md's picture of the page, taken again only when asked: a test run leaves the
# working tree as it found it.
SCREENSHOT = ROOT / "docs" / "images" / "chat.png"
TAKE_SCREENSHOT = os.environ.get("TOKENMILL_SCREENSHOT") == "1"
EVIL = "<img src=x onerror=window.pwned=1>"
SCRIPT = "<script>window.pwned=2</script>"
# Short answers (a word or two): every turn's tokens are generated on the module's one
# server, and what the tests check of an answer is that it is shown, not what it says.
SETTINGS = json.dumps({"max_output_tokens": 3, "temperature": 0})


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    # Greedy answers of the 135M model flip between a cached and a fresh prefill (different
    # float summation order); the citation test needs the answer it gets on a fresh prompt.
    server = start_server("--compile", "off", "--no-enable-prefix-caching", "--api-key", API_KEY)
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def api(live: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=live.url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}
    ) as client:
        yield client


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@dataclass
class Console:
    """What the page logged as errors, and the failed loads a test expects."""

    errors: list[str] = field(default_factory=list)
    expected: list[str] = field(default_factory=list)  # regexes over "message @ url"

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not any(re.search(p, e) for p in self.expected)]


@pytest.fixture(scope="module")
def usage_missing(api: httpx.Client) -> bool:
    """True while this server has no GET /v1/usage: the page then hides the usage panel,
    and the 404 Chromium logs for that probe is expected."""
    return api.get("/v1/usage").status_code == 404


def _open_context(browser, live: LiveServer, usage_missing: bool, *, key: str | None, **options):
    context = browser.new_context(base_url=live.url, **options)
    setup = {"tokenmill.defaults": SETTINGS}
    if key:
        setup["tokenmill.apiKey"] = key
    writes = "".join(
        f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)});" for k, v in setup.items()
    )
    context.add_init_script(f"if (location.origin === {json.dumps(live.url)}) {{ {writes} }}")
    console = Console()
    if usage_missing:
        console.expected.append(r"404 .*@ .*/v1/usage$")

    def on_console(message) -> None:
        if message.type == "error":
            console.errors.append(f"{message.text} @ {message.location.get('url', '')}")

    context.on("console", on_console)
    context.on("weberror", lambda error: console.errors.append(f"uncaught: {error.error}"))
    return context, console


@pytest.fixture
def session(browser, live, usage_missing):
    """A signed-in browser context (the key in localStorage) and its console."""
    context, console = _open_context(browser, live, usage_missing, key=API_KEY)
    yield context, console
    context.close()
    assert console.unexpected() == []


@pytest.fixture
def page(session):
    context, _ = session
    page = context.new_page()
    page.goto("/")
    page.wait_for_selector("body[data-ready=true]")
    return page


def reload_when_saved(page) -> None:
    """Reloads once the page has stored the branch on screen (it saves in the background)."""
    page.wait_for_function("() => !document.body.dataset.saving")
    page.reload()
    page.wait_for_selector("body[data-ready=true]")


def finished_turns(page) -> int:
    return int(page.evaluate("document.body.dataset.turns || '0'"))


def wait_for_turn(page, before: int) -> None:
    """Until the page has finished (and stored) one more turn than `before`."""
    page.wait_for_function(
        f"() => Number(document.body.dataset.turns || 0) > {before}", timeout=90_000
    )


def attach(page, name: str, text: bytes = b"Some text.\n") -> None:
    """Attach a text file through the page and wait until it is indexed and saved."""
    page.set_input_files(
        "#upload", files=[{"name": name, "mimeType": "text/plain", "buffer": text}]
    )
    page.wait_for_selector(f"#attachments .attachment.completed:has-text('{name}')", timeout=60_000)
    page.wait_for_function("() => !document.body.dataset.saving")


def send(page, text: str) -> None:
    """Types `text` and presses Enter; returns once the answer has finished."""
    before = finished_turns(page)
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    wait_for_turn(page, before)


def set_output_tokens(page, tokens: int) -> None:
    """Sets the answers' max output tokens in the settings dialog."""
    page.click("#open-settings")
    page.fill("#max-output-tokens", str(tokens))
    page.click("#settings-save")


def start_long_answer(page, tokens: int = 400) -> None:
    """Sends a prompt whose answer streams for seconds (`tokens` of them)."""
    set_output_tokens(page, tokens)
    page.fill("#prompt", LONG_PROMPT)
    page.press("#prompt", "Enter")


def wait_for_answer_text(page) -> None:
    page.wait_for_function(
        "() => (document.querySelector('#messages .assistant-body') || {textContent: ''})"
        ".textContent.length > 10"
    )


def into_the_next_second() -> None:
    """Waits until a whole second has begun: the server's times (created_at) count whole
    seconds, so what it records from now on is later than what it recorded before."""
    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(1.01 - time.time() % 1)


def turns(page) -> list[str]:
    return page.eval_on_selector_all("#messages .turn", "els => els.map(e => e.dataset.responseId)")


def open_conversation(page, title: str) -> None:
    """Clicks the conversation in the sidebar; returns once its turns are shown.
    (Waits take functions: the page's policy forbids evaluating strings.)"""
    page.get_by_role("button", name=title, exact=True).click()
    # The click starts loading it ("Loading…") even when it is open already (a reload
    # reopens the conversation in the address): wait for that load, not the turns shown.
    page.wait_for_function("() => document.querySelector('#status').textContent !== 'Loading…'")
    page.wait_for_function("() => document.querySelectorAll('#messages .turn').length > 0")


def test_page_is_served_with_a_strict_content_security_policy(live):
    page = httpx.get(f"{live.url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy and "http" not in policy
    assert "<script" not in re.sub(
        r'<script type="module" src="/static/app\.js"></script>', "", page.text
    )
    assert not re.search(r'(src|href)="(https?:)?//', page.text)  # nothing remote
    script = httpx.get(f"{live.url}/static/app.js", timeout=10)
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "'self'" in script.headers["content-security-policy"]
    assert httpx.get(f"{live.url}/v1/models", timeout=10).status_code == 401  # the page is open


def test_a_message_streams_into_the_page(page, api):
    page.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const last = document.querySelector('#messages .turn:last-child .assistant-body');
            if (last) window.__lengths.push(last.textContent.length);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true});
    }""")
    set_output_tokens(page, 6)  # an answer of several pieces, each drawn as it comes
    send(page, "Name three colors.")
    lengths = page.evaluate("window.__lengths")
    assert len(set(lengths)) >= 3, lengths  # the answer grew piece by piece
    [response_id] = turns(page)
    stored = api.get(f"/v1/responses/{response_id}").json()
    answer = page.inner_text("#messages .turn .assistant-body")
    # its first word, not a list marker: "1. Red" renders as a numbered item, "Red"
    first_word = re.search(r"[^\W\d_]{2,}", stored["output"][0]["content"][0]["text"])
    assert first_word and first_word.group(0) in answer
    assert page.inner_text("#chat-title") == "Name three colors."
    # Shift+Enter is a new line, not a send.
    page.fill("#prompt", "one")
    page.press("#prompt", "Shift+Enter")
    page.keyboard.type("two")
    assert page.input_value("#prompt") == "one\ntwo"
    assert turns(page) == [response_id]


def test_stop_ends_the_stream_and_the_response(page, api):
    start_long_answer(page)
    wait_for_answer_text(page)
    page.click("#stop")
    page.wait_for_selector("#send:not([hidden])")
    assert page.locator("#messages").get_by_text("Stopped.").is_visible()
    shown = page.inner_text("#messages .assistant-body")
    [response_id] = turns(page)
    deadline = time.monotonic() + 30
    while (stored := api.get(f"/v1/responses/{response_id}").json())["status"] == "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert stored["status"] == "cancelled"  # the Stop button cancels the response
    assert stored["usage"]["output_tokens"] < 400
    time.sleep(0.5)
    assert page.inner_text("#messages .assistant-body") == shown  # nothing more arrived


def test_leaving_a_streaming_answer_cancels_it(page, api):
    """The page streams in background mode, where closing the connection alone leaves
    the response running: leaving the answer (a new chat) cancels it too."""
    start_long_answer(page)
    wait_for_answer_text(page)
    [response_id] = turns(page)
    page.click("#new-chat")
    deadline = time.monotonic() + 30
    while (stored := api.get(f"/v1/responses/{response_id}").json())["status"] == "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert stored["background"] and stored["status"] == "cancelled"
    assert stored["usage"]["output_tokens"] < 400


def test_stop_does_not_wait_for_a_server_that_does_not_answer(page, api):
    """A cancel the server never answers (stopped, overloaded): Stop still ends the turn
    on the page, within a few seconds, by closing the connection."""
    page.route("**/cancel", lambda route: None)  # the request hangs, never answered
    page.clock.install()
    start_long_answer(page)
    wait_for_answer_text(page)
    [response_id] = turns(page)
    page.click("#stop")
    page.clock.run_for(2_000)  # Stop's wait for the cancel, run forward
    page.wait_for_selector("#send:not([hidden])", timeout=10_000)  # never, before the fix
    assert page.locator("#messages").get_by_text("Stopped.").is_visible()
    cancel_left_running(api, response_id)


def hold_first_bytes(page, api) -> tuple[str, str, list]:
    """Starts a long answer whose stream's first bytes are held back from the page (a slow
    network, a proxy that buffers): the request reaches the server, which starts the
    response; the page has no id for it yet. Returns the response's id, the stream as the
    server began it (its response.created), and the held route, to fulfill with it."""
    held: list = []
    page.route(
        "**/v1/responses",
        lambda route: held.append(route) if route.request.method == "POST" else route.fallback(),
    )
    start_long_answer(page)
    while not held:
        page.wait_for_timeout(50)
    [route] = held
    headers = {"Content-Type": "application/json"}
    with api.stream(
        "POST", "/v1/responses", content=route.request.post_data, headers=headers
    ) as streamed:
        lines = []
        for line in streamed.iter_lines():
            if not line and lines:
                break  # the end of the first event
            lines.append(line)
    created = json.loads(lines[-1].removeprefix("data:"))
    assert created["type"] == "response.created"
    return created["response"]["id"], "\n".join(lines) + "\n\n", held


def fulfill_stream(route, body: str) -> None:
    """Answers a held request with `body` as its event stream."""
    route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)


def assert_cancelled(api, response_id: str) -> None:
    """The response ends, cancelled before its 400 tokens."""
    deadline = time.monotonic() + 60
    while (stored := api.get(f"/v1/responses/{response_id}").json())["status"] in (
        "queued",
        "in_progress",
    ):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert stored["status"] == "cancelled" and stored["usage"]["output_tokens"] < 400


def cancel_left_running(api, response_id: str) -> None:
    """Cancels a background response the test left running on the server: what the test
    checks is done, and the rest of its 400 tokens would slow the tests after it."""
    assert api.post(f"/v1/responses/{response_id}/cancel").status_code == 200


def test_stop_before_the_answer_began_cancels_its_response(page, api):
    """Stop pressed before the turn's first event (response.created, with its id) reached
    the page: the page cancels the response as soon as the id comes, rather than close the
    connection alone and leave the background response running (and billed); the turn ends
    as "Stopped."."""
    response_id, body, [route] = hold_first_bytes(page, api)
    page.click("#stop")
    fulfill_stream(route, body)
    page.wait_for_selector("#send:not([hidden])")
    assert page.locator("#messages").get_by_text("Stopped.").is_visible()
    assert turns(page) == [response_id]
    assert_cancelled(api, response_id)
    page.wait_for_function("() => !document.body.dataset.saving")
    conversation = page.evaluate("location.hash")[1:]
    assert api.get(f"/v1/conversations/{conversation}").json()["metadata"]["leaf"] == response_id


@pytest.mark.parametrize("control", ["#stop", "#new-chat"])
def test_a_turn_given_up_before_its_answer_began_is_cancelled_when_its_id_comes(page, api, control):
    """Stop, or leaving the chat, while the stream's first bytes are still held back past
    the few seconds Stop waits: the turn ends on the page at once (its message back in the
    box), and its response is cancelled once its first event arrives after all."""
    page.clock.install()
    response_id, body, [route] = hold_first_bytes(page, api)
    page.click(control)
    page.clock.run_for(2_000)  # Stop's wait for the cancel, run forward
    page.wait_for_selector("#send:not([hidden])", timeout=10_000)
    assert turns(page) == [] and page.input_value("#prompt") == LONG_PROMPT
    if control == "#stop":
        assert "Stopped" in page.inner_text("#status")
    fulfill_stream(route, body)
    assert_cancelled(api, response_id)
    assert turns(page) == []


def test_a_stream_held_only_to_cancel_its_response_is_closed_after_a_minute(page, api):
    """Stop pressed while the stream's first bytes are held back, and they never come: the
    page does not keep the connection open for ever waiting for the id, but closes it a
    minute after giving the turn up (the page's clock is run forward)."""
    failed: list[str] = []
    page.on("requestfailed", lambda r: failed.append(r.url) if r.method == "POST" else None)
    page.clock.install()
    response_id, _, _ = hold_first_bytes(page, api)
    page.click("#stop")
    page.clock.run_for(2_000)  # Stop's wait for the cancel
    page.wait_for_selector("#send:not([hidden])", timeout=10_000)
    page.clock.run_for(50_000)
    page.wait_for_timeout(500)
    assert failed == []  # still waiting for the id
    page.clock.run_for(10_000)
    deadline = time.monotonic() + 10
    while not failed:
        assert time.monotonic() < deadline
        page.wait_for_timeout(50)
    assert failed[0].endswith("/v1/responses")
    cancel_left_running(api, response_id)


def two_tabs(session, text: str):
    """Tab A sends `text` in a new conversation, then tab B opens it: (a, b, "#conv_...")."""
    context, _ = session
    a = context.new_page()
    a.goto("/")
    a.wait_for_selector("body[data-ready=true]")
    send(a, text)
    conversation = a.evaluate("location.hash")
    b = context.new_page()
    b.goto(f"/{conversation}")
    b.wait_for_function("() => document.querySelectorAll('#messages .turn').length > 0")
    return a, b, conversation


def test_two_tabs_on_one_conversation_keep_each_others_branches_and_title(session, api):
    """Tab A saves after tab B branched and renamed: B's branch and title stay."""
    a, b, conversation = two_tabs(session, "First tab, first message.")
    before = finished_turns(b)
    b.locator("#messages .turn").last.get_by_role("button", name="Regenerate answer").click()
    wait_for_turn(b, before)
    b.get_by_role("button", name=re.compile("^Rename ")).first.click()
    b.fill(".rename-input", "Renamed in tab B")
    b.press(".rename-input", "Enter")
    b.get_by_role("button", name="Renamed in tab B", exact=True).wait_for()
    send(a, "First tab, second message.")
    assert a.inner_text("#chat-title") == "Renamed in tab B"  # tab A took B's title
    c = session[0].new_page()
    c.goto(f"/{conversation}")
    c.wait_for_function("() => document.querySelectorAll('#messages .turn').length > 0")
    assert c.inner_text("#chat-title") == "Renamed in tab B"
    metadata = api.get(f"/v1/conversations/{conversation[1:]}").json()["metadata"]
    leaves = " ".join(v for k, v in metadata.items() if k.startswith("leaves")).split()
    assert len(leaves) == 2  # tab B's regenerated answer, and tab A's second turn


def test_a_save_racing_another_tabs_save_keeps_both_changes(session, page, api):
    """Another tab writes between this tab's read and write of the metadata: the write is
    refused (412), and the page reads and merges again instead of overwriting it."""
    _, console = session
    console.expected.append(r"412 .*@ .*/v1/conversations/conv_")  # the refused write
    send(page, "Racing saves.")
    conversation = page.evaluate("location.hash")[1:]
    path = f"/v1/conversations/{conversation}"
    raced = []

    def other_tab_first(route, request):
        if request.method == "POST" and not raced:
            metadata = api.get(path).json()["metadata"]
            raced.append(api.post(path, json={"metadata": {**metadata, "sys0": "Be brief."}}))
        route.continue_()

    page.route(f"**{path}", other_tab_first)
    entry = page.locator(f"#conversation-list li[data-id={conversation}]")
    entry.get_by_role("button", name="Rename").click()
    page.fill("#conversation-list .rename-input", "Renamed here")
    page.press("#conversation-list .rename-input", "Enter")
    page.wait_for_function("() => !document.body.dataset.saving")
    assert raced and raced[0].status_code == 200
    stored = api.get(path).json()["metadata"]
    assert (stored["title"], stored.get("sys0")) == ("Renamed here", "Be brief.")


def deleted_elsewhere(session, api, text: str):
    """A page with one turn of `text` in a conversation deleted since through the API (as
    another tab would); returns the page and the conversation's id."""
    context, console = session
    console.expected.append(r"404 .*@ .*/v1/conversations/conv_")  # the page's reads
    page = context.new_page()
    page.goto("/")
    page.wait_for_selector("body[data-ready=true]")
    send(page, text)
    conversation = page.evaluate("location.hash")[1:]
    assert api.delete(f"/v1/conversations/{conversation}").status_code == 200
    return page, conversation


def test_a_conversation_deleted_in_another_tab_keeps_the_message_typed(session, api):
    page, _ = deleted_elsewhere(session, api, "Soon deleted elsewhere.")
    send(page, "Still there?")
    assert "deleted in another tab" in page.inner_text("#status")
    assert page.input_value("#prompt") == "Still there?"
    assert page.inner_text("#chat-title") == "New chat"


def test_a_conversation_deleted_elsewhere_leaves_the_sidebar_at_the_next_save(session, api):
    page, conversation = deleted_elsewhere(session, api, "Then deleted elsewhere.")
    entry = page.locator(f"#conversation-list li[data-id={conversation}]")
    entry.get_by_role("button", name="Rename").click()
    page.fill("#conversation-list .rename-input", "Too late")
    page.press("#conversation-list .rename-input", "Enter")
    page.wait_for_function("() => !document.body.dataset.saving")
    assert "deleted in another tab" in page.inner_text("#status")
    assert entry.count() == 0 and page.inner_text("#chat-title") == "New chat"


def test_a_refused_first_message_leaves_no_empty_conversation(session, api):
    context, console = session
    console.expected.append(r"400 .*@ .*/v1/responses$")  # longer than the context window
    page = context.new_page()
    page.goto("/")
    page.wait_for_selector("body[data-ready=true]")

    def conversations() -> set[str]:
        return {c["id"] for c in api.get("/v1/conversations?limit=100").json()["data"]}

    known = conversations()
    before = finished_turns(page)
    page.fill("#prompt", "hello " * 9000)
    page.press("#prompt", "Enter")
    wait_for_turn(page, before)
    assert "context" in page.inner_text("#status")
    assert page.input_value("#prompt").startswith("hello hello")
    assert conversations() == known and page.inner_text("#chat-title") == "New chat"
    assert "#" not in page.url


def test_a_server_out_of_reach_is_said_plainly_and_the_message_kept(session, api):
    context, console = session
    console.expected.append(r"net::ERR_FAILED")  # the browser's own line for the failed fetch
    page = context.new_page()
    page.goto("/")
    page.wait_for_selector("body[data-ready=true]")
    page.route("**/v1/responses", lambda route: route.abort())  # fetch fails: no server
    page.fill("#prompt", "anyone there?")
    page.press("#prompt", "Enter")
    deadline = time.monotonic() + 10
    while "cannot reach the server" not in page.inner_text("#status"):
        assert time.monotonic() < deadline, page.inner_text("#status")
        time.sleep(0.05)
    assert "TypeError" not in page.inner_text("#status")
    assert page.input_value("#prompt") == "anyone there?"
    # With no network at all the page says so, rather than blame the server.
    console.expected.append(r"net::ERR_INTERNET_DISCONNECTED")
    context.set_offline(True)
    page.press("#prompt", "Enter")
    page.wait_for_function(
        "() => document.querySelector('#status').textContent.includes('offline')"
    )
    assert page.inner_text("#status") == "Error: this device is offline; reconnect, then try again"
    assert page.input_value("#prompt") == "anyone there?"
    context.set_offline(False)
    # A server refusing it for now (overloaded: a 429 with Retry-After) says when to try
    # again; the message read "...; retry later" alone, the header's 30 s unsaid.
    console.expected.append(r"429 .*@ .*/v1/responses$")
    page.unroute("**/v1/responses")
    refusal = {
        "message": "too many requests are waiting; retry later",
        "type": "invalid_request_error",
    }
    page.route(
        "**/v1/responses",
        lambda route: route.fulfill(
            status=429,
            headers={"Retry-After": "30"},
            json={"error": {**refusal, "param": None, "code": "rate_limit_exceeded"}},
        ),
    )
    page.press("#prompt", "Enter")
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('retry')")
    assert page.inner_text("#status") == (
        "Error: too many requests are waiting; retry later (try again in 30 s)"
    )
    assert page.input_value("#prompt") == "anyone there?"
    # A first file the server refuses (too large) leaves no empty conversation named after
    # it, nor its empty vector store, as a refused first message leaves none.
    console.expected.append(r"413 .*@ .*/v1/files$")
    too_large = "the file is larger than this server accepts (1048576 bytes)"
    page.route(
        "**/v1/files",
        lambda route: route.fulfill(
            status=413,
            json={"error": {"message": too_large, "type": "invalid_request_error"}},
        ),
    )
    stores = {s["id"] for s in api.get("/v1/vector_stores?limit=100").json()["data"]}
    known = {c["id"] for c in api.get("/v1/conversations?limit=100").json()["data"]}
    page.set_input_files(
        "#upload", files=[{"name": "big.txt", "mimeType": "text/plain", "buffer": b"x"}]
    )
    page.wait_for_selector("#attachments .attachment.failed:has-text('big.txt')")
    page.wait_for_function("() => document.querySelector('#chat-title').textContent === 'New chat'")
    assert page.inner_text("#status") == f"Error: {too_large}"
    assert {c["id"] for c in api.get("/v1/conversations?limit=100").json()["data"]} == known
    assert {s["id"] for s in api.get("/v1/vector_stores?limit=100").json()["data"]} == stores
    assert "#" not in page.url
    # Its failed chip can be taken away (it stayed, with no ×, until another chat opened).
    page.get_by_role("button", name="Remove big.txt").click()
    assert page.locator("#attachments .attachment").count() == 0
    assert page.evaluate("document.activeElement.id") == "prompt"
    # Nor does a first file the server takes but cannot index (it has no text): it is
    # deleted, with its store and the conversation (which stayed, holding the failed file).
    page.unroute("**/v1/files")
    files = {f["id"] for f in api.get("/v1/files?limit=100").json()["data"]}
    page.set_input_files(
        "#upload", files=[{"name": "blank.txt", "mimeType": "text/plain", "buffer": b""}]
    )
    page.wait_for_selector("#attachments .attachment.failed:has-text('blank.txt')")
    page.wait_for_function("() => document.querySelector('#chat-title').textContent === 'New chat'")
    assert page.inner_text("#status") == "blank.txt: 'blank.txt' has no text to index"
    assert {c["id"] for c in api.get("/v1/conversations?limit=100").json()["data"]} == known
    assert {s["id"] for s in api.get("/v1/vector_stores?limit=100").json()["data"]} == stores
    assert {f["id"] for f in api.get("/v1/files?limit=100").json()["data"]} == files
    page.get_by_role("button", name="Remove blank.txt").click()
    assert page.locator("#attachments .attachment").count() == 0
    # A file attached next clears the failure's words (they stayed beside its ready chip).
    attach(page, "notes.txt")
    assert page.inner_text("#status") == ""


def test_a_link_to_another_conversation_followed_in_the_tab_opens_it(page):
    """The address names the conversation on screen: a link to another one pasted into the
    tab changes the address's #conv_… alone (nothing reloads) and opens that one; one that
    does not exist is said so, and the address names the open one again."""
    send(page, "Name a lake.")
    lake = page.evaluate("location.hash")
    page.click("#new-chat")
    send(page, "Name a desert.")
    page.goto(f"/{lake}")
    title = "() => document.querySelector('#chat-title').textContent"
    page.wait_for_function(f"{title} === 'Name a lake.'")
    assert "Name a desert." not in page.inner_text("#messages")
    assert finished_turns(page) == 2  # the same document: the page was not loaded again
    page.goto("/#conv_0000")
    page.wait_for_function("() => document.querySelector('#status').textContent !== ''")
    assert "no longer exists" in page.inner_text("#status")
    assert page.evaluate("location.hash") == lake
    assert page.inner_text("#chat-title") == "Name a lake."


def test_a_turn_reloaded_away_from_before_it_ends_is_still_there(page, api):
    start_long_answer(page)
    page.wait_for_function(
        "() => [...document.querySelectorAll('#messages .turn')]"
        ".some(t => (t.dataset.responseId || '').startsWith('resp_'))"
    )
    [response_id] = turns(page)
    conversation_id = page.locator("#conversation-list li").first.get_attribute("data-id")
    deadline = time.monotonic() + 10  # the page stores the turn's id as the stream starts
    while response_id not in api.get(f"/v1/conversations/{conversation_id}").text:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert page.locator("#stop").is_visible()  # stored while the answer still streams
    assert page.url.endswith(f"#{conversation_id}")  # the open conversation is in the address
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    # the reload opens it again by itself, with the turn as far as the server recorded it
    page.wait_for_function("() => document.querySelectorAll('#messages .turn').length > 0")
    assert turns(page) == [response_id]
    page.click("#new-chat")
    assert "#" not in page.url
    cancel_left_running(api, response_id)


def words(text: str) -> list[str]:
    """The words of `text`, as they read in raw Markdown and drawn alike."""
    return re.findall(r"[^\W\d_]{2,}", text)


# Answers followed to their end after a reload: long enough to outlast it, no longer, as
# the tests wait for them. The reload takes the time of a few tokens (a quarter of a second
# on a quiet machine), while the server generates the 28 tokens left after the first words
# for a few seconds; an answer that ended first fails reload_mid_answer rather than pass
# unfollowed.
FOLLOWED_TOKENS = 32
# The answer polled every 1.5 s runs longer, for the pauses between its reads to be seen.
POLLED_TOKENS = 64


def reload_mid_answer(page, tokens: int = FOLLOWED_TOKENS) -> str:
    """Starts an answer of `tokens`, reloads the page while the server still generates it
    and returns its id, once the page follows it as a live turn."""
    start_long_answer(page, tokens)
    wait_for_answer_text(page)
    [response_id] = turns(page)
    reload_when_saved(page)
    assert page.locator("#stop").is_visible(), "the answer ended before the reload"
    return response_id


def assert_shown_whole(page, api, response_id: str) -> None:
    """The page ended the turn (data-turns) showing the answer as the server stored it."""
    wait_for_turn(page, 0)  # the reload starts the count again
    stored = api.get(f"/v1/responses/{response_id}").json()
    assert stored["status"] in ("completed", "incomplete")
    answer = page.inner_text("#messages .turn .assistant-body")
    assert words(answer) == words(stored["output"][0]["content"][0]["text"])
    assert "Interrupted" not in page.inner_text("#messages")
    assert page.locator("#send").is_visible() and page.get_attribute(".turn", "aria-busy") is None


def test_a_turn_reloaded_mid_answer_streams_on_to_its_end(page, api):
    """A reload while the answer streams: the page follows the response the server still
    generates (GET /v1/responses/{id}?stream=true, from its start), as a live turn, to its
    end, and writes its transcript."""
    response_id = reload_mid_answer(page)
    assert page.get_attribute(".turn", "aria-busy") == "true"  # followed, not shown as finished
    assert_shown_whole(page, api, response_id)
    conversation = page.evaluate("location.hash")[1:]
    items = api.get(f"/v1/conversations/{conversation}/items?order=asc").json()["data"]
    assert [i["role"] for i in items] == ["user", "assistant"]


def test_stop_cancels_a_turn_followed_after_a_reload(page, api):
    response_id = reload_mid_answer(page)
    page.click("#stop")
    page.wait_for_selector("#send:not([hidden])")
    assert page.locator("#messages").get_by_text("Stopped.").is_visible()
    assert api.get(f"/v1/responses/{response_id}").json()["status"] == "cancelled"


# A read of a response as the page makes it (GET, with the file_search results included).
READ_RESPONSE = r"/v1/responses/resp_\w+\?include(\[\]|%5B%5D)=file_search_call\.results$"


def test_a_turn_whose_events_are_gone_is_polled_to_its_end(session, page, api):
    """A server that no longer has the response's events (restarted, or another server
    runs it) refuses to stream it again (400 naming `stream`): the page reads the response
    until it ends, every 1.5 s (its shipped FOLLOW_MS, which this test keeps)."""
    refused: list[str] = []
    reads: list[float] = []  # when the page read the response, in the browser's ms

    def on_read(request) -> None:
        if re.search(READ_RESPONSE, request.url):
            reads.append(request.timing["startTime"])

    def gone(route) -> None:
        refused.append(route.request.url)
        error = {"message": "the events of this response are no longer kept"}
        error |= {"type": "invalid_request_error", "param": "stream", "code": None}
        route.fulfill(status=400, json={"error": error})

    page.route("**/v1/responses/resp_*?stream=true*", gone)
    session[1].expected.append(r"400 .*@ .*/v1/responses/resp_\w+\?stream=true")
    response_id = reload_mid_answer(page, POLLED_TOKENS)
    page.on("requestfinished", on_read)
    assert_shown_whole(page, api, response_id)
    assert refused and reads
    assert all(b - a >= 1_450 for a, b in pairwise(reads)), reads


# The pauses of the page's test hooks (localStorage "tokenmill.followMs", before a followed
# response is read again, and "tokenmill.retryMs", before a refused write is sent again), for
# the tests that only wait them out (the page's own are 1.5 s and 1 s).
SHORT_PAUSE_MS = 100


@pytest.mark.parametrize("status", [503, 429])
def test_a_followed_turn_refused_for_now_is_followed_again(session, page, api, status):
    """While the page follows an answer after a reload, the server refuses its stream, then
    the read that follows, for now (503: draining or overloaded; 429): the page tries
    again after a pause, as after a lost connection, and follows the answer to its end."""
    refused: list[str] = []

    def refuse_once(route) -> None:
        kind = "stream" if "stream=true" in route.request.url else "read"
        order = ["stream", "read"][: len(refused) + 1]  # the reads opening the turn pass
        if route.request.method != "GET" or kind in refused or kind not in order:
            route.fallback()
            return
        refused.append(kind)
        error = {"message": "not now", "type": "server_error", "param": None, "code": None}
        route.fulfill(status=status, json={"error": error})

    page.route(re.compile(rf"{READ_RESPONSE}|/v1/responses/resp_\w+\?stream=true"), refuse_once)
    session[1].expected.append(rf"{status} .*@ .*/v1/responses/resp_\w+")
    page.add_init_script(f"localStorage.setItem('tokenmill.followMs', '{SHORT_PAUSE_MS}')")
    response_id = reload_mid_answer(page)
    assert_shown_whole(page, api, response_id)
    assert refused == ["stream", "read"]


def test_a_stream_closed_mid_answer_is_taken_up_again(page, api):
    """The turn's stream ends before the response does (a lost connection, a proxy's cut):
    the page streams the rest from the last event it has, rather than end the turn."""
    after: list[int] = []

    def cut_short(route) -> None:
        if route.request.method != "POST":
            route.fallback()
            return
        body = ""
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
        with api.stream(
            "POST", "/v1/responses", content=route.request.post_data, headers=headers
        ) as streamed:
            for line in streamed.iter_lines():
                body += line + "\n"
                if line.startswith("data:") and "output_text.delta" in line:
                    after.append(json.loads(line[5:])["sequence_number"])
                    if len(after) == 4:
                        break
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body + "\n")

    page.route("**/v1/responses", cut_short)
    followed: list[str] = []
    page.on("request", lambda r: followed.append(r.url) if "stream=true" in r.url else None)
    before = finished_turns(page)
    start_long_answer(page, 18)  # four deltas streamed, the 14 tokens left taken up
    wait_for_turn(page, before)
    [response_id] = turns(page)
    assert any(url.endswith(f"starting_after={after[-1]}") for url in followed), followed
    stored = api.get(f"/v1/responses/{response_id}").json()
    answer = page.inner_text("#messages .turn .assistant-body")
    assert words(answer) == words(stored["output"][0]["content"][0]["text"])
    assert "Interrupted" not in page.inner_text("#messages")


def test_branches_from_regenerate_and_edit_survive_a_reload(page):
    if TAKE_SCREENSHOT:  # docs/web.md's picture shows whole answers, not the tests' few words
        set_output_tokens(page, 40)
    send(page, "What is the capital of France?")
    send(page, "And of Spain?")
    first, second = turns(page)
    # Regenerate the second answer: a sibling of the second turn.
    before = finished_turns(page)
    page.locator("#messages .turn").nth(1).get_by_role("button", name="Regenerate answer").click()
    wait_for_turn(page, before)
    first_again, regenerated = turns(page)
    assert first_again == first and regenerated != second
    assert page.locator("#messages .turn").nth(1).locator(".branch-position").inner_text() == "2/2"
    if TAKE_SCREENSHOT:
        page.screenshot(path=str(SCREENSHOT))
    # Edit the first message: a sibling of the first turn, with no second turn yet.
    page.locator("#messages .turn").nth(0).get_by_role("button", name="Edit message").click()
    page.fill("#messages textarea", "What is the capital of Italy?")
    before = finished_turns(page)
    page.press("#messages textarea", "Enter")
    wait_for_turn(page, before)
    [edited] = turns(page)
    assert edited not in (first, second, regenerated)
    assert "Italy" in page.inner_text("#messages .bubble.user")
    assert page.inner_text("#messages .branch-position") == "2/2"
    # The tree comes back after a reload, on the branch last shown.
    reload_when_saved(page)
    open_conversation(page, "What is the capital of France?")
    assert turns(page) == [edited]
    page.get_by_role("button", name="Previous branch").click()
    assert turns(page) == [first, regenerated]
    assert page.locator("#messages .turn").nth(1).locator(".branch-position").inner_text() == "2/2"
    page.locator("#messages .turn").nth(1).get_by_role("button", name="Previous branch").click()
    assert turns(page) == [first, second]
    reload_when_saved(page)
    open_conversation(page, "What is the capital of France?")
    assert turns(page) == [first, second]


def test_a_rename_and_a_branch_switch_saved_at_once_both_stick(page, api):
    """Clicking a branch arrow with a rename field open saves both (the field's blur and
    the switch): the saves run one after another, so neither writes the other's old value."""
    send(page, "What is the capital of Japan?")
    before = finished_turns(page)
    page.get_by_role("button", name="Regenerate answer").click()
    wait_for_turn(page, before)
    conversation_id = page.url.rsplit("#", 1)[1]
    first, regenerated = (
        api.get(f"/v1/conversations/{conversation_id}").json()["metadata"]["leaves0"].split()
    )
    assert turns(page) == [regenerated]
    page.locator(f"#conversation-list li[data-id={conversation_id}]").get_by_role(
        "button", name="Rename"
    ).click()
    page.fill("#conversation-list .rename-input", "Capitals")
    page.get_by_role("button", name="Previous branch").click()
    assert turns(page) == [first]
    reload_when_saved(page)
    stored = api.get(f"/v1/conversations/{conversation_id}").json()["metadata"]
    assert (stored["title"], stored["leaf"]) == ("Capitals", first)
    assert page.inner_text("#chat-title") == "Capitals" and turns(page) == [first]


def test_one_turn_at_a_time(page, api):
    """A double click on Regenerate starts one answer, not two (the second would run on
    with no Stop button for it)."""
    send(page, "Hi!")
    before = finished_turns(page)
    page.get_by_role("button", name="Regenerate answer").dblclick()
    wait_for_turn(page, before)
    assert page.inner_text("#messages .branch-position") == "2/2"
    page.wait_for_function("() => !document.body.dataset.saving")
    conversation_id = page.url.rsplit("#", 1)[1]
    stored = api.get(f"/v1/conversations/{conversation_id}").json()["metadata"]
    assert len(stored["leaves0"].split()) == 2
    assert finished_turns(page) == before + 1


def test_a_file_attached_and_a_message_sent_at_once_make_one_conversation(page, api):
    """In a new chat, an upload and a message sent before the chat's creation answered share
    the one conversation (it was two: the file in one, the turn in the other)."""
    known = {c["id"] for c in api.get("/v1/conversations").json()["data"]}
    before = finished_turns(page)
    page.evaluate("""() => {
        const files = new DataTransfer();
        files.items.add(new File(["Our office cat is named Whiskers."], "cat.txt"));
        const upload = document.getElementById('upload');
        upload.files = files.files;
        upload.dispatchEvent(new Event('change'));
        document.getElementById('prompt').value = 'What is the cat called?';
        document.getElementById('composer').requestSubmit();
    }""")
    wait_for_turn(page, before)
    page.wait_for_selector("#attachments .attachment.completed", timeout=60_000)
    page.wait_for_function("() => !document.body.dataset.saving")
    [new] = [c for c in api.get("/v1/conversations").json()["data"] if c["id"] not in known]
    assert new["metadata"]["vs"] and new["metadata"]["leaf"] == turns(page)[0]
    assert page.url.endswith(f"#{new['id']}")


def test_two_tabs_attaching_files_keep_both_in_the_conversations_store(session, api):
    """A tab that had the conversation open before another attached a file makes no store
    of its own over the other's: both files stay in the one store the conversation names
    (the second store replaced the first in the metadata, and its file dropped out)."""
    a, b, conversation = two_tabs(session, "Two tabs, two files.")
    for tab, name in ((a, "first.txt"), (b, "second.txt")):
        tab.set_input_files(
            "#upload", files=[{"name": name, "mimeType": "text/plain", "buffer": b"Some text.\n"}]
        )
        tab.wait_for_selector("#attachments .attachment.completed", timeout=60_000)
        tab.wait_for_function("() => !document.body.dataset.saving")
    store = api.get(f"/v1/conversations/{conversation[1:]}").json()["metadata"]["vs"]
    files = api.get(f"/v1/vector_stores/{store}/files").json()["data"]
    names = {api.get(f"/v1/files/{f['id']}").json()["filename"] for f in files}
    assert names == {"first.txt", "second.txt"}
    stores = api.get("/v1/vector_stores", params={"limit": 100}).json()["data"]
    assert [s["id"] for s in stores if s["name"] == f"chat {conversation[1:]}"] == [store]


def test_an_opening_still_loading_gives_way_to_a_later_click(page):
    """Clicking a conversation, then New chat before it has loaded, ends on the new chat:
    the slower load does not take the screen back (a message would go to the wrong chat)."""
    send(page, "Name a fruit.")
    title = page.inner_text("#chat-title")
    page.click("#new-chat")
    held = []
    page.route("**/v1/responses/**", lambda route: held.append(route))  # its turns, held back
    page.get_by_role("button", name=title, exact=True).click()
    page.wait_for_function("() => document.querySelector('#status').textContent === 'Loading…'")
    page.click("#new-chat")
    page.wait_for_timeout(100)  # lets the route handler see the held requests
    for route in held:
        route.continue_()
    page.unroute("**/v1/responses/**")
    page.wait_for_function("() => document.querySelector('#status').textContent !== 'Loading…'")
    page.wait_for_timeout(300)
    assert held and page.inner_text("#chat-title") == "New chat" and turns(page) == []
    assert "#" not in page.url


def test_keyboard_focus_stays_on_the_branch_arrows(page):
    send(page, "Hi!")
    before = finished_turns(page)
    page.get_by_role("button", name="Regenerate answer").click()
    wait_for_turn(page, before)
    page.get_by_role("button", name="Previous branch").focus()
    page.keyboard.press("Enter")  # to 1/2: the arrows are drawn again, "previous" disabled
    assert page.inner_text("#messages .branch-position") == "1/2"
    focused = "document.activeElement.getAttribute('aria-label')"
    assert page.evaluate(focused) == "Next branch"
    page.keyboard.press("Enter")
    assert page.inner_text("#messages .branch-position") == "2/2"
    assert page.evaluate(focused) == "Previous branch"
    # An edit's Cancel, pressed from the keyboard, leaves the keyboard in the message box,
    # as Escape does (it was left on the page's body, the Cancel button gone).
    page.get_by_role("button", name="Edit message").focus()
    page.keyboard.press("Enter")
    assert page.evaluate(focused) == "Edited message"
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    assert page.locator("#messages textarea").count() == 0
    assert page.evaluate("document.activeElement.id") == "prompt"


def test_the_keyboard_is_in_the_message_box_when_a_chat_comes_on_screen(page):
    """On a desktop screen the page loads, and a conversation opens from the sidebar or the
    address, with the keyboard in the message box; a control the user went to while the
    conversation loaded keeps it."""
    active = "document.activeElement.id"
    assert page.evaluate(active) == "prompt"
    send(page, "Name a canyon.")
    canyon = page.evaluate("location.hash")
    page.click("#new-chat")
    open_conversation(page, "Name a canyon.")
    assert page.evaluate(active) == "prompt"
    page.click("#new-chat")
    page.focus("#search")
    page.goto(f"/{canyon}")
    page.wait_for_function("() => document.activeElement.id === 'prompt'")
    reload_when_saved(page)
    assert page.evaluate(active) == "prompt"
    page.click("#new-chat")
    held = []
    page.route("**/v1/responses/**", lambda route: held.append(route))  # its turns, held back
    page.get_by_role("button", name="Name a canyon.", exact=True).click()
    page.wait_for_function("() => document.querySelector('#status').textContent === 'Loading…'")
    page.focus("#search")
    page.wait_for_timeout(100)  # lets the route handler see the held requests
    for route in held:
        route.continue_()
    page.unroute("**/v1/responses/**")
    page.wait_for_function("() => document.querySelectorAll('#messages .turn').length > 0")
    assert page.evaluate(active) == "search"


def test_keyboard_focus_stays_in_the_sidebar_while_it_is_redrawn(page):
    """A turn's save redraws the sidebar in the background: the keyboard stays on the
    sidebar control it was on (it fell to the page, then to the prompt as the answer ended)."""
    send(page, "Name a mountain range.")
    held = []
    page.route("**/v1/responses", lambda route: held.append(route))  # the next turn, held
    before = finished_turns(page)
    page.fill("#prompt", "Name a river.")
    page.press("#prompt", "Enter")
    while not held:
        page.wait_for_timeout(50)
    page.get_by_role("button", name="Rename Name a mountain range.").focus()
    held[0].continue_()
    page.unroute("**/v1/responses")
    wait_for_turn(page, before)
    focused = "document.activeElement.getAttribute('aria-label')"
    assert page.evaluate(focused) == "Rename Name a mountain range."


def test_a_skip_link_comes_first_and_leads_to_the_message_box(page):
    """The "Skip to message box" link is the first stop of the keyboard, off screen until
    focused; it puts the keyboard in the message box (and leaves the address, which names
    conversations, as it was)."""
    link = page.get_by_role("link", name="Skip to message box")
    hidden = link.bounding_box()
    assert hidden["y"] + hidden["height"] <= 0
    page.focus("#new-chat")  # the first control after it
    page.keyboard.press("Shift+Tab")
    assert page.evaluate("document.activeElement.id") == "skip-link"
    assert link.bounding_box()["y"] >= 0
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "prompt"
    assert "#" not in page.url
    # The box grows with a message of several lines (it stayed two lines tall, the rest
    # scrolled out of sight), up to 40% of the window, and shrinks back once emptied.
    empty = page.locator("#prompt").bounding_box()["height"]
    sizes = "t => [t.scrollHeight, t.clientHeight, innerHeight]"
    page.keyboard.type("one")
    for line in ("two", "three", "four", "five", "six"):
        page.keyboard.press("Shift+Enter")
        page.keyboard.type(line)
    content, shown, _ = page.locator("#prompt").evaluate(sizes)
    assert content <= shown + 1 and shown > 1.5 * empty
    page.fill("#prompt", "line\n" * 80)
    content, shown, window = page.locator("#prompt").evaluate(sizes)
    assert content > shown and page.locator("#prompt").bounding_box()["height"] <= 0.4 * window + 1
    page.fill("#prompt", "")
    assert page.locator("#prompt").bounding_box()["height"] == empty
    # "Attach file" is one button to a screen reader, the one the keyboard reaches (the
    # focusable label had no role; the hidden file field it stands for was the button).
    attach_button = page.get_by_role("button", name="Attach file")
    assert attach_button.evaluate("b => b.id") == "upload-label"


def test_settings_take_any_temperature_and_bound_the_output_tokens(page, api):
    [model] = [m for m in api.get("/v1/models").json()["data"] if m["id"] == MODEL]
    page.click("#open-settings")
    page.fill("#temperature", "0.15")
    page.fill("#max-output-tokens", str(model["max_model_len"]))  # no room left for a prompt
    page.click("#settings-save")
    assert page.locator("#settings").is_visible()  # refused in the dialog
    assert page.evaluate("document.getElementById('max-output-tokens').validity.rangeOverflow")
    assert page.evaluate("document.getElementById('temperature').validity.valid")
    page.fill("#max-output-tokens", "12")
    page.click("#settings-save")
    assert not page.locator("#settings").is_visible()


def test_a_new_chat_on_a_small_window_leaves_room_for_the_prompt(session):
    """With no saved settings, the output tokens default to a quarter of a window of 1024
    (1024 of it would leave no room for a prompt: every message refused; half of it, no
    room for the last answer beside the next message)."""
    context, _ = session
    page = context.new_page()
    page.add_init_script("localStorage.removeItem('tokenmill.defaults')")

    def small_window(route) -> None:
        models = route.fetch().json()
        for model in models["data"]:
            model["max_model_len"] = 1024
        route.fulfill(json=models)

    page.route("**/v1/models", small_window)
    page.goto("/")
    page.wait_for_selector("body[data-ready=true]")
    page.click("#open-settings")
    assert page.input_value("#max-output-tokens") == "256"


def test_rename_search_and_delete_conversations(page, api):
    send(page, "Tell me about zebras.")
    page.click("#new-chat")
    send(page, "Tell me about volcanoes.")
    send(page, "My favourite colour is turquoise.")
    page.locator("#conversation-list li", has_text="Tell me about zebras.").get_by_role(
        "button", name="Rename"
    ).click()
    page.fill("#conversation-list .rename-input", "Safari notes")
    page.press("#conversation-list .rename-input", "Enter")
    page.wait_for_selector("#conversation-list button:text-is('Safari notes')")
    titles = [c["metadata"]["title"] for c in api.get("/v1/conversations").json()["data"]]
    assert "Safari notes" in titles and "Tell me about zebras." not in titles

    def listed() -> list[str]:
        return page.eval_on_selector_all(
            "#conversation-list .conversation-title", "els => els.map(e => e.textContent)"
        )

    page.fill("#search", "safari")
    page.wait_for_function("() => document.querySelectorAll('.conversation-title').length === 1")
    assert listed() == ["Safari notes"]
    page.fill("#search", "turquoise")  # only in the second message of a conversation
    page.wait_for_function(
        "() => [...document.querySelectorAll('.conversation-title')]"
        ".map(e => e.textContent).join() === 'Tell me about volcanoes.'"
    )
    page.fill("#search", "")
    entry = page.locator("#conversation-list li", has_text="Safari notes")
    conversation_id = entry.get_attribute("data-id")
    entry.get_by_role("button", name="Delete").click()
    page.click("#confirm-cancel")
    assert "Safari notes" in listed()
    entry.get_by_role("button", name="Delete").click()
    assert "Safari notes" in page.inner_text("#confirm-text")
    page.click("#confirm-ok")
    page.wait_for_function(
        "() => ![...document.querySelectorAll('.conversation-title')]"
        ".some(e => e.textContent === 'Safari notes')"
    )
    assert api.get(f"/v1/conversations/{conversation_id}").status_code == 404


def composing_key(page, selector: str, key: str) -> None:
    """Presses `key` in the field as an input method (Japanese, Chinese ...) does while it
    composes a word: Enter takes the word, Escape drops it. (Chromium's own IME events
    cannot be typed from Playwright: the keydown is made as the browser makes it.)"""
    page.locator(selector).evaluate(
        "(field, key) => field.dispatchEvent(new KeyboardEvent('keydown',"
        " {key, isComposing: true, bubbles: true, cancelable: true}))",
        key,
    )


def test_enter_and_escape_ending_an_input_methods_word_stay_in_the_field(page, api):
    """Enter or Escape that ends a word being composed belongs to the input method: a
    rename stays open (Enter saved half a title, Escape dropped it), an edit stays open,
    and an answer streaming goes on (Escape stopped it)."""
    send(page, "Tell me about otters.")
    entry = page.locator("#conversation-list li", has_text="Tell me about otters.")
    entry.get_by_role("button", name="Rename").click()
    field = "#conversation-list .rename-input"
    page.fill(field, "かわうそ")
    for key in ("Enter", "Escape"):
        composing_key(page, field, key)
        assert page.locator(field).input_value() == "かわうそ"
    page.press(field, "Enter")
    page.wait_for_selector("#conversation-list button:text-is('かわうそ')")
    page.get_by_role("button", name="Edit message").click()
    composing_key(page, "#messages textarea", "Escape")
    assert page.locator("#messages textarea").is_visible()
    page.press("#messages textarea", "Escape")
    start_long_answer(page)
    answer = "() => [...document.querySelectorAll('#messages .assistant-body')].at(-1)"
    page.wait_for_function(f"{answer}.textContent.length > 10")
    composing_key(page, "#prompt", "Escape")
    shown = page.evaluate(f"{answer}.textContent.length")
    page.wait_for_function(f"{answer}.textContent.length > {shown} + 40", timeout=15_000)
    page.press("#prompt", "Escape")
    page.wait_for_selector("#messages .turn:has-text('Stopped.')")


def test_the_sidebar_lists_the_conversation_last_continued_first(session, page, api):
    """Ordered by last activity, as in ChatGPT: a turn in an older conversation brings it
    above a newer one, live and after a reload in another tab."""
    send(page, "Tell me about otters.")
    into_the_next_second()  # each step below starts in a later second
    newer = api.post("/v1/conversations", json={"metadata": {"title": "Tell me about owls."}})
    into_the_next_second()
    reload_when_saved(page)
    open_conversation(page, "Tell me about otters.")

    def order(tab) -> list[str]:
        titles = tab.eval_on_selector_all(
            "#conversation-list .conversation-title", "els => els.map(e => e.textContent)"
        )
        return [t for t in titles if t in ("Tell me about otters.", "Tell me about owls.")]

    assert order(page) == ["Tell me about owls.", "Tell me about otters."]
    send(page, "And their dens?")
    page.wait_for_function("() => !document.body.dataset.saving")
    assert order(page) == ["Tell me about otters.", "Tell me about owls."]
    other = session[0].new_page()
    other.goto("/")
    other.wait_for_selector("body[data-ready=true]")
    assert order(other) == ["Tell me about otters.", "Tell me about owls."]
    api.delete(f"/v1/conversations/{newer.json()['id']}")


def test_the_browser_tab_is_titled_by_the_open_conversation(page):
    """The tab names the open conversation and follows its rename; a new chat's tab is
    the page's own name."""
    assert page.title() == "tokenmill chat"
    send(page, "Name a glacier.")
    assert page.title() == "Name a glacier. · tokenmill chat"
    page.get_by_role("button", name="Rename Name a glacier.").click()
    page.fill("#conversation-list .rename-input", "Ice notes")
    page.press("#conversation-list .rename-input", "Enter")
    page.wait_for_function("() => document.title === 'Ice notes · tokenmill chat'")
    page.click("#new-chat")
    assert page.title() == "tokenmill chat"
    open_conversation(page, "Ice notes")
    assert page.title() == "Ice notes · tokenmill chat"


def test_search_fetches_a_few_transcripts_at_a_time(session, api):
    """Search reads every conversation's items, at most 4 requests at once (held here by a
    route until released one by one); a match shows as its transcript arrives, and a
    newer search drops what the older one had still to fetch, fetching nothing twice."""
    for n in range(12):
        item = {"type": "message", "role": "user", "content": f"kumquat number {n}"}
        body = {"metadata": {"title": f"Pool {n}"}, "items": [item]}
        assert api.post("/v1/conversations", json=body).status_code == 200
    context, _ = session
    page = context.new_page()
    page.goto("/")
    page.wait_for_selector("body[data-ready=true]")
    listed = page.eval_on_selector_all("#conversation-list li", "els => els.map(e => e.dataset.id)")
    held, fetched = [], []

    def hold(route) -> None:
        held.append(route)
        fetched.append(route.request.url.split("/")[-2])

    page.route("**/v1/conversations/*/items?*", hold)

    def release_until(done) -> None:
        """Releases the held requests one at a time, checking the bound, until `done()`."""
        for _ in range(600):
            if done():
                return
            page.wait_for_timeout(50)  # lets the page send what it would send now
            assert len(held) <= 4, len(held)
            if held:
                held.pop(0).continue_()
        raise AssertionError(f"{len(fetched)} fetched, {shown()} shown")

    def shown() -> list[str]:
        return page.eval_on_selector_all(
            "#conversation-list .conversation-title", "els => els.map(e => e.textContent)"
        )

    page.fill("#search", "kumquat")
    release_until(lambda: len(shown()) > 0)
    assert len(fetched) < len(listed)  # shown before every transcript was read
    page.fill("#search", "")  # nothing more to fetch: the queue is dropped
    release_until(lambda: not held)
    page.wait_for_timeout(300)
    assert not held
    page.fill("#search", "pomelo")
    release_until(lambda: len(fetched) == len(listed) and not held)
    assert sorted(fetched) == sorted(listed)  # each fetched once
    page.wait_for_selector("#conversation-list li.empty")


def test_a_transcript_write_refused_while_the_server_drains_is_retried(session, api):
    """After a turn the page appends it to the conversation's items; a 503 (the server is
    shutting down) is not the answer's failure: the write is sent again until stored."""
    context, console = session
    console.expected.append(r"503 .*@ .*/v1/conversations/conv_\w+/items$")
    page = context.new_page()
    page.add_init_script(f"localStorage.setItem('tokenmill.retryMs', '{SHORT_PAUSE_MS}')")
    page.goto("/")
    page.wait_for_selector("body[data-ready=true]")
    writes: list[str] = []

    def drain_first(route) -> None:
        if route.request.method != "POST":
            route.fallback()
            return
        writes.append(route.request.url)
        if len(writes) > 1:
            route.fallback()
            return
        error = {"message": "the server is shutting down", "type": "server_error"}
        error |= {"param": None, "code": "server_shutting_down"}
        route.fulfill(status=503, json={"error": error})

    page.route("**/v1/conversations/*/items", drain_first)
    send(page, "Remember the word marmalade.")
    assert len(writes) == 2
    status = page.locator("#status")
    assert status.inner_text() == "" and "error" not in (status.get_attribute("class") or "")
    conversation = page.evaluate("location.hash")[1:]
    items = api.get(f"/v1/conversations/{conversation}/items?order=asc").json()["data"]
    assert items[0]["content"][0]["text"] == "Remember the word marmalade."
    assert [i["role"] for i in items] == ["user", "assistant"]  # stored once


def test_deleting_the_conversation_a_turn_streams_into_stops_it_quietly(page, api):
    start_long_answer(page)
    wait_for_answer_text(page)
    [response_id] = turns(page)
    entry = page.locator("#conversation-list li").first
    conversation_id = entry.get_attribute("data-id")
    before = finished_turns(page)
    entry.get_by_role("button", name="Delete").click()
    page.click("#confirm-ok")
    wait_for_turn(page, before)
    page.wait_for_selector("#send:not([hidden])")
    assert api.get(f"/v1/conversations/{conversation_id}").status_code == 404
    time.sleep(0.5)  # what the turn's end would have stored has had its time to fail
    assert page.inner_text("#status") == ""
    assert page.locator("#messages .turn").count() == 0
    deadline = time.monotonic() + 30  # the stream was closed: the response stopped early
    while (stored := api.get(f"/v1/responses/{response_id}").json())["status"] == "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert stored["usage"]["output_tokens"] < 400


def _conversation_of(api: httpx.Client, items: list[dict], title: str) -> str:
    """A conversation titled `title` whose one turn took `items` as its input, stored
    through the public API as the page stores its own turns."""
    [response_id] = _chain(api, [items])
    return _conversation_ending_at(api, response_id, title)


def _chain(api: httpx.Client, inputs: list) -> list[str]:
    """Stored responses, one per input, each following the one before (one-token answers)."""
    ids: list[str] = []
    for input_ in inputs:
        body = {"model": MODEL, "max_output_tokens": 1, "input": input_}
        if ids:
            body["previous_response_id"] = ids[-1]
        ids.append(api.post("/v1/responses", json=body).json()["id"])
    return ids


def _conversation_ending_at(api: httpx.Client, leaf: str, title: str) -> str:
    """A conversation titled `title` whose one branch ends at `leaf`, as the page keeps it."""
    metadata = {"title": title, "settings": SETTINGS, "leaf": leaf, "leaves0": leaf}
    return api.post("/v1/conversations", json={"metadata": metadata}).json()["id"]


def _stored_turn(api: httpx.Client, assistant_text: str, title: str) -> str:
    """A conversation whose one turn holds `assistant_text` as an earlier assistant
    message and a tool call with its result."""
    items = [
        {"role": "user", "content": "Show me."},
        {"role": "assistant", "content": assistant_text},
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": json.dumps({"city": EVIL}),
        },
        {"type": "function_call_output", "call_id": "call_1", "output": f"sunny {SCRIPT}"},
        {"role": "user", "content": "Thanks."},
    ]
    return _conversation_of(api, items, title)


def _signed_in_page(session, *expected_console: str):
    """A new page of the session, ready, with the console errors given expected."""
    context, console = session
    console.expected.extend(expected_console)
    page = context.new_page()
    page.goto("/")
    page.wait_for_selector("body[data-ready=true]")
    return page


def _open_loaded(page, title: str) -> None:
    """Clicks the conversation in the sidebar; returns once it has loaded (turns or not)."""
    page.get_by_role("button", name=title, exact=True).click()
    page.wait_for_function(
        "() => document.querySelector('#status').textContent !== 'Loading…'"
        " && document.querySelector('#messages .turn, #messages .deleted-turn')"
    )


DELETED_404 = r"404 .*@ .*/v1/responses/resp_"  # the page's reads of the deleted turns


def test_turns_around_a_deleted_turn_are_shown_with_a_marker(session, api):
    """A turn deleted through the API (`DELETE /v1/responses/{id}`) in the middle of a
    branch, as its first turn or as its last: the turns still stored are shown, with a
    marker where one is missing, and the conversation goes on from its leaf."""
    middle = _chain(api, ["Alpha one.", "Bravo two.", "Charlie three.", "Delta four."])
    first = _chain(api, ["Echo five.", "Foxtrot six.", "Golf seven."])
    last = _chain(api, ["Hotel eight.", "India nine."])
    _conversation_ending_at(api, middle[-1], "Deleted in the middle")
    _conversation_ending_at(api, first[-1], "Deleted first turn")
    _conversation_ending_at(api, last[-1], "Deleted last turn")
    for response_id in (middle[1], first[0], last[-1]):
        assert api.delete(f"/v1/responses/{response_id}").status_code == 200
    page = _signed_in_page(session, DELETED_404)

    _open_loaded(page, "Deleted in the middle")
    assert turns(page) == middle[2:]  # what follows the deleted turn, not nothing
    markers = page.locator("#messages .deleted-turn")
    assert markers.count() == 1
    assert markers.first.evaluate("m => m.closest('.turn').dataset.responseId") == middle[2]
    assert "deleted" in markers.first.inner_text()
    send(page, "Go on.")
    *kept, new = turns(page)
    assert kept == middle[2:]
    assert api.get(f"/v1/responses/{new}").json()["previous_response_id"] == middle[-1]
    # The tree as stored after that turn comes back the same.
    reload_when_saved(page)
    page.wait_for_function("() => document.querySelectorAll('#messages .turn').length > 0")
    assert turns(page) == [*middle[2:], new]

    _open_loaded(page, "Deleted first turn")
    assert turns(page) == first[1:]
    assert page.locator("#messages .turn").first.locator(".deleted-turn").count() == 1

    _open_loaded(page, "Deleted last turn")
    assert turns(page) == []
    assert "last turn was deleted" in page.inner_text("#messages .deleted-turn")


def test_a_branch_whose_last_turn_was_deleted_goes_on_from_the_turn_before(session, api):
    """The page keeps each leaf with its parent's id ("leaf>parent" in `leaves*`): a leaf
    deleted through the API no longer takes its branch with it. The branch is shown up to
    the turn before, which the page shows in place of the deleted leaf on screen, and a
    message goes on from there."""
    page = _signed_in_page(session, DELETED_404)
    send(page, "One.")
    send(page, "Two.")
    first, last = turns(page)
    page.wait_for_function("() => !document.body.dataset.saving")
    conversation = page.evaluate("location.hash")[1:]
    stored = api.get(f"/v1/conversations/{conversation}").json()["metadata"]
    assert (stored["leaves0"], stored["leaf"]) == (f"{last}>{first}", last)
    assert api.delete(f"/v1/responses/{last}").status_code == 200
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    page.wait_for_function("() => document.querySelectorAll('#messages .turn').length > 0")
    assert turns(page) == [first]
    assert page.locator("#messages .deleted-turn").count() == 0
    send(page, "Three.")
    assert turns(page)[0] == first
    assert api.get(f"/v1/responses/{turns(page)[1]}").json()["previous_response_id"] == first


def stored_metadata(api: httpx.Client, conversation: str) -> str:
    """The conversation's metadata, all its values in one string."""
    return " ".join(api.get(f"/v1/conversations/{conversation}").json()["metadata"].values())


def test_deleted_leaves_leave_the_stored_metadata(session, api):
    """Leaves deleted through the API are written out of the conversation's metadata when
    the page finds them gone, so they no longer take its limited room (eight values of 512
    characters): a deleted leaf's branch is kept from its parent, on screen after another
    reload as it was, and a branch that has nothing left to follow is dropped."""
    first, shown = _chain(api, ["Lima eleven.", "Mike twelve."])
    into_the_next_second()  # the sibling is newer, shown by default
    [newer] = _chain(api, ["Lima eleven, again."])
    [lost_parent, lost] = _chain(api, ["November thirteen.", "Oscar fourteen."])
    leaves = f"{newer} {lost}>{lost_parent} {shown}>{first}"
    metadata = {"title": "Deleted leaves", "settings": SETTINGS, "leaf": shown, "leaves0": leaves}
    conversation = api.post("/v1/conversations", json={"metadata": metadata}).json()["id"]
    for response_id in (shown, lost, lost_parent):
        assert api.delete(f"/v1/responses/{response_id}").status_code == 200
    page = _signed_in_page(session, DELETED_404)
    _open_loaded(page, "Deleted leaves")
    assert turns(page) == [first]  # the older branch, as the deleted leaf was on it
    page.wait_for_function("() => !document.body.dataset.saving")
    stored = stored_metadata(api, conversation)
    assert not {shown, lost, lost_parent} & set(re.split(r"[ >]", stored)), stored
    assert {first, newer} <= set(stored.split())
    reload_when_saved(page)
    page.wait_for_function("() => document.querySelectorAll('#messages .turn').length > 0")
    assert turns(page) == [first]
    assert page.inner_text("#messages .branch-position") == "1/2"
    assert page.locator("#messages .deleted-turn").count() == 0  # nothing left to say


def test_a_message_after_its_turn_was_deleted_elsewhere_shows_the_stored_conversation(session, api):
    """The turn on screen deleted through the API while the page shows it: the message sent
    from it is refused (404, `previous_response_not_found`); the page shows the conversation
    as stored, says why, keeps the message, and the next send starts afresh."""
    [leaf] = _chain(api, ["Juliet ten."])
    _conversation_ending_at(api, leaf, "Deleted while open")
    page = _signed_in_page(session, DELETED_404, r"404 .*@ .*/v1/responses$")
    open_conversation(page, "Deleted while open")
    assert api.delete(f"/v1/responses/{leaf}").status_code == 200
    send(page, "Still there?")
    assert "deleted elsewhere" in page.inner_text("#status")
    assert page.input_value("#prompt") == "Still there?"
    assert turns(page) == []
    assert "last turn was deleted" in page.inner_text("#messages .deleted-turn")
    send(page, "Still there?")
    [new] = turns(page)
    assert api.get(f"/v1/responses/{new}").json()["previous_response_id"] is None


MARKDOWN = f"""## Results

- first point with **bold** and `code`
- second point

| fruit | colour |
|---|:---:|
| apple | red |

| month | January | February | March | April | May | June | July |
|---|---|---|---|---|---|---|---|
| rainfall | high | high | moderate | moderate | low | low | lowest |

```python
def add(a, b):
    return a + b  # sum
```

{EVIL} and {SCRIPT} and [a link](javascript:window.pwned=3) and ![pic](http://example.com/x.png)

Visit https://example.com/bare today, see [Foo](https://en.wikipedia.org/wiki/Foo_(bar)) and [](https://a.example/empty)
"""


def test_markdown_and_tool_cards_render_and_model_text_stays_inert(session, api, live):
    context, _ = session
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live.url)
    _stored_turn(api, MARKDOWN, f"Evil {EVIL}")
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto("/")
    page.wait_for_selector("body[data-ready=true]")
    open_conversation(page, f"Evil {EVIL}")
    body = page.locator("#messages .assistant-body").first
    assert body.locator("h2").inner_text() == "Results"
    assert body.locator("ul > li").count() == 2 and body.locator("li strong").inner_text() == "bold"
    fruit = body.locator("table").first
    assert fruit.locator("th").all_inner_texts() == ["fruit", "colour"]
    assert fruit.locator("td").all_inner_texts() == ["apple", "red"]
    assert body.locator(".code-block .tok-keyword").first.inner_text() == "def"
    assert body.locator(".code-block .tok-comment").inner_text() == "# sum"
    body.get_by_role("button", name="Copy python").click()
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied == "def add(a, b):\n    return a + b  # sum"
    text = body.inner_text()
    assert EVIL in text and SCRIPT in text  # shown as text
    assert page.locator("#messages img, #messages script").count() == 0
    assert page.locator("#messages a[href^='javascript']").count() == 0
    assert page.locator("#messages a[href='http://example.com/x.png']").count() == 1  # a link only
    # a bare URL, or a link without a label, shows its URL (it recursed without end)
    assert body.locator("a[href='https://example.com/bare']").inner_text() == (
        "https://example.com/bare"
    )
    assert (
        body.locator("a[href='https://a.example/empty']").inner_text() == "https://a.example/empty"
    )
    # a target with parentheses keeps them
    assert body.locator("a[href='https://en.wikipedia.org/wiki/Foo_(bar)']").inner_text() == "Foo"
    call, result = page.locator("#messages details.tool-card").all()
    assert call.locator("summary").inner_text() == "Tool call: get_weather"
    assert not call.locator("pre").is_visible()  # folded until opened
    call.locator("summary").click()
    assert json.loads(call.locator("pre").inner_text()) == {"city": EVIL}
    result.locator("summary").click()
    assert result.locator("pre").inner_text() == f"sunny {SCRIPT}"
    assert page.get_by_role("button", name=f"Evil {EVIL}", exact=True).count() == 1
    assert page.evaluate("window.pwned") is None
    assert not [u for u in requests if not u.startswith(live.url)]  # nothing remote loaded
    # On a phone a wide table keeps its words whole and scrolls sideways (its columns were
    # squeezed to a letter a line, "February" read downwards).
    page.set_viewport_size({"width": 375, "height": 740})
    months = body.locator("table").nth(1)
    lines = months.locator("th, td").evaluate_all(
        "cells => cells.map(c => { const r = document.createRange(); r.selectNodeContents(c);"
        " return r.getClientRects().length; })"
    )
    assert lines == [1] * 16  # one line each
    assert page.locator(".table-wrap").nth(1).evaluate("w => w.scrollWidth > w.clientWidth")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375


def test_an_answer_nested_deeper_than_the_stack_is_shown(session, api):
    """Quotes nested a level per `>`: 12,000 of them took the renderer past the browser's
    stack, and the conversation opened without its answer. Past 20 levels the rest is text."""
    items = [{"role": "user", "content": "Quote me."}, {"role": "assistant", "content": "NESTED"}]
    _conversation_of(api, [*items, {"role": "user", "content": "Thanks."}], "Deep quotes")
    page = _signed_in_page(session)
    nested = ">" * 12_000 + " the end\n\n**after**"

    def deepen(route) -> None:  # the model's text, too long for the module's small model
        response = route.fetch()
        text = response.text().replace("NESTED", json.dumps(nested)[1:-1])
        route.fulfill(response=response, body=text)

    page.route("**/v1/responses/*/input_items*", deepen)
    open_conversation(page, "Deep quotes")
    body = page.locator("#messages .assistant-body").first
    assert body.locator("blockquote").count() == 21
    assert body.locator(":scope > .markdown > p strong").inner_text() == "after"
    assert "the end" in body.inner_text()


def test_right_to_left_text_reads_right_to_left(session, api):
    """Arabic and Hebrew paragraphs, list items, messages and titles take their direction
    from their text (their punctuation and list markers were on the wrong side); English
    beside them and code stay left to right."""
    context, _ = session
    hebrew = "שלום, מה שלומך?"
    answer = "مرحبا بالعالم! كيف حالك؟\n\n- عنصر أول.\n- عنصر ثاني.\n\nEnglish.\n\n```\nx = 1\n```"
    items = [
        {"role": "user", "content": hebrew},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Thanks."},
    ]
    conversation = _conversation_of(api, items, hebrew)
    page = context.new_page()
    page.goto(f"/#{conversation}")
    page.wait_for_function("() => document.querySelectorAll('#messages .turn').length > 0")
    direction = "e => getComputedStyle(e).direction"
    body = page.locator("#messages .assistant-body").first
    assert [p.evaluate(direction) for p in body.locator("p").all()] == ["rtl", "ltr"]
    assert body.locator("ul").evaluate(direction) == "rtl"
    assert body.locator("pre").evaluate(direction) == "ltr"
    assert page.locator("#messages .bubble.user .plain").first.evaluate(direction) == "rtl"
    assert page.locator("#chat-title").evaluate(direction) == "rtl"
    entry = page.get_by_role("button", name=hebrew, exact=True)
    assert entry.evaluate(direction) == "rtl"


def test_a_finished_answer_is_read_out_once(page):
    """Screen readers hear the answer once it has ended, from one live region: the messages
    are no live region (a streamed turn is drawn anew each frame, and each drawing was read
    out again from the user's message on)."""
    assert page.locator("#messages").get_attribute("aria-live") is None
    announcer = page.locator("#announcer")
    assert announcer.get_attribute("aria-live") == "polite"
    send(page, "Name a color.")
    said = announcer.text_content()
    assert page.inner_text("#messages .turn .assistant-body").split()[0] in said
    assert "Regenerate" not in said  # the answer, not the controls under it


def test_sign_in_with_a_wrong_then_the_right_key(browser, live, usage_missing):
    context, console = _open_context(browser, live, usage_missing, key=None)
    console.expected.append(r"status of 401 ")  # the page's probes before a key is accepted
    page = context.new_page()
    page.goto("/")
    dialog = page.locator("#sign-in")
    dialog.wait_for(state="visible")
    page.fill("#api-key", "sk-wrong")
    page.click("#sign-in-submit")
    page.wait_for_function("() => document.getElementById('sign-in-error').textContent.length > 0")
    assert "did not accept this API key" in page.inner_text("#sign-in-error")
    assert page.evaluate("localStorage.getItem('tokenmill.apiKey')") is None
    page.fill("#api-key", API_KEY)
    page.click("#sign-in-submit")
    page.wait_for_selector("body[data-ready=true]")
    assert not dialog.is_visible()
    assert page.evaluate("localStorage.getItem('tokenmill.apiKey')") == API_KEY
    assert API_KEY not in page.url
    assert page.locator("#sign-out").is_visible()
    context.close()
    assert console.unexpected() == []


def test_usage_and_quota_are_shown(session):
    context, _ = session
    report = {
        "object": "usage.report",
        "user": "user_ada",
        "quota": {
            "limit": 100000,
            "period": "day",
            "used": 1234,
            "reserved": 16,
            "remaining": 98750,
            "resets_at": 1790000000,
        },
        "data": [
            {
                "date": "2026-12-02",
                "model": MODEL,
                "requests": 3,
                "input_tokens": 1000,
                "cached_input_tokens": 500,
                "output_tokens": 250,
                "total_tokens": 1250,
            }
        ],
    }
    page = context.new_page()
    page.route("**/v1/usage?limit=1", lambda route: route.fulfill(json=report))
    page.goto("/")
    page.wait_for_selector("body[data-ready=true]")
    usage = page.inner_text("#usage")
    assert "user_ada" in usage
    assert "1,250 of 100,000 tokens used this day" in usage and "98,750 remaining" in usage


def test_a_phone_screen(browser, live, usage_missing):
    context, console = _open_context(
        browser, live, usage_missing, key=API_KEY, viewport={"width": 375, "height": 740}
    )
    page = context.new_page()
    page.goto("/")
    page.wait_for_selector("body[data-ready=true]")
    assert page.evaluate("document.activeElement === document.body")  # no keyboard pops up
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    assert not page.locator("#new-chat").is_visible()  # the sidebar is folded away
    page.get_by_role("button", name="Show conversations").click()
    page.locator("#new-chat").wait_for(state="visible")
    page.keyboard.press("Escape")  # the open sidebar covers its button: Escape folds it
    page.locator("#new-chat").wait_for(state="hidden")
    page.get_by_role("button", name="Show conversations").click()
    page.locator("#new-chat").wait_for(state="visible")
    page.mouse.click(360, 400)  # and so does a tap beside it
    page.locator("#new-chat").wait_for(state="hidden")
    page.get_by_role("button", name="Show conversations").click()
    page.locator("#new-chat").wait_for(state="visible")
    page.click("#new-chat")
    send(page, "Hi!")
    assert page.locator("#messages .assistant-body").is_visible()
    for control in ("#prompt", "#send", "#upload-label", "#open-settings"):
        box = page.locator(control).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 375, control
    page.keyboard.press("Tab")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"  # focus is visible
    context.close()
    assert console.unexpected() == []


def test_a_pasted_code_block_keeps_its_first_lines_indent(page, api):
    """A message goes without its leading blank lines and trailing whitespace, but with
    the indent of its first line: trimming both ends took a pasted code block's first
    indent away, so its lines no longer lined up."""
    code = "    for x in range(3):\n        print(x)"
    send(page, "\n\n" + code + "\n  ")
    [turn] = turns(page)
    [given] = api.get(f"/v1/responses/{turn}/input_items").json()["data"]
    assert given["content"][0]["text"] == code


def test_return_starts_a_new_line_on_a_touch_screen(browser, live, usage_missing):
    """A phone's on-screen keyboard has no Shift+Enter: its return key starts a new line
    (as on ChatGPT's mobile site), in the message box and in an edit, and Send sends; Enter
    said to send would make a message of several lines impossible to type."""
    context, console = _open_context(
        browser,
        live,
        usage_missing,
        key=API_KEY,
        viewport={"width": 375, "height": 740},
        has_touch=True,
        is_mobile=True,
    )
    page = context.new_page()
    page.goto("/")
    page.wait_for_selector("body[data-ready=true]")
    assert "Enter sends" not in page.get_attribute("#prompt", "placeholder")
    assert "Enter sends" not in page.inner_text("#messages")
    page.fill("#prompt", "Name a color.")
    page.press("#prompt", "Enter")
    page.keyboard.type("Then a fruit.")
    assert page.input_value("#prompt") == "Name a color.\nThen a fruit."
    assert finished_turns(page) == 0 and page.locator("#send").is_visible() and turns(page) == []
    page.tap("#send")
    wait_for_turn(page, 0)
    assert page.inner_text("#messages .bubble.user .plain") == "Name a color.\nThen a fruit."
    page.get_by_role("button", name="Edit message").tap()
    page.press("#messages textarea", "Enter")
    assert page.input_value("#messages textarea").endswith("Then a fruit.\n")
    assert finished_turns(page) == 1
    context.close()
    assert console.unexpected() == []


def test_an_uploaded_file_is_cited(page, api):
    """Upload into the conversation's vector store, ask, and follow the answer's
    file_citation (the file_search tool of /v1/responses; the question is one the default
    model answers with words of the file, which is what earns a citation)."""
    page.set_input_files(
        "#upload",
        files=[
            {
                "name": f"{EVIL}.txt",
                "mimeType": "text/plain",
                "buffer": b"Our office cat is named Whiskers. Whiskers likes tuna.\n",
            }
        ],
    )
    page.wait_for_selector("#attachments .attachment.completed", timeout=60_000)
    assert f"{EVIL}.txt" in page.inner_text("#attachments")  # the name is text
    assert page.locator("#attachments img").count() == 0
    assert page.inner_text("#attachments .attachment-status") == "ready"
    page.reload()  # the chips drawn from the store read the same
    page.wait_for_selector("body[data-ready=true]")
    page.get_by_role("button", name=f"{EVIL}.txt", exact=True).click()  # no turns yet
    page.wait_for_selector("#attachments .attachment.completed")
    assert page.inner_text("#attachments .attachment-status") == "ready"
    page.click("#open-settings")
    assert page.is_checked("#always-search")
    page.fill("#max-output-tokens", "60")
    page.click("#settings-save")
    send(page, "What is the name of the office cat?")
    assert "File search (completed)" in page.inner_text("#messages .tool-card summary")
    link = page.locator("#messages a.citation")
    assert link.count() == 1, page.inner_text("#messages")  # the answer, when it cites nothing
    file_id = link.get_attribute("data-file-id")
    assert link.get_attribute("href") == f"/v1/files/{file_id}/content"
    assert link.inner_text() == f"{EVIL}.txt"
    assert b"Whiskers" in api.get(f"/v1/files/{file_id}/content").content
    with page.expect_download() as download:
        link.click()
    assert Path(download.value.path()).read_bytes().startswith(b"Our office cat")
    assert page.evaluate("window.pwned") is None
    # The search's result (under its file's name) is on the turn's card, and still is once
    # the page has read the turn back: a read shows a response's stored results only when
    # it includes them as the creating request did.
    card = page.locator("#messages .tool-card")
    assert "Whiskers likes tuna" in card.text_content()
    reload_when_saved(page)
    page.wait_for_selector("#messages .tool-card")
    assert "Whiskers likes tuna" in page.locator("#messages .tool-card").text_content()


def _expire(live: LiveServer, api: httpx.Client, vector_store_id: str) -> None:
    """Makes the store expire: a day after its last use, which was two days ago."""
    expiry = {"anchor": "last_active_at", "days": 1}
    assert api.post(f"/v1/vector_stores/{vector_store_id}", json={"expires_after": expiry})
    assert live.scratch_dir is not None
    with sqlite3.connect(Path(live.scratch_dir) / "tokenmill.db") as db:
        db.execute(
            "UPDATE vector_stores SET last_active_at = ? WHERE id = ?",
            (int(time.time()) - 2 * 86_400, vector_store_id),
        )
    assert api.get(f"/v1/vector_stores/{vector_store_id}").json()["status"] == "expired"


def _a_chat_with_a_file(page, api) -> tuple[str, str]:
    """A conversation with cat.txt attached and one turn answered: its id and its vector
    store's."""
    page.set_input_files(
        "#upload",
        files=[{"name": "cat.txt", "mimeType": "text/plain", "buffer": b"Our cat is Whiskers.\n"}],
    )
    page.wait_for_selector("#attachments .attachment.completed", timeout=60_000)
    page.wait_for_function("() => !document.body.dataset.saving")
    send(page, "What is the cat called?")
    conversation = page.evaluate("location.hash")[1:]
    return conversation, api.get(f"/v1/conversations/{conversation}").json()["metadata"]["vs"]


def test_a_conversation_whose_vector_store_expired_goes_on_with_its_files(session, page, api, live):
    """The conversation's vector store expired (its expires_after): file_search over it is
    a 400, which every next message got. The files move to a new store, which the
    conversation names from then on; the page says so and the message goes through."""
    session[1].expected.append(r"400 .*@ .*/v1/responses$")  # the store refused, once
    conversation, expired = _a_chat_with_a_file(page, api)
    _expire(live, api, expired)
    [first] = turns(page)
    send(page, "And what does it eat?")
    assert "Error" not in page.inner_text("#messages")
    assert turns(page)[0] == first and len(turns(page)) == 2
    assert "expired" in page.inner_text("#status")
    page.wait_for_function("() => !document.body.dataset.saving")
    store = api.get(f"/v1/conversations/{conversation}").json()["metadata"]["vs"]
    assert store != expired
    renewed = api.get(f"/v1/vector_stores/{store}").json()
    assert renewed["status"] == "completed" and renewed["file_counts"]["completed"] == 1
    assert renewed["expires_after"] == {"anchor": "last_active_at", "days": 1}
    answered = api.get(f"/v1/responses/{turns(page)[1]}").json()
    assert answered["tools"][0]["vector_store_ids"] == [store]
    assert page.inner_text("#attachments") == "cat.txt\nready"


def test_a_conversation_whose_vector_store_was_deleted_goes_on_without_it(session, page, api):
    """The conversation's vector store was deleted through the API (another client, say):
    file_search over it is a 404, which every next message got. The conversation forgets
    the store, the message goes through without file_search, the page says the files are
    gone, and a file attached then gets a new store."""
    session[1].expected.append(r"404 .*@ .*/v1/responses$")  # the store refused, once
    conversation, deleted = _a_chat_with_a_file(page, api)
    assert api.delete(f"/v1/vector_stores/{deleted}").json()["deleted"] is True
    [first] = turns(page)
    send(page, "And what does it eat?")
    assert "Error" not in page.inner_text("#messages")
    assert turns(page)[0] == first and len(turns(page)) == 2
    assert "deleted" in page.inner_text("#status")
    assert page.locator("#attachments .attachment").count() == 0
    # The page says the file is removed before it drops the emptied store and saves the
    # conversation's metadata without it.
    deadline = time.monotonic() + 10
    while "vs" in api.get(f"/v1/conversations/{conversation}").json()["metadata"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert api.get(f"/v1/responses/{turns(page)[1]}").json()["tools"] == []
    page.set_input_files(
        "#upload", files=[{"name": "dog.txt", "mimeType": "text/plain", "buffer": b"Rex.\n"}]
    )
    page.wait_for_selector("#attachments .attachment.completed", timeout=60_000)
    page.wait_for_function("() => !document.body.dataset.saving")
    store = api.get(f"/v1/conversations/{conversation}").json()["metadata"]["vs"]
    assert store != deleted
    assert api.get(f"/v1/vector_stores/{store}").json()["file_counts"]["completed"] == 1
    assert page.inner_text("#attachments") == "dog.txt\nready"


def test_opening_a_conversation_whose_vector_store_was_deleted_says_its_files_are_gone(
    session, page, api
):
    """Opening a conversation whose vector store was deleted through the API showed the
    raw 404 of listing its files ("Error: No vector store found ...") until a message was
    sent. Opening forgets the store as a refused message does: the files are said gone."""
    session[1].expected.append(r"404 .*@ .*/v1/vector_stores/vs_\w+/files\?")  # listed once
    conversation, deleted = _a_chat_with_a_file(page, api)
    assert api.delete(f"/v1/vector_stores/{deleted}").json()["deleted"] is True
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    page.wait_for_function("() => /deleted/.test(document.querySelector('#status').textContent)")
    assert "Error" not in page.inner_text("#status")
    assert page.locator("#attachments .attachment").count() == 0
    # The page says the file is removed before it drops the emptied store and saves the
    # conversation's metadata without it.
    deadline = time.monotonic() + 10
    while "vs" in api.get(f"/v1/conversations/{conversation}").json()["metadata"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_file_attached_after_the_vector_store_was_deleted_is_kept(session, page, api):
    """Attaching to a conversation whose vector store was deleted through the API failed
    (a 404 naming the store): the conversation forgets it and the file goes to a new one."""
    session[1].expected.append(r"404 .*@ .*/v1/vector_stores/vs_\w+/files$")  # refused once
    for name in ("first.txt", "second.txt"):
        attach(page, name)
        if name == "first.txt":
            conversation = page.evaluate("location.hash")[1:]
            deleted = api.get(f"/v1/conversations/{conversation}").json()["metadata"]["vs"]
            assert api.delete(f"/v1/vector_stores/{deleted}").json()["deleted"] is True
    store = api.get(f"/v1/conversations/{conversation}").json()["metadata"]["vs"]
    assert store != deleted
    files = api.get(f"/v1/vector_stores/{store}/files").json()["data"]
    assert [api.get(f"/v1/files/{f['id']}").json()["filename"] for f in files] == ["second.txt"]
    assert page.inner_text("#attachments") == "second.txt\nready"
    assert "deleted" in page.inner_text("#status")


def test_the_files_shown_are_the_open_chats_after_a_quick_switch(page):
    """A conversation with a file opened, then New chat before its files were listed: the
    new chat shows no file (the conversation's list, arriving late, drew its chips there,
    and a message sent then seemed to search them)."""
    page.set_input_files(
        "#upload", files=[{"name": "dog.txt", "mimeType": "text/plain", "buffer": b"Rex.\n"}]
    )
    page.wait_for_selector("#attachments .attachment.completed", timeout=60_000)
    page.wait_for_function("() => !document.body.dataset.saving")
    page.click("#new-chat")
    held = []
    listing = re.compile(r"/v1/vector_stores/[^/]+/files\?")
    page.route(listing, lambda route: held.append(route))  # the store's files, held back
    page.get_by_role("button", name="dog.txt", exact=True).click()
    deadline = time.monotonic() + 30
    while not held:
        assert time.monotonic() < deadline
        page.wait_for_timeout(50)
    page.click("#new-chat")
    for route in held:
        route.continue_()
    page.unroute(listing)
    page.wait_for_timeout(500)  # time for the late list to be drawn, were it drawn
    assert page.inner_text("#chat-title") == "New chat"
    assert page.locator("#attachments .attachment").count() == 0


def test_a_file_attached_after_the_vector_store_expired_is_kept(session, page, api, live):
    """Attaching to a conversation whose vector store expired failed (adding a file is a
    use of the store, refused): the store is renewed with its files, and the new one too."""
    session[1].expected.append(r"400 .*@ .*/v1/vector_stores/vs_\w+/files$")  # refused once
    for name in ("first.txt", "second.txt"):
        attach(page, name)
        if name == "first.txt":
            conversation = page.evaluate("location.hash")[1:]
            expired = api.get(f"/v1/conversations/{conversation}").json()["metadata"]["vs"]
            _expire(live, api, expired)
    page.wait_for_function(
        "() => document.querySelectorAll('#attachments .attachment.completed').length === 2"
    )
    store = api.get(f"/v1/conversations/{conversation}").json()["metadata"]["vs"]
    assert store != expired
    files = api.get(f"/v1/vector_stores/{store}/files").json()["data"]
    names = {api.get(f"/v1/files/{f['id']}").json()["filename"] for f in files}
    assert names == {"first.txt", "second.txt"}
    assert "failed" not in page.inner_text("#attachments")


def test_an_attached_file_can_be_removed(session, page, api):
    """Each file's chip has a Remove button (keyboard reachable): the file leaves the
    conversation's vector store and is deleted; a removal that cannot reach the server keeps
    the chip and says so, one whose file is gone already counts as done, and with the last
    file the store goes, so that messages no longer offer file_search."""
    session[1].expected += [
        r"ERR_FAILED .*@ .*/v1/vector_stores/vs_\w+/files/file_\w+$",  # the removal cut off
        r"404 .*@ .*/v1/(vector_stores/vs_\w+/)?files/file_\w+$",  # gone already
    ]
    for name in ("a.txt", "b.txt"):
        attach(page, name)
    conversation = page.evaluate("location.hash")[1:]
    store = api.get(f"/v1/conversations/{conversation}").json()["metadata"]["vs"]
    files = api.get(f"/v1/vector_stores/{store}/files").json()["data"]
    ids = {api.get(f"/v1/files/{f['id']}").json()["filename"]: f["id"] for f in files}

    cut = re.compile(r"/v1/vector_stores/[^/]+/files/[^/]+$")
    page.route(cut, lambda route: route.abort())
    page.get_by_role("button", name="Remove a.txt").click()
    page.wait_for_function(
        "() => /Could not remove a.txt/.test(document.querySelector('#status').textContent)"
    )
    page.unroute(cut)
    assert page.locator("#attachments .attachment").count() == 2

    page.get_by_role("button", name="Remove a.txt").focus()
    page.keyboard.press("Enter")
    page.wait_for_function(
        "() => /Removed a.txt/.test(document.querySelector('#status').textContent)"
    )
    assert page.inner_text("#attachments") == "b.txt\nready"
    assert [f["id"] for f in api.get(f"/v1/vector_stores/{store}/files").json()["data"]] == [
        ids["b.txt"]
    ]
    assert api.get(f"/v1/files/{ids['a.txt']}").status_code == 404

    assert api.delete(f"/v1/files/{ids['b.txt']}").status_code == 200  # gone already
    page.get_by_role("button", name="Remove b.txt").click()
    page.wait_for_function(
        "() => /Removed b.txt/.test(document.querySelector('#status').textContent)"
    )
    assert page.locator("#attachments .attachment").count() == 0
    # The page says the file is removed before it saves the conversation's metadata without
    # the emptied store, and deletes the store after that save.
    deadline = time.monotonic() + 10
    while "vs" in api.get(f"/v1/conversations/{conversation}").json()["metadata"] or (
        api.get(f"/v1/vector_stores/{store}").status_code != 404
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    send(page, "Hello.")
    [turn] = turns(page)
    assert api.get(f"/v1/responses/{turn}").json()["tools"] == []


def test_python_code_can_be_turned_on_where_the_server_runs_it(session, page, api):
    """The server lists code_interpreter (GET /v1/tools: its sandbox runs here): Settings
    offers "Run Python code", off by default; on, the page's requests declare the tool, and
    a server refusing it (no bubblewrap) is said to be unable to run Python code."""
    session[1].expected.append(r"400 .*@ .*/v1/responses$")  # the refusal, below
    assert {"name": "code_interpreter", "default": False} in api.get("/v1/tools").json()["data"]
    page.click("#open-settings")
    assert page.is_visible("#run-code") and not page.is_checked("#run-code")
    page.check("#run-code")
    page.click("#settings-save")
    send(page, "Hi.")
    [turn] = turns(page)
    tools = api.get(f"/v1/responses/{turn}").json()["tools"]
    assert [t["type"] for t in tools] == ["code_interpreter"]
    page.wait_for_function("() => !document.body.dataset.saving")
    conversation = page.evaluate("location.hash")[1:]
    settings = api.get(f"/v1/conversations/{conversation}").json()["metadata"]["settings"]
    assert json.loads(settings)["run_code"] is True

    refusal = {
        "message": "tools[0]: the code sandbox needs bubblewrap (/usr/bin/bwrap not found; "
        "install it with `apt-get install bubblewrap`)",
        "type": "invalid_request_error",
        "param": "tools[0]",
        "code": None,
    }
    page.route(
        re.compile(r"/v1/responses$"),
        lambda route: route.fulfill(status=400, json={"error": refusal}),
    )
    page.fill("#prompt", "Again.")
    page.press("#prompt", "Enter")
    page.wait_for_function(
        "() => /cannot run Python code/.test(document.querySelector('#status').textContent)"
    )
    assert page.input_value("#prompt") == "Again."


def test_every_message_searches_the_files_with_python_code_on_too(session, page, api):
    """With a file attached and "Run Python code" on, the message still searches the file
    first: tool_choice names file_search ("required" let the model call code_interpreter,
    or write a search of its own, instead of the search on the user's message)."""
    page.click("#open-settings")
    page.check("#run-code")
    page.click("#settings-save")
    _a_chat_with_a_file(page, api)
    [turn] = turns(page)
    response = api.get(f"/v1/responses/{turn}").json()
    assert response["tool_choice"] == {"type": "file_search"}
    assert [t["type"] for t in response["tools"]] == ["file_search", "code_interpreter"]
    assert response["output"][0]["type"] == "file_search_call"
