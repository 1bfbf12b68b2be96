"""The load generator against the fake-engine server: it measures what it claims."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from tests.server.fake_engine import FakeEngine

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
    loadgen.main(["--base-url", f"{server.url}/v1", "--model", "fake-model",
                  "--concurrency", "1", "3", "--max-tokens", "10", "--json", str(out)])
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
