"""The fast CPU default (int8 weights for steps of up to 12 rows, bfloat16 KV cache)
against the exact float32 configuration on the default model: perplexity on a fixed text
within 3%, and the same factual questions answered correctly (benchmarks/quality.py prints
the full comparison, opt-in modes included)."""

from __future__ import annotations

import pytest

from benchmarks.quality import FACTS, TEXT, answers, correct, perplexity
from engine import LLM


@pytest.fixture(scope="module")
def exact_and_fast():
    exact = LLM("smollm2-135m-instruct", dtype="float32", enable_prefix_caching=False)
    fast = LLM("smollm2-135m-instruct", enable_prefix_caching=False)
    assert fast.engine.quantization == "int8"
    return exact, fast


def test_fast_default_keeps_perplexity_within_three_percent(exact_and_fast):
    exact, fast = exact_and_fast
    base = perplexity(exact, TEXT)
    assert 5 < base < 60  # a sane value: the scorer itself works
    assert abs(perplexity(fast, TEXT) / base - 1) < 0.03


def test_fast_default_gives_the_same_factual_answers(exact_and_fast):
    exact, fast = exact_and_fast
    facts = [keyword for _, keyword in FACTS]
    right_exact = [correct(a, k) for a, k in zip(answers(exact), facts, strict=True)]
    right_fast = [correct(a, k) for a, k in zip(answers(fast), facts, strict=True)]
    assert sum(right_exact) >= len(FACTS) // 2  # the questions are within the model's reach
    assert right_fast == right_exact
