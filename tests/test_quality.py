"""The fast CPU default (w8a8: int8 weights, int8 activations at every row count with
SmoothQuant calibration, bfloat16 KV cache) against the exact float32 configuration on the
default model: perplexity on a fixed text within 1% (the README's claim; docs/performance.md
measures 0.07-0.76% for the default), and as many of 16 factual questions answered
correctly, give or take one: a question whose answer hangs on a first-token margin under
0.1 nat (the capital of France, in float32) flips under any perturbation, bfloat16
included. benchmarks/quality.py prints the full comparison.
"""

from __future__ import annotations

import pytest

from benchmarks.quality import FACTS, TEXT, answers, correct, perplexity
from engine import LLM


@pytest.fixture(scope="module")
def exact_and_fast():
    exact = LLM("smollm2-135m-instruct", dtype="float32", enable_prefix_caching=False)
    # The default's steady state: compiled dense blocks ("auto" switches to them once built).
    fast = LLM("smollm2-135m-instruct", enable_prefix_caching=False, compile="on")
    assert fast.engine.quantization == "w8a8"
    return exact, fast


def test_fast_default_keeps_perplexity_within_one_percent(exact_and_fast):
    exact, fast = exact_and_fast
    base = perplexity(exact, TEXT)
    assert 5 < base < 60  # a sane value: the scorer itself works
    assert abs(perplexity(fast, TEXT) / base - 1) < 0.01


def test_fast_default_answers_as_many_factual_questions(exact_and_fast):
    exact, fast = exact_and_fast
    facts = [keyword for _, keyword in FACTS]
    right_exact = sum(correct(a, k) for a, k in zip(answers(exact), facts, strict=True))
    right_fast = sum(correct(a, k) for a, k in zip(answers(fast), facts, strict=True))
    assert right_exact >= len(FACTS) // 2  # the questions are within the model's reach
    assert right_fast >= right_exact - 1
