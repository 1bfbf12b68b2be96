"""Every script in examples/ runs to completion with the default model and prints what it
says it does. The examples that need a running server share one."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.tools.sql_query import DEMO_DATABASE
from tests.product.test_live_responses import mentions
from tests.server.live_server import API_KEY, start_server

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str) -> str:
    # A script's own folder heads sys.path, not the checkout: point it at the code under test.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def answers(output: str) -> list[str]:
    return [line.removeprefix("A: ") for line in output.splitlines() if line.startswith("A: ")]


@pytest.mark.slow
def test_offline_batch():
    replies = answers(run_example("offline_batch.py"))
    assert len(replies) == 3 and all(r.strip() for r in replies)
    assert "Tokyo" in replies[0]


@pytest.mark.slow
def test_streaming_with_async_llm():
    output = run_example("streaming.py")
    pieces = [line for line in output.splitlines() if line.startswith(("[0] ", "[1] "))]
    # Both streams arrive in several deltas, interleaved: the two requests share steps.
    firsts = [line[:3] for line in pieces]
    assert firsts.count("[0]") > 1 and firsts.count("[1]") > 1
    assert firsts.index("[1]") < len(firsts) - 1 - firsts[::-1].index("[0]")
    assert "Tokyo" in answers(output)[0]


@pytest.fixture(scope="module")
def server():
    """One server for the examples that talk to a running one. Eager float32 (compile off):
    a background compile finishing mid-run would switch the numerics between requests, and
    agent_sales.py's SQL is checked against the database. float32 also spares the start
    the default w8a8's SmoothQuant calibration."""
    live = start_server("--api-key", API_KEY, "--compile", "off", "--dtype", "float32")
    yield live
    assert live.stop() == 0


@pytest.mark.slow
def test_openai_sdk_against_the_server(server):
    output = run_example("openai_client.py", "--base-url", f"{server.url}/v1", "--api-key", API_KEY)
    lines = {line.split(":", 1)[0]: line for line in output.splitlines() if ":" in line}
    assert "Tokyo" in lines["chat"]
    assert len(lines["stream"]) > len("stream: ") + 10
    assert lines["answer"] != "answer: ''"


@pytest.mark.slow
def test_agent_sales_example_runs_sql_query_on_the_server(server):
    output = run_example("agent_sales.py", "--base-url", f"{server.url}/v1", "--api-key", API_KEY)
    lines = output.splitlines()
    assert lines[0].startswith("call: sql_query {")
    assert lines[1].startswith("result: ")
    assert lines[2].startswith("answer: ")
    # "last quarter" is the database's latest one, 2026-Q3.
    sql = json.loads(lines[0].removeprefix("call: sql_query "))["sql"]
    assert "'East China'" in sql and "'2026-Q3'" in sql, sql
    with sqlite3.connect(DEMO_DATABASE) as db:
        ((total,),) = db.execute(
            "SELECT SUM(revenue_usd) FROM sales WHERE region = 'East China' AND quarter = '2026-Q3'"
        ).fetchall()
    # What the answer says changes with the CPU's rounding (see docs/tools.md).
    assert mentions(lines[1], total) and lines[2].removeprefix("answer: ").strip(), output


@pytest.mark.slow
def test_rag_answers_with_a_citation():
    """rag.py starts its own server, indexes its guide and asks with file_search."""
    lines = run_example("rag.py").splitlines()
    assert lines[0].startswith("indexed: starter.md as file_") and lines[0].endswith("(completed)")
    fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    assert fields["searched"] == "['How often does a starter kept in the fridge need feeding?']"
    assert fields["result"].endswith(" starter.md")
    assert fields["answer"].strip()
    assert fields["citation"].startswith("starter.md (file_")
