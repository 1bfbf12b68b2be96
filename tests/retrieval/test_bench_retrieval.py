"""The retrieval benchmark's collection and metrics (the run itself is a benchmark)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_retrieval.py"
_spec = importlib.util.spec_from_file_location("bench_retrieval", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_retrieval"] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)


def test_metrics_for_one_relevant_document():
    ranked = ["a", "b", "c", "d", "e", "f"]
    assert bench.recall_at(ranked, "e", 5) == 1.0
    assert bench.recall_at(ranked, "f", 5) == 0.0
    assert bench.ndcg_at(ranked, "a", 10) == 1.0
    assert bench.ndcg_at(ranked, "c", 10) == pytest.approx(1 / math.log2(4))
    assert bench.ndcg_at(ranked, "z", 10) == 0.0
    assert bench.percentile([5.0, 1.0, 3.0], 0.5) == 3.0


def test_summary_and_body_split():
    doc = "Return the thing that was asked for here.\n\n" + "More detail. " * 20
    query, body = bench._summary_and_body(doc)
    assert query == "Return the thing that was asked for here."
    assert body.startswith("More detail.") and "Return" not in body
    assert bench._summary_and_body("Too short.\n\n" + "word " * 40) is None
    assert bench._summary_and_body("A summary with enough words here.\n\nshort body") is None
