"""The load generator against the fake-engine server: it measures what it claims."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import httpx

from tests.server.fake_engine import FakeEngine
from tests.server.fake_tokenizer import FakeTokenizer

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "loadgen.py"
_spec = importlib.util.spec_from_file_location("loadgen", _PATH)
loadgen = importlib.util.module_from_spec(_spec)
sys.modules["loadgen"] = loadgen  # dataclasses look their module up there
_spec.loader.exec_module(loadgen)


def test_percentile_interpolates():
    assert loadgen.percentile([], 50) == 0.0
    assert loadgen.percentile([3.0], 99) == 3.0
    assert loadgen.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert loadgen.percentile(list(range(101)), 99) == 99


def test_sweep_reports_every_level(serve, tmp_path, capsys):
    server = serve(FakeEngine(reply="abcdefgh" * 4, token_delay=0.002))
    out = tmp_path / "results.json"
    loadgen.main(
        [
            "--base-url",
            f"{server.url}/v1",
            "--model",
            "fake-model",
            "--concurrency",
            "1",
            "3",
            "--max-tokens",
            "10",
            "--json",
            str(out),
        ]
    )
    levels = json.loads(out.read_text())["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 3]
    assert [lv["requests"] for lv in levels] == [8, 12]
    for level in levels:
        assert level["failed"] == 0
        assert level["output_tokens"] == 10 * level["requests"]  # from the usage chunks
        assert 0 < level["ttft_p50_ms"] <= level["ttft_p99_ms"]
        assert level["itl_p50_ms"] > 0 and level["e2e_p50_s"] > 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4  # header, alignment row, one row per level
    assert "output tok/s" in lines[0] and lines[2].startswith("| 1 | 8 |")


def test_level_sends_prompts_from_offset_and_counts_prompt_tokens(serve):
    server = serve(FakeEngine(reply="xyz"))
    args = loadgen.build_parser().parse_args(
        ["--base-url", f"{server.url}/v1", "--model", "fake-model", "--requests", "3"]
    )
    prompts = ["p0", "p1", "p2 is longer", "p3"]
    report = asyncio.run(loadgen.run_level(args, 1, prompts, first=2))
    expected = [
        FakeTokenizer().encode_chat([{"role": "user", "content": p}])
        for p in ("p2 is longer", "p3", "p0")
    ]  # from index 2 on, wrapping round
    assert server.engine.prompts == expected
    assert report.prompt_tokens_mean == round(sum(map(len, expected)) / 3, 1)
    assert report.output_tokens == 9 and report.failed == 0


async def _dropping_server_run(drops: int) -> tuple[loadgen.RequestResult, int]:
    """A raw HTTP server that closes its first `drops` connections without answering."""
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
        if connections > drops:
            body = b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\ndata: [DONE]\n\n'
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    args = loadgen.build_parser().parse_args(["--base-url", f"http://127.0.0.1:{port}/v1"])
    async with server, httpx.AsyncClient(base_url=args.base_url, timeout=10) as client:
        result = await loadgen.one_request(client, args, "hello")
    return result, connections


def test_request_dropped_unanswered_is_sent_once_more():
    result, connections = asyncio.run(_dropping_server_run(drops=1))
    assert result.ok and result.output_tokens == 1 and connections == 2
    result, connections = asyncio.run(_dropping_server_run(drops=2))
    assert not result.ok and "RemoteProtocolError" in result.error and connections == 2
