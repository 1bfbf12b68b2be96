"""The built-in tools: calculator, sql_query and code_interpreter, and their registry."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.errors import NotFoundError
from orchestrator.sandbox import Sandbox
from orchestrator.tools import ToolError, ToolUnavailable, builtin_tools
from orchestrator.tools.calculator import Calculator, calculate, format_number
from orchestrator.tools.code_interpreter import CodeInterpreter
from orchestrator.tools.file_search import FileSearch, FileSearchTool
from orchestrator.tools.sql_query import (
    DEMO_DATABASE,
    DEMO_SQL,
    MAX_READ_CHARS,
    MAX_RESULT_COLUMNS,
    MAX_TEMP_BYTES,
    SqlQuery,
    build_database,
)
from tests.orchestrator.sandbox_helpers import FAST


def execute(tool, **arguments):
    return asyncio.run(tool.execute(arguments, "call_test"))


# calculator


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("0.1 + 0.2", Fraction(3, 10)),
        ("1/3 + 1/6", Fraction(1, 2)),
        ("(1200 - 950) / 950 * 100", Fraction(500, 19)),
        ("2 ** 100", Fraction(2**100)),
        ("2 ** -3", Fraction(1, 8)),
        ("-7 // 2", Fraction(-4)),
        ("7 % 3", Fraction(1)),
        ("0.10000000000000000001 * 10", Fraction(10**19 + 1, 10**19)),
        ("1_000.5 * 2", Fraction(2001)),
        ("-2 ** 2", Fraction(-4)),
        ("2 ** 3 ** 2", Fraction(512)),
        ("2 ** -1 * 4", Fraction(2)),
        ("10 - 4 - 3", Fraction(3)),
        ("2 * 3 % 4", Fraction(2)),
        ("--3 + +2", Fraction(5)),
        ("1.5e3 + .5 + 2.", Fraction(3005, 2)),
        (" ( 1 + 2 ) * 3 ", Fraction(9)),
    ],
)
def test_calculator_is_exact(expression, value):
    assert calculate(expression) == value


def test_calculator_formats_exact_decimals_and_fractions():
    assert format_number(Fraction(3, 10)) == "0.3"
    assert format_number(Fraction(-1, 8)) == "-0.125"
    assert format_number(Fraction(2**100)) == str(2**100)
    assert format_number(Fraction(1, 3)) == "1/3 (≈ 0.333333333333)"
    assert execute(Calculator(), expression="(1200 - 950) / 950 * 100").text == (
        "500/19 (≈ 26.3157894737)"
    )


def test_calculator_answers_results_whose_exact_decimal_python_would_not_print():
    """1/2^6400 is exactly a 6,400-place decimal, whose 4,474 significant digits are past
    Python's int-to-text limit: it is given as a fraction, approximated in any range."""
    text = execute(Calculator(), expression="(1/2)**6400").text
    assert text.startswith(f"1/{2**6400}") and text.endswith("(≈ 2.55874938048e-1927)")


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os').system('true')", "unexpected '__import__' at position 0 (only numbers"),
        ("x + 1", "unexpected 'x' at position 0 (only numbers are allowed)"),
        ("(1).real", "unexpected '.' at position 3"),
        ("'a' * 3", 'unexpected "\'"'),
        ("[1, 2]", "unexpected '['"),
        ("2 ^ 3", "use ** for powers"),
        ("x = 2", "unexpected 'x'"),
        ("2 (3)", "unexpected '(' at position 2 (a function call or a missing operator?)"),
        ("1 / 0", "division by zero"),
        ("5 % (2 - 2)", "division by zero"),
        ("7 // 0.0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("2 ** 0.5", "whole-number exponents"),
        ("10 ** 100000", "exponents are limited"),
        ("(2 ** 10000) ** 10000", "too large"),
        ("(2 ** 9000) * (2 ** 9000)", "too large"),
        # refused before Fraction builds 10**999999999 (minutes and gigabytes)
        ("1e999999999 + 1", "exponent is limited"),
        ("1e-999999999", "exponent is limited"),
        ("1e3999 * 1e3999", "too large"),
        ("1 +", "unexpected end of the expression at position 3"),
        ("(1 + 2", "unexpected end of the expression"),
        ("1 + 2)", "unexpected ')' at position 5"),
        ("", "unexpected end of the expression at position 0"),
        ("True + 1", "unexpected 'True'"),
        ("(" * 500 + "1" + ")" * 500, "nested too deeply"),
        ("-" * 500 + "1", "nested too deeply"),
    ],
)
def test_calculator_refuses_what_is_not_bounded_arithmetic(expression, message):
    with pytest.raises(ToolError, match=re.escape(message)):
        calculate(expression)


def test_calculator_checks_its_argument():
    with pytest.raises(ToolError, match="'expression'"):
        execute(Calculator(), expression=7)
    with pytest.raises(ToolError, match="longer than"):
        execute(Calculator(), expression="1+" * 1000 + "1")


# sql_query


def test_a_constrained_calculator_call_holds_only_an_expression(tiny_chat_model_dir):
    """Its arguments' grammar (the tool's `parameters`) leaves no room for markup nor for an
    empty expression: a random model, which prefers any of the vocabulary's tokens, writes
    only expression characters, numbers and operators in turn."""
    from engine import LLM, SamplingParams, StructuredOutputsParams

    llm = LLM(tiny_chat_model_dir, device="cpu", num_threads=1, compile="off")
    grammar = StructuredOutputsParams(json=Calculator.parameters)
    params = [
        SamplingParams(max_tokens=40, temperature=1.0, seed=seed, structured_outputs=grammar)
        for seed in range(8)
    ]
    for out in llm.generate(["Compute."] * len(params), params, use_tqdm=False):
        text = out.outputs[0].text
        expression = re.search(r'"expression"\s*:\s*"([^"]*)("?)', text)
        assert expression is not None, text
        written, closed = expression.groups()
        assert re.fullmatch(r"[0-9eE_.+\-*/%() ]*", written), text
        if closed:  # a whole expression: numbers and operators in turn
            assert re.fullmatch(
                Calculator.parameters["properties"]["expression"]["pattern"], written
            ), text
            assert re.search("[0-9]", written), text


def test_the_demo_database_is_built_from_its_sql(tmp_path):
    built = tmp_path / "demo.db"
    build_database(DEMO_SQL, built)
    dump = [list(sqlite3.connect(path).iterdump()) for path in (built, DEMO_DATABASE)]
    assert dump[0] == dump[1]


def test_sql_query_answers_the_sales_question():
    tool = SqlQuery()
    assert "sales(region TEXT, quarter TEXT" in tool.description
    text = execute(
        tool,
        sql="SELECT SUM(revenue_usd) AS revenue FROM sales "
        "WHERE region = 'East China' AND quarter = '2026-Q3'",
    ).text
    expected = (
        sqlite3.connect(DEMO_DATABASE)
        .execute(
            "SELECT SUM(units * CASE product WHEN 'Tea' THEN 12.5 WHEN 'Coffee' THEN 18.0 "
            "ELSE 6.0 END) FROM sales WHERE region = 'East China' AND quarter = '2026-Q3'"
        )
        .fetchone()[0]
    )
    assert text == f"revenue\n{expected}\n(1 rows)"


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM sales",
        "UPDATE sales SET units = 0",
        "INSERT INTO regions VALUES ('Mars', 'Olympus')",
        "DROP TABLE sales",
        "CREATE TABLE t (x)",
        "CREATE TEMP TABLE t (x)",
        "ATTACH DATABASE 'file:/tmp/other.db' AS other",
        "PRAGMA writable_schema = 1",
        "PRAGMA table_info(sales)",
        "SELECT * FROM pragma_table_info('sales')",
        "BEGIN",
        "VACUUM",
        "SELECT fts3_tokenizer('simple')",  # a native pointer of the SQLite library
        "SELECT load_extension('x')",
        # seconds per huge-width field in one uninterruptible call
        "SELECT printf('%.*c%.*c', 999999999, 'a', 999999999, 'a')",
        "SELECT format('%d', 1)",
    ],
)
def test_sql_query_refuses_everything_but_reading(tmp_path, sql):
    database = tmp_path / "copy.db"
    database.write_bytes(DEMO_DATABASE.read_bytes())
    before = hashlib.sha256(database.read_bytes()).hexdigest()
    with pytest.raises(ToolError, match="only reading queries"):
        execute(SqlQuery(database), sql=sql)
    assert hashlib.sha256(database.read_bytes()).hexdigest() == before
    assert not (tmp_path / "other.db").exists()


def test_sql_query_limits_rows_and_time_and_reports_errors():
    tool = SqlQuery(max_rows=3, time_limit=0.2)
    text = execute(tool, sql="SELECT region FROM regions ORDER BY region").text
    assert text == (
        "region\nCentral China\nEast China\nNorth China\n(first 3 rows; the query returned more)"
    )
    with pytest.raises(ToolError, match=r"longer than 0\.2 s"):
        execute(
            tool,
            sql="WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
            "SELECT count(*) FROM c",
        )
    with pytest.raises(ToolError, match="one statement"):
        execute(tool, sql="SELECT 1; SELECT 2")
    with pytest.raises(ToolError, match="no such table: customers"):
        execute(tool, sql="SELECT * FROM customers")


def test_sql_query_bounds_what_one_function_call_and_the_rows_may_make():
    """Single function calls the progress handler cannot interrupt (a zeroblob of half a
    gigabyte, its hex) end at once; the rows' text is capped."""
    tool = SqlQuery(time_limit=5)
    with pytest.raises(ToolError, match="too big"):
        execute(tool, sql="SELECT zeroblob(540000000)")
    with pytest.raises(ToolError, match="too big"):
        execute(tool, sql="SELECT hex(zeroblob(20000000))")
    text = execute(tool, sql="SELECT hex(zeroblob(30000)) FROM regions").text
    assert len(text) < 70_000 and "truncated" in text


def test_sql_query_reads_no_more_rows_than_their_text_can_show():
    """Rows of large values (200 of 40 blobs each were 2 GB of CSV, built past the time
    limit) are read only until their text passes what the tool shows, and a row's width
    is bounded."""
    tool = SqlQuery(time_limit=5)
    rows = "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t LIMIT 200) "
    text = execute(tool, sql=rows + "SELECT n, hex(zeroblob(30000)) FROM t").text
    shown = int(re.search(r"\(first (\d+) rows; the query returned more\)$", text).group(1))
    assert shown * 60_000 <= MAX_READ_CHARS + 60_000
    assert len(text) < 70_000
    wide = ", ".join(["n"] * (MAX_RESULT_COLUMNS + 1))
    with pytest.raises(ToolError, match=f"at most {MAX_RESULT_COLUMNS} "):
        execute(tool, sql=f"{rows}SELECT {wide} FROM t")
    assert "(1 rows)" in execute(tool, sql="SELECT " + ", ".join(["1"] * MAX_RESULT_COLUMNS)).text


def test_sql_query_bounds_the_temporary_storage_a_query_writes():
    """A sort that outgrows memory spills to SQLite's temporary files: ordering rows of
    64 KB values wrote 5 GB to /var/tmp within the 5 s time limit. The query stops once
    its thread has written MAX_TEMP_BYTES, long before its time limit."""
    rows = "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) "
    with pytest.raises(ToolError, match=f"more than {MAX_TEMP_BYTES >> 20} MiB of temporary"):
        execute(
            SqlQuery(time_limit=10), sql=f"{rows}SELECT n, hex(zeroblob(32000)) FROM t ORDER BY -n"
        )


def test_sql_query_without_its_database_is_unavailable(tmp_path):
    with pytest.raises(ToolUnavailable, match="does not exist"):
        SqlQuery(tmp_path / "missing.db")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database" * 100)
    with pytest.raises(ToolUnavailable, match="cannot be read"):
        SqlQuery(garbage)


# code_interpreter


def test_code_interpreter_returns_logs_and_images():
    png = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()
    tool = CodeInterpreter(Sandbox(FAST))
    out = execute(
        tool,
        code=f"import base64\nprint(6 * 7)\n"
        f"open('chart.png', 'wb').write(base64.b64decode('{png}'))\n",
    )
    # the listing is in the logs: the model reads a run's logs, in this turn and later ones;
    # the last line's value (the bytes written) shows as a notebook shows it
    logs = "42\n12\n[files written: chart.png (12 bytes)]"
    assert out.outputs == [
        {"type": "logs", "logs": logs},
        {"type": "image", "url": f"data:image/png;base64,{png}"},
    ]
    assert out.text == logs


def test_code_interpreter_reports_errors_and_limits_as_logs():
    tool = CodeInterpreter(Sandbox(replace(FAST, wall_seconds=1)))
    failed = execute(tool, code="print('before')\nraise KeyError('k')")
    assert failed.text.startswith("before\nTraceback")
    assert failed.text.endswith("KeyError: 'k'\n[exit status 1]")
    slow = execute(tool, code="import time\ntime.sleep(30)")
    assert slow.text == "[stopped: the run took longer than 1 s]"
    assert execute(tool, code="x = 1").text == "[no output]"


def test_an_argument_holding_a_lone_surrogate_is_refused_by_name():
    """JSON's `\\ud800` escape (which the call grammar allows) decodes to no text: a query
    or code holding it failed with UnicodeEncodeError, logged as the tool's fault and shown
    to the model as that exception's name only."""
    tools = [
        (Calculator(), "expression"),
        (SqlQuery(), "sql"),
        (CodeInterpreter(Sandbox(FAST)), "code"),
    ]
    for tool, name in tools:
        with pytest.raises(ToolError, match=f"argument '{name}' is not text"):
            execute(tool, **{name: "SELECT 1 -- \ud800"})


# registry


def test_registry_declares_tools_and_explains_missing_ones():
    registry = builtin_tools(sandbox=Sandbox(bwrap="/nonexistent/bwrap"))
    assert set(registry.tools) == {"calculator", "sql_query"}
    declaration = registry.declaration("calculator")
    assert declaration["parameters"]["required"] == ["expression"]
    assert declaration["type"] == "function" and declaration["name"] == "calculator"
    with pytest.raises(ToolUnavailable, match="bubblewrap"):
        registry.get("code_interpreter")
    with pytest.raises(ToolUnavailable, match="no built-in tool 'weather'"):
        registry.get("weather")
    assert set(builtin_tools().tools) == {"calculator", "sql_query", "code_interpreter"}


def test_a_requests_tools_are_sorted_into_builtins_and_client_functions():
    registry = builtin_tools()
    weather = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
    resolved = registry.resolve(
        [
            {"type": "code_interpreter", "container": {"type": "auto"}},
            {"type": "function", "name": "calculator"},
            weather,
        ],
        defaults=["sql_query", "calculator"],
    )
    assert set(resolved.builtins) == {"sql_query", "calculator", "code_interpreter"}
    assert resolved.client_functions == ["get_weather"]
    names = [d["name"] for d in resolved.declarations]
    assert sorted(names) == ["calculator", "code_interpreter", "get_weather", "sql_query"]
    assert registry.declaration("sql_query") in resolved.declarations
    assert weather in resolved.declarations


def test_resolving_a_tool_this_server_cannot_run_names_the_entry():
    registry = builtin_tools(sandbox=Sandbox(bwrap="/nonexistent/bwrap"))
    with pytest.raises(ToolUnavailable, match=r"tools\[1\]: the code sandbox needs bubblewrap"):
        registry.resolve(
            [
                {"type": "function", "name": "calculator"},
                {"type": "code_interpreter", "container": {"type": "auto"}},
            ]
        )
    # Another name without parameters is the client's function, taking none (OpenAI's
    # `parameters: null`), not a built-in this server lacks.
    ping = {"type": "function", "name": "ping", "description": "Ping.", "parameters": None}
    resolved = registry.resolve([ping, {"type": "function", "name": "x"}])
    assert resolved.client_functions == ["ping", "x"] and not resolved.builtins
    with pytest.raises(ToolUnavailable, match=r"tools\[0\]\.container"):
        builtin_tools().resolve([{"type": "code_interpreter", "container": "cntr_1"}])
    # Files to copy in, or limits of its own, would be ignored: refused, naming the field.
    for key, value in (("file_ids", ["file_1"]), ("memory_limit", "4g")):
        container = {"type": "auto", key: value}
        with pytest.raises(ToolUnavailable, match=rf"^tools\[0\]\.container\.{key}: "):
            builtin_tools().resolve([{"type": "code_interpreter", "container": container}])
    empty = {"type": "auto", "file_ids": [], "memory_limit": None}
    assert builtin_tools().resolve([{"type": "code_interpreter", "container": empty}]).builtins


@given(
    st.recursive(
        st.integers(-(10**6), 10**6).map(str),
        lambda inner: st.tuples(inner, st.sampled_from(["+", "-", "*"]), inner).map(
            lambda t: f"({t[0]} {t[1]} {t[2]})"
        ),
        max_leaves=20,
    )
)
def test_calculator_agrees_with_python_on_integer_arithmetic(expression):
    assert calculate(expression) == eval(expression)  # the oracle, on generated text


def test_calculator_is_safe_to_call_from_many_threads():
    expressions = ["1/3 + 1/6", "(1200 - 950) / 950 * 100", "2 ** 100 - 1"] * 200
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(calculate, expressions))
    assert results == [calculate(e) for e in expressions]


# file_search


class _StoreDeleted:
    """A file_search backend whose store was deleted after the turn began."""

    async def search_stores(self, owner, vector_store_ids, searches):
        raise NotFoundError(f"No vector store found with id '{vector_store_ids[0]}'.")


def test_file_search_on_a_store_deleted_mid_turn_is_the_tools_error_not_a_fault():
    """The model reads why (the tool's error), and no server fault is logged."""
    search = FileSearch(_StoreDeleted(), "alice", FileSearchTool(["vs_gone"]), "glaciers?")
    with pytest.raises(ToolError, match="No vector store found with id 'vs_gone'"):
        asyncio.run(search.execute({"queries": ["glaciers"]}, "call_1"))
