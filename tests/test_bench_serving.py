"""The serving benchmark: its prompt set, server handling, transformers timing and table,
and a quick run against the real tokenmill server."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import httpx
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serving.py"
_spec = importlib.util.spec_from_file_location("bench_serving", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_serving"] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)

# Answers 200 to every GET, on the port given as its argument: a stand-in server.
_OK_SERVER = """
import http.server, sys
class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Ok).serve_forever()
"""


_COMPILING_SERVER = """
import http.server, json, sys
answers = iter(["compiling"] * 3)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"status": "ok", "compile": next(answers, "ready")}).encode()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def test_prompts_are_distinct_and_about_130_tokens():
    from engine.loader import resolve_model
    from engine.loader.gguf import read_gguf
    from engine.tokenizer import Tokenizer

    prompts = bench.bench_prompts()
    assert len(set(prompts)) == len(prompts) >= 109  # the default sweep never repeats one
    tokenizer = Tokenizer.from_gguf(read_gguf(resolve_model("smollm2-135m-instruct").path).metadata)
    lengths = [len(tokenizer.encode_chat([{"role": "user", "content": p}])) for p in prompts]
    assert min(lengths) >= 120 and max(lengths) <= 140
    assert abs(sum(lengths) / len(lengths) - 130) < 5


def test_a_sweep_that_would_repeat_a_prompt_is_refused(capsys):
    # 16 streams x 200 requests would send prompts the prefix cache already holds.
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--concurrency", "16", "--min-requests", "200", "--skip-transformers"])
    assert exit_info.value.code == 2
    assert "more than the 160 distinct prompts" in capsys.readouterr().err


def _row(system, concurrency, tok_s, ttft):
    return bench.Row(system, concurrency, 2 * concurrency, 0, tok_s, ttft, 2 * ttft, 10.0, 20.0)


def test_table_groups_by_streams_and_puts_ratios_on_tokenmill_rows():
    rows = [
        _row("tokenmill", 1, 40.0, 100.0),
        _row("tokenmill", 4, 120.0, 200.0),
        _row("llama.cpp", 1, 80.0, 400.0),
        _row("llama.cpp", 4, 60.0, 800.0),
        _row("transformers", 1, 10.0, 50.0),
        _row("transformers", 4, 30.0, 90.0),
    ]
    lines = bench.table(rows).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[-3:] == ["tok/s vs transformers", "tok/s vs llama.cpp", "TTFT vs llama.cpp"]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [(c[0], c[1]) for c in cells] == [
        ("tokenmill", "1"),
        ("llama.cpp", "1"),
        ("transformers", "1"),
        ("tokenmill", "4"),
        ("llama.cpp", "4"),
        ("transformers", "4"),
    ]
    assert cells[0][-3:] == ["4.00x", "0.50x", "0.25x"]
    assert cells[3][-3:] == ["4.00x", "2.00x", "0.25x"]
    assert cells[1][-3:] == ["", "", ""]

    without_llama = bench.table([r for r in rows if r.system != "llama.cpp"]).splitlines()
    assert "llama.cpp" not in without_llama[0]
    assert without_llama[2].rstrip(" |").endswith("4.00x")


def test_rounds_alternate_the_systems_and_report_medians(monkeypatch, capsys):
    """Each round runs every system once, in turn; the table gives each measure's median
    over the rounds, and each round's own ratios are listed beneath it."""
    order = []
    tok_s = {"tokenmill": iter([400.0, 300.0, 460.0]), "transformers": iter([100.0, 80.0, 90.0])}

    def fake_server(system, argv_for, args, prompts):
        order.append(system)
        return [_row(system, 16, next(tok_s[system]), 500.0)]

    def fake_transformers(args, path, prompt_ids, pad_id):
        order.append("transformers")
        return [_row("transformers", 16, next(tok_s["transformers"]), 900.0)]

    monkeypatch.setattr(bench, "measure_server", fake_server)
    monkeypatch.setattr(bench, "measure_transformers", fake_transformers)
    rows = bench.main(["--concurrency", "16", "--rounds", "3"])
    assert order == ["tokenmill", "transformers"] * 3
    assert [r.round for r in rows] == [0, 0, 1, 1, 2, 2]

    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| tokenmill")]
    cells = [c.strip() for c in table[0].strip("|").split("|")]
    assert cells[3] == "400.0" and cells[-1] == "4.44x"  # median 400 over median 90
    assert "- 16 streams, tok/s vs transformers: 4.00x, 3.75x, 5.11x" in out
    assert "3 rounds" in out and "round by round" in out


def test_rounds_of_tokenmill_alone_list_no_ratios(monkeypatch, capsys):
    tok_s = iter([400.0, 300.0])
    monkeypatch.setattr(
        bench, "measure_server", lambda system, *_: [_row(system, 16, next(tok_s), 500.0)]
    )
    bench.main(["--concurrency", "16", "--rounds", "2", "--skip-transformers"])
    out = capsys.readouterr().out
    assert " 350.0 |" in out  # the median of the two rounds
    assert "Tokenmill over each baseline" not in out  # no baseline: no ratios to list


def test_rounds_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--rounds", "0", "--skip-transformers"])
    assert exit_info.value.code == 2
    assert "--rounds must be at least 1" in capsys.readouterr().err


def test_medians_take_each_measure_over_the_rounds_and_sum_failures():
    rows = [
        bench.Row("tokenmill", 4, 8, 1, 100.0, 50.0, 90.0, 10.0, 30.0, round=0),
        bench.Row("tokenmill", 4, 8, 0, 140.0, 70.0, 80.0, 12.0, 20.0, round=1),
        bench.Row("tokenmill", 4, 8, 2, 120.0, 60.0, 99.0, 11.0, 25.0, round=2),
    ]
    (row,) = bench.medians(rows)
    assert row == bench.Row("tokenmill", 4, 8, 3, 120.0, 60.0, 90.0, 11.0, 25.0)


def test_llama_server_gets_a_slot_per_stream_with_room_for_each_request():
    args = bench.build_parser().parse_args(
        ["--llama-server", "/opt/llama-server", "--llama-args", "--flash-attn on"]
    )
    argv = bench.llama_argv(args, "/m.gguf", 135, port=8123)
    assert argv[0] == "/opt/llama-server" and argv[-2:] == ["--flash-attn", "on"]
    slots = int(argv[argv.index("-np") + 1])
    assert slots == 32 and "-cb" in argv
    assert int(argv[argv.index("-c") + 1]) >= slots * (135 + 128)


def test_server_dying_at_start_up_is_reported_with_its_output():
    argv = [sys.executable, "-c", "import sys; print('no model here'); sys.exit(3)"]
    with (
        pytest.raises(RuntimeError, match=r"(?s)code 3.*no model here"),
        bench.running_server("dummy", argv, bench.free_port(), timeout=30),
    ):
        pass


def test_server_is_stopped_when_the_run_fails():
    port = bench.free_port()
    with (
        pytest.raises(ValueError),
        bench.running_server(
            "ok", [sys.executable, "-c", _OK_SERVER, str(port)], port, timeout=30
        ) as url,
    ):
        assert httpx.get(f"{url}/health").status_code == 200
        raise ValueError("the benchmark broke")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=2)


def test_tokenmill_is_measured_only_once_its_background_compile_is_done():
    port = bench.free_port()
    argv = [sys.executable, "-c", _COMPILING_SERVER, str(port)]
    with bench.running_server("tokenmill", argv, port, timeout=30) as url:
        assert httpx.get(f"{url}/health").json()["compile"] == "ready"


def test_transformers_baseline_times_every_step(tiny_model_dir):
    args = argparse.Namespace(concurrency=[1, 3], tokens=6)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    rows = bench.measure_transformers(args, tiny_model_dir("llama"), prompts, pad_id=0)
    assert [(r.system, r.concurrency, r.requests) for r in rows] == [
        ("transformers", 1, 1),
        ("transformers", 3, 3),
    ]
    for row in rows:
        assert row.output_tok_s > 0 and row.failed == 0
        assert 0 < row.ttft_p50_ms == row.ttft_p99_ms  # one batch: one first step
        assert 0 < row.itl_p50_ms <= row.itl_p99_ms


def test_quick_run_against_tokenmill(tmp_path, capsys):
    """The harness end to end on the real server, without the embedder, which nothing here
    uses. The server keeps its background compile: eager (`--compile off`) its w8a8 steps
    run on ATen's int8 GEMM, and the run took 11.1 s against 8.0 s (quiet AMD EPYC,
    avx512_vnni)."""
    out = tmp_path / "serving.md"
    rows = bench.main(
        [
            "--quick",
            "--skip-transformers",
            "--tokenmill-args=--no-embeddings",
            "--markdown",
            str(out),
        ]
    )
    assert [(r.system, r.concurrency, r.requests, r.failed) for r in rows] == [
        ("tokenmill", 1, 4, 0),
        ("tokenmill", 4, 8, 0),
    ]
    for row in rows:
        assert row.output_tok_s > 0
        assert 0 < row.ttft_p50_ms <= row.ttft_p99_ms
        assert 0 < row.itl_p50_ms <= row.itl_p99_ms
    captured = capsys.readouterr()
    assert "16 output tokens" in captured.out and "load average before/after" in captured.out
    assert "expected" not in captured.err  # no warning: each request gave exactly 16 tokens
    table = [line for line in out.read_text().splitlines() if line.startswith("|")]
    assert len(table) == 4  # header, rule, one row per level
    assert [line.split("|")[1].strip() for line in table[2:]] == ["tokenmill", "tokenmill"]
