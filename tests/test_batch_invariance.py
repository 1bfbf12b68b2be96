"""The default CPU mode is batch-invariant: a request's tokens and logprobs are bit-identical
whether it runs alone or shares every step with other requests' prefill chunks and decodes
(int8 GEMMs are exact, every other op is per row, and decode rows of a mixed step still take
the decode kernel). This holds eagerly for a prompt prefilled in one piece, and after the
compile step, where the default mode runs engine/native_layers.py's C++ layers (decode
steps in one call, the same per-row code as the blocks of mixed steps), however prompts are
chunked."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams


@pytest.mark.parametrize("compile_mode", ["off", "on"])
def test_a_request_computes_the_same_alone_and_in_a_busy_mixed_batch(tiny_model_dir, compile_mode):
    path = tiny_model_dir("llama")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    prompt = list(range(5, 25))
    solo = LLM(path, device="cpu", compile=compile_mode)
    alone = solo.generate(prompt, params, use_tqdm=False)[0].outputs[0]

    # A small token budget chunks the long prompts behind it across the request's decode
    # steps, so nearly every step mixes decode rows with prefill rows.
    llm = LLM(path, device="cpu", max_num_batched_tokens=24, compile=compile_mode)
    assert llm.engine.quantization == "w8a8"
    others = [list(range(100 + 7 * i, 190 + 7 * i)) for i in range(4)]
    busy = llm.generate([prompt, *others], params, use_tqdm=False)[0].outputs[0]

    assert busy.token_ids == alone.token_ids
    assert [lp.logprob for lp in busy.logprobs] == [lp.logprob for lp in alone.logprobs]
    assert [lp.top for lp in busy.logprobs] == [lp.top for lp in alone.logprobs]


def test_a_prompt_chunked_behind_others_computes_the_same_as_alone(tiny_model_dir):
    """The prompt comes last: its first chunk shares a step with the others' prefill, the
    rest a step with their decodes. On the C++ kernels each prompt token attends with the
    decode kernel over its own context, however the prompt was cut. (Eagerly it does not
    hold: ATen's fused attention rounds a token's scores differently with the number of
    query rows in its call; docs/performance.md, "w8a8 is batch-invariant".)"""
    path = tiny_model_dir("llama")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)
    prompt = list(range(5, 70))
    llm = LLM(path, device="cpu", max_num_batched_tokens=128, compile="on")
    alone = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    others = [list(range(100 + 7 * i, 141 + 7 * i)) for i in range(3)]  # 41 tokens each
    busy = llm.generate([*others, prompt], params, use_tqdm=False)[-1].outputs[0]
    assert busy.token_ids == alone.token_ids
    assert [lp.logprob for lp in busy.logprobs] == [lp.logprob for lp in alone.logprobs]
