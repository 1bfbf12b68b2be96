"""The web page's latency: Enter to the first token painted, against the API's own TTFT.

One server with the default model. The page (headless Debian Chromium through Playwright),
a plain HTTP client and a bare fetch() in the same browser take turns (each going first
in turn), each holding its own 20-message conversation (`previous_response_id` chains,
the same questions, greedy, a few output tokens):
- page: from the Enter keydown (performance.now() in a capture listener) to the first
  answer text painted: a MutationObserver sees the DOM update that shows it, and the
  task queued from the next animation frame runs once that frame has been painted;
- API: from sending POST /v1/responses (stream) to reading its first
  response.output_text.delta event.
The page's figure includes its own work: reading the keypress, building the request,
parsing SSE from fetch's stream, rendering Markdown.

    python benchmarks/bench_page.py
    python benchmarks/bench_page.py --messages 10 --max-tokens 4

Target (docs/web.md): page p50 <= API p50 + 50 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

import httpx
from bench_product import _isa
from bench_serving import free_port, running_server, serve_argv

QUESTIONS = [
    f"Question {i}: name one animal that lives in {place}."
    for i, place in enumerate(
        [
            "the sea",
            "the desert",
            "the forest",
            "the arctic",
            "a river",
            "the jungle",
            "the mountains",
            "a city",
            "a lake",
            "the savanna",
        ]
        * 3
    )
]

PROBE = """() => {
  const fetchOriginal = window.fetch;
  window.fetch = (...args) => {
    if (String(args[0]).endsWith('/v1/responses')) window.__tf = performance.now();
    return fetchOriginal(...args);
  };
  const prompt = document.getElementById('prompt');
  prompt.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey) { window.__t0 = performance.now(); window.__t1 = null; }
  }, {capture: true});
  new MutationObserver(() => {
    if (window.__t0 == null || window.__t1 != null) return;
    const bodies = document.querySelectorAll('#messages .turn:last-child .assistant-body');
    const last = bodies[bodies.length - 1];
    if (last && last.textContent.trim()) {
      window.__t1 = -1;
      // The next frame paints the update; the task after that frame's callbacks runs
      // once it has been painted.
      requestAnimationFrame(() => setTimeout(() => { window.__t1 = performance.now(); }, 0));
    }
  }).observe(document.getElementById('messages'), {childList: true, subtree: true,
                                                    characterData: true});
}"""


def page_turn(page, text: str) -> tuple[float, float, float]:
    """Seconds from Enter to the first answer text painted, to the request's fetch() call,
    and to the first text delta parsed; waits for the turn to end."""
    before = page.evaluate("Number(document.body.dataset.turns || 0)")
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    page.wait_for_function("() => window.__t1 != null && window.__t1 > 0", timeout=120_000)
    # The turn is over once the page has stored it (tree, transcript): <body data-turns>.
    page.wait_for_function(
        f"() => Number(document.body.dataset.turns || 0) > {before}", timeout=120_000
    )
    marks = page.evaluate("""() => {
        const token = performance.getEntriesByName('tokenmill:first-token').at(-1).startTime;
        return [window.__t1 - window.__t0, window.__tf - window.__t0, token - window.__t0];
    }""")
    return tuple(m / 1e3 for m in marks)


RAW_FETCH = """async (body) => {
  const start = performance.now();
  const response = await fetch('/v1/responses', {method: 'POST',
    headers: {'Content-Type': 'application/json'}, body: JSON.stringify({...body, stream: true})});
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let text = '', first = null, id = null;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    text += value;
    if (first === null && text.includes('response.output_text.delta')) {
      first = performance.now() - start;
    }
    const match = /"id":"(resp_[0-9a-f]+)"/.exec(text);
    if (match && !id) id = match[1];
  }
  return [first, id];
}"""


def browser_fetch_turn(page, body: dict) -> tuple[float, str]:
    """The API's TTFT seen from the same browser: a bare fetch() and stream read, none of
    the page's code."""
    first, response_id = page.evaluate(RAW_FETCH, body)
    return first / 1e3, response_id


def api_turn(client: httpx.Client, body: dict) -> tuple[float, str]:
    """Seconds to the first text delta of a streamed response, and the response's id."""
    start = time.perf_counter()
    first, response_id = None, None
    with client.stream("POST", "/v1/responses", json={**body, "stream": True}) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event["type"] == "response.created":
                response_id = event["response"]["id"]
            if event["type"] == "response.output_text.delta" and first is None:
                first = time.perf_counter() - start
    assert first is not None and response_id is not None, "no text streamed"
    return first, response_id


def measure(url: str, args: argparse.Namespace) -> tuple[list[float], ...]:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Debian's chromium (apt-get install chromium)")
    page_times, api_times, request_times, parsed_times, raw_times = [], [], [], [], []
    defaults = json.dumps({"max_output_tokens": args.max_tokens, "temperature": 0})
    with sync_playwright() as playwright, httpx.Client(base_url=url, timeout=120) as client:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        context = browser.new_context(base_url=url)
        context.add_init_script(
            f"localStorage.setItem('tokenmill.defaults', {json.dumps(defaults)});"
        )
        page = context.new_page()
        page.goto("/")
        page.wait_for_selector("body[data-ready=true]")
        page.evaluate(PROBE)
        chains: dict[str, str | None] = {"api": None, "fetch": None}

        def body(question: str, path: str) -> dict:
            fields = {
                "model": args.model,
                "input": question,
                "temperature": 0,
                "max_output_tokens": args.max_tokens,
            }
            if chains[path]:
                fields["previous_response_id"] = chains[path]
            return fields

        def run_page(question: str) -> None:
            painted, requested, parsed = page_turn(page, question)
            page_times.append(painted)
            request_times.append(requested)
            parsed_times.append(parsed)

        def run_api(question: str) -> None:
            seconds, chains["api"] = api_turn(client, body(question, "api"))
            api_times.append(seconds)

        def run_fetch(question: str) -> None:
            seconds, chains["fetch"] = browser_fetch_turn(page, body(question, "fetch"))
            raw_times.append(seconds)

        paths = [run_page, run_api, run_fetch]
        for i, question in enumerate(QUESTIONS[: args.messages]):
            for run in paths[i % 3 :] + paths[: i % 3]:  # each goes first in turn
                run(question)
            print(
                f"{i + 1:3}  page {page_times[-1] * 1e3:7.1f} ms   api "
                f"{api_times[-1] * 1e3:7.1f} ms   browser fetch {raw_times[-1] * 1e3:7.1f} ms",
                file=sys.stderr,
            )
        browser.close()
    return page_times, api_times, request_times, parsed_times, raw_times


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--messages", type=int, default=20, help=f"at most {len(QUESTIONS)}")
    p.add_argument("--max-tokens", type=int, default=8, help="max output tokens per answer")
    p.add_argument("--server-args", default="", help="extra engine.serve flags")
    p.add_argument("--startup-timeout", type=float, default=900)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-") as data_dir:
        port = free_port()
        server = serve_argv(
            port, "--model", args.model, "--data-dir", data_dir, *shlex.split(args.server_args)
        )
        with running_server("tokenmill", server, port, args.startup_timeout) as url:
            page_times, api_times, request_times, parsed_times, raw_times = measure(url, args)
    page_p50, api_p50 = statistics.median(page_times), statistics.median(api_times)
    with contextlib.suppress(OSError):
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{datetime.date.today()}  ISA: {_isa()}  load average: {load}  model: {args.model}")
    print(f"command: python benchmarks/bench_page.py {shlex.join(sys.argv[1:])}")
    print(
        f"{len(page_times)} messages; p50 Enter -> first token painted: {page_p50 * 1e3:.0f} ms; "
        f"p50 API TTFT: {api_p50 * 1e3:.0f} ms; difference {(page_p50 - api_p50) * 1e3:+.0f} ms "
        "(target <= +50 ms)"
    )
    print(
        f"p50 Enter -> the page's fetch() of /v1/responses: "
        f"{statistics.median(request_times) * 1e3:.1f} ms; -> first delta parsed: "
        f"{statistics.median(parsed_times) * 1e3:.0f} ms; the API's TTFT from a bare fetch() "
        f"in the same browser: p50 {statistics.median(raw_times) * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    main()
