"""sql_query's grammar: every query it accepts runs read-only on its database (the demo
one and any other), llguidance enforces it on a forced call, and the declaration the
model reads stays compact (the grammar is not in it) and leads to the latest period.
Also the answer turn's constraint after the result: text that does not open with `<`."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.loader import resolve_model
from engine.loader.gguf import read_gguf
from engine.structured_output import GrammarCompiler
from engine.tokenizer import Tokenizer
from orchestrator.chat_types import Tool
from orchestrator.context import ContextBuilder, ToolConfig
from orchestrator.output_structure import protocol_text, turn_structure
from orchestrator.store.repository import History
from orchestrator.tool_parser import parse_tool_calls
from orchestrator.tools import ToolUnavailable, builtin_tools
from orchestrator.tools.sql_grammar import identifier, literal
from orchestrator.tools.sql_query import DEMO_DATABASE, SqlQuery

EAST_Q3 = "SELECT SUM(revenue_usd) FROM sales WHERE region = 'East China' AND quarter = '2026-Q3'"
WINDOW = 2048  # the default model's context window


def run(tool: SqlQuery, sql: str) -> str:
    return asyncio.run(tool.execute({"sql": sql}, "call_test")).text


def pattern(tool: SqlQuery) -> str:
    return tool.argument_schema["properties"]["sql"]["pattern"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> SqlQuery:
    copy = tmp_path_factory.mktemp("demo") / "demo.db"
    copy.write_bytes(DEMO_DATABASE.read_bytes())
    return SqlQuery(copy)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_query_the_grammar_accepts_runs_on_the_demo_database(demo, data):
    before = hashlib.sha256(demo.database.read_bytes()).hexdigest()
    sql = data.draw(st.from_regex(pattern(demo), fullmatch=True))
    text = run(demo, sql)  # a ToolError (a query SQLite refuses) fails the test
    assert text.endswith("rows)")
    assert hashlib.sha256(demo.database.read_bytes()).hexdigest() == before


# Names and values chosen to trip a grammar that does not quote or escape them.
NAMES = st.sampled_from(
    ["region", "order", "group", "select", "unit price", 'say "hi"', "it's", "x1", "Value"]
)
TEXTS = st.text(st.sampled_from("ab 'x\"%_-é"), min_size=1, max_size=6)


@st.composite
def databases(draw, root: Path) -> Path:
    """A small SQLite file: one to three tables of TEXT, INTEGER and REAL columns."""
    path = root / f"db{draw(st.integers(0, 10**9))}.db"
    path.unlink(missing_ok=True)
    db = sqlite3.connect(path)
    tables = draw(st.lists(NAMES, min_size=1, max_size=3, unique=True))
    for table in tables:
        names = draw(st.lists(NAMES, min_size=1, max_size=4, unique=True))
        kinds = [draw(st.sampled_from(["TEXT", "INTEGER", "REAL"])) for _ in names]
        columns = ", ".join(f"{identifier(n)} {k}" for n, k in zip(names, kinds, strict=True))
        db.execute(f"CREATE TABLE {identifier(table)} ({columns})")
        for _ in range(draw(st.integers(0, 6))):
            row = [
                draw(
                    TEXTS
                    if k == "TEXT"
                    else st.integers(-50, 50)
                    if k == "INTEGER"
                    else st.floats(-1e3, 1e3, allow_nan=False)
                )
                for k in kinds
            ]
            db.execute(f"INSERT INTO {identifier(table)} VALUES ({', '.join('?' * len(row))})", row)
    db.commit()
    db.close()
    return path


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_the_grammar_of_any_database_accepts_only_queries_that_run(tmp_path, data):
    tool = SqlQuery(data.draw(databases(tmp_path)))
    for _ in range(3):
        sql = data.draw(st.from_regex(pattern(tool), fullmatch=True))
        assert run(tool, sql).endswith("rows)")


def test_the_grammar_names_only_what_the_database_holds(demo):
    accepts = re.compile(pattern(demo)).fullmatch
    assert accepts(EAST_Q3)
    assert accepts(
        "SELECT region, SUM(units) FROM sales WHERE (product = 'Tea' OR product = 'Juice') "
        "AND units > 5 AND units < 2000 GROUP BY region ORDER BY SUM(units) DESC LIMIT 3"
    )
    assert accepts("SELECT headquarters FROM regions WHERE region = 'West China'")
    for wrong in [
        "SELECT SUM(revenue) FROM sales",  # no such column
        "SELECT SUM(revenue_usd) FROM sales WHERE region = 'East'",  # no such region
        "SELECT SUM(revenue_usd) FROM sales WHERE quarter = '2026-Q4'",  # not in the data
        "SELECT headquarters FROM sales",  # a column of the other table
        "SELECT SUM(region) FROM sales",  # a sum of text
        "SELECT units FROM sales WHERE region = 'East China' AND region = 'West China'",
        "SELECT units FROM sales WHERE quarter = '2026-Q3' AND region = 'East China'",
        "SELECT 1; DROP TABLE sales",
        "DELETE FROM sales",
        "select units from sales",
    ]:
        assert not accepts(wrong), wrong


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(read_gguf(resolve_model("smollm2-135m-instruct").path).metadata)


EOS = 0  # the end token the test's matchers are given


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    """One compiler for the module, as an engine keeps one: its view of the vocabulary takes
    longer to build than a walk takes, and every matcher it compiles starts fresh."""
    return GrammarCompiler(tokenizer, tokenizer.backend.get_vocab_size(), [EOS])


def walk(tool: SqlQuery, compiler: GrammarCompiler, tokenizer: Tokenizer, data) -> str:
    """The SQL of a forced call written by a random walk through the tokens its grammar
    allows, step by step as the sampler sees them."""
    structure = turn_structure([("sql_query", tool.argument_schema)], "required", False, None, "x")
    matcher = compiler.compile(structure)
    vocab = tokenizer.backend.get_vocab_size()
    ids: list[int] = []
    while not matcher.is_stopped():
        bits = np.frombuffer(bytes(matcher.compute_bitmask()), dtype=np.uint8)
        allowed = np.flatnonzero(np.unpackbits(bits, bitorder="little")[:vocab])
        token = int(allowed[data.draw(st.integers(0, len(allowed) - 1))])
        if token == EOS:
            break
        assert matcher.consume_token(token)
        ids.append(token)
    _, calls = parse_tool_calls(tokenizer.decode(ids), ["sql_query"])
    (call,) = calls
    return json.loads(call.arguments)["sql"]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_call_llguidance_lets_the_model_write_runs(demo, compiler, tokenizer, data):
    sql = walk(demo, compiler, tokenizer, data)
    assert re.fullmatch(pattern(demo), sql)
    assert run(demo, sql).endswith("rows)")


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_llguidance_calls_on_any_database_run(tmp_path, compiler, tokenizer, data):
    """Names and values that need quoting or JSON escapes (`say "hi"`) survive both."""
    tool = SqlQuery(data.draw(databases(tmp_path)))
    assert run(tool, walk(tool, compiler, tokenizer, data)).endswith("rows)")


def test_a_forced_call_is_decoded_under_the_grammar(demo, compiler, tokenizer):
    structure = turn_structure([("sql_query", demo.argument_schema)], "required", False, None, "x")

    def accepted(sql: str) -> bool:
        call = json.dumps({"name": "sql_query", "arguments": {"sql": sql}})
        ids = tokenizer.encode(f"<tool_call>\n{call}\n</tool_call>")
        matcher = compiler.compile(structure)
        return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_stopped()

    assert accepted(EAST_Q3)
    assert accepted("SELECT COUNT(*) FROM regions")
    assert not accepted(EAST_Q3.replace("East China", "East"))
    assert not accepted(EAST_Q3.replace("revenue_usd", "sales"))
    assert not accepted("2026-Q3")


def test_an_answer_after_the_results_cannot_open_with_markup(compiler, tokenizer):

    def accepted(text: str) -> bool:
        ids = [*tokenizer.encode(text), EOS]
        return compiler.compile(protocol_text(True)).try_consume_tokens(ids) == len(ids)

    assert accepted("East China sold $58,388.0 in 2026-Q3 (<1% of <all>).")
    assert accepted("\nThe total is 42.")
    assert not accepted("<tool_response>\n42\n</tool_response>")
    assert not accepted(' <untrusted origin="tool sql_query">')
    assert not accepted("\n\n<")


def test_the_declaration_the_model_reads_is_compact(tokenizer):
    registry = builtin_tools(DEMO_DATABASE)
    declaration = registry.declaration("sql_query")
    assert declaration["parameters"]["properties"] == {
        "sql": {"type": "string", "description": "One SQLite SELECT statement."}
    }
    assert "pattern" not in json.dumps(declaration)
    tool = registry.get("sql_query")
    assert len(pattern(tool)) > 2000  # the grammar itself would not fit in a description
    with sqlite3.connect(DEMO_DATABASE) as db:
        regions = [r for (r,) in db.execute("SELECT DISTINCT region FROM sales")]
        quarters = [q for (q,) in db.execute("SELECT DISTINCT quarter FROM sales")]
    text = declaration["description"]
    # A value set shared by a key and the column referring to it is listed once.
    assert all(text.count(literal(region)) == 1 for region in regions)
    assert "regions.region, sales.region values: " in text
    # Periods come latest first, the first named as a question says it ("last quarter").
    latest, *earlier = sorted(quarters, reverse=True)
    listed = ", ".join([f"{literal(latest)} (the last quarter)", *map(literal, earlier)])
    assert f"sales.quarter values: {listed}." in text
    assert "revenue_usd REAL -- sales in US dollars" in text
    # Placeholders, not values: a small model copies what the example holds.
    example = "Example: SELECT SUM(revenue_usd) FROM sales WHERE region = '...' AND quarter = '...'"
    assert example in text

    spec = {
        "type": "function",
        "function": {k: declaration[k] for k in ("name", "description", "parameters")},
    }
    config = ToolConfig([Tool("sql_query", spec)], "function", "sql_query", parallel=False)
    context = ContextBuilder(tokenizer, WINDOW)
    prompt = context.build(
        None,
        History([], None),
        [{"type": "message", "role": "user", "content": "What were East China sales in 2026-Q3?"}],
        config,
        200,
        truncate=False,
    )
    assert len(prompt.token_ids) < WINDOW // 3
    assert "'2026-Q3' (the last quarter)" in tokenizer.decode(prompt.token_ids)


def test_a_database_without_tables_is_unavailable(tmp_path):
    empty = tmp_path / "empty.db"
    with sqlite3.connect(empty) as db:
        db.execute("PRAGMA user_version = 1")  # a real (empty) database file
    with pytest.raises(ToolUnavailable, match="has no tables"):
        SqlQuery(empty)
