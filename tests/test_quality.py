"""The fast CPU default (w8a8: int8 weights, int8 activations at every row count with
SmoothQuant calibration, bfloat16 KV cache) against the exact float32 configuration on the
default model: perplexity on a fixed text within 1% (the README's claim; docs/performance.md
measures 0.07-0.76% for the default) where the int8 GEMM takes 8-bit weights, and within 5%
on the AVX2 target, whose GEMM takes weight codes in [-64, 64] and activation codes in
[-63, 63] (`kernels.native.int8_weight_range`, `int8_activation_limit`; 2.3% eager and 3.6%
compiled measured), and as many of 16 factual questions answered
correctly, give or take one: a question whose answer hangs on a first-token margin under
0.1 nat (the capital of France, in float32) flips under any perturbation, bfloat16
included. benchmarks/quality.py prints the full comparison.
"""

from __future__ import annotations

import pytest

import kernels.native
from benchmarks.quality import FACTS, TEXT, answers, correct, perplexity
from engine import LLM


@pytest.fixture(scope="module")
def exact_and_fast():
    exact = LLM("smollm2-135m-instruct", dtype="float32", enable_prefix_caching=False)
    # The default's steady state: compiled dense blocks ("auto" switches to them once built).
    fast = LLM("smollm2-135m-instruct", enable_prefix_caching=False, compile="on")
    assert fast.engine.quantization == "w8a8"
    return exact, fast


def test_fast_default_keeps_perplexity_close_to_float32(exact_and_fast):
    exact, fast = exact_and_fast
    base = perplexity(exact, TEXT)
    assert 5 < base < 60  # a sane value: the scorer itself works
    full_int8 = kernels.native.int8_weight_range(kernels.native.cpu_isa()) == (-128, 127)
    bound = 0.01 if full_int8 else 0.05
    assert abs(perplexity(fast, TEXT) / base - 1) < bound


def test_fast_default_answers_as_many_factual_questions(exact_and_fast):
    exact, fast = exact_and_fast
    facts = [keyword for _, keyword in FACTS]
    right_exact = sum(correct(a, k) for a, k in zip(answers(exact), facts, strict=True))
    right_fast = sum(correct(a, k) for a, k in zip(answers(fast), facts, strict=True))
    assert right_exact >= len(FACTS) // 2  # the questions are within the model's reach
    assert right_fast >= right_exact - 1
