"""End-to-end engine behaviour on tiny random models: greedy parity with
transformers under staggered arrivals, prefix hits, chunked prefill and
preemption; sampling parameters; n > 1; aborts."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
import transformers

from engine import LLM, SamplingParams
from engine.errors import NothingToSampleError
from engine.outputs import merge_output
from tests.conftest import TEST_DEVICE

MAX_NEW = 12


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def _hf_greedy(path: str, prompts: list[list[int]], max_new: int = MAX_NEW) -> list[list[int]]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        out = hf.generate(
            ids,
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            do_sample=False,
            attention_mask=torch.ones_like(ids),
        )
        outs.append(out[0, len(p) :].tolist())
    return outs


def _greedy(max_new: int = MAX_NEW) -> SamplingParams:
    # min_tokens == max_tokens suppresses EOS exactly as transformers' min_new_tokens.
    return SamplingParams(temperature=0, max_tokens=max_new, min_tokens=max_new)


def _llm(path: str, **options) -> LLM:
    # A fixed pool: on CUDA the default would claim 90% of the device for each engine.
    options.setdefault("num_kv_blocks", 512)
    return LLM(path, device=str(TEST_DEVICE), dtype="float32", **options)


def _run_staggered(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Submit the prompts a few at a time between engine steps."""
    engine = llm.engine
    results: dict[str, object] = {}
    pending = list(enumerate(prompts))
    while pending or engine.has_unfinished_requests():
        for _ in range(2):
            if pending:
                i, p = pending.pop(0)
                engine.add_request(str(i), p, params)
        for delta in engine.step():
            results[delta.request_id] = merge_output(results.get(delta.request_id), delta)
    return [results[str(i)].outputs[0].token_ids for i in range(len(prompts))]


SCENARIOS = {
    "plain": {},
    "chunked-prefill": {"max_num_batched_tokens": 8},
    "preemption": {"num_kv_blocks": 6, "block_size": 16, "max_model_len": 96},
    "no-prefix-cache": {"enable_prefix_caching": False},
    "nan-poisoned-pool": {},
}


@pytest.fixture(scope="module")
def greedy_case(tiny_model_dir):
    """arch -> (path, prompts, transformers' greedy continuations), computed once."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            path = tiny_model_dir(arch)
            # Mixed lengths; two prompts share a long prefix so the prefix cache is hit.
            prompts = _prompts(384, [5, 40, 17, 1, 33, 64])
            prompts.append(prompts[1][:32] + prompts[2][:9])
            prompts.append(list(prompts[1]))
            cache[arch] = path, prompts, _hf_greedy(path, prompts)
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_greedy_matches_transformers(greedy_case, arch, scenario):
    path, prompts, expected = greedy_case(arch)
    llm = _llm(path, **SCENARIOS[scenario])
    if scenario == "nan-poisoned-pool":
        _poison(llm)  # the pool is not zeroed at start-up
    assert _run_staggered(llm, prompts, _greedy()) == expected
    if scenario == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0
    bm = llm.engine.block_manager
    assert bm.num_used_blocks == 0


def test_prefix_cache_hit_is_reported_and_correct(tiny_model_dir):
    path = tiny_model_dir("llama")
    llm = _llm(path)
    system = _prompts(384, [48], seed=3)[0]
    first, second = [*system, 5, 6, 7], [*system, 9, 10]
    out1 = llm.generate(first, _greedy())[0]
    out2 = llm.generate(second, _greedy())[0]
    assert out1.num_cached_tokens == 0
    assert out2.num_cached_tokens == 48
    assert out2.outputs[0].token_ids == _hf_greedy(path, [second])[0]


def test_prefix_cache_entries_are_shared_only_within_a_cache_salt(tiny_model_dir):
    """A salted request reuses blocks only of its own salt (a server's user), whether they
    were cached by an earlier request or by one admitted in the same step; what it
    computes is the same."""
    path = tiny_model_dir("llama")
    llm = _llm(path)
    system = _prompts(384, [48], seed=3)[0]
    prompt = [*system, 5, 6, 7]

    def cached(salts: list[str | None]) -> list[int]:
        params = [dataclasses.replace(_greedy(), cache_salt=salt) for salt in salts]
        outs = llm.generate([prompt] * len(salts), params, use_tqdm=False)
        assert all(o.outputs[0].token_ids == outs[0].outputs[0].token_ids for o in outs)
        return [o.num_cached_tokens for o in outs]

    assert cached(["alice"]) == [0]
    assert cached(["bob", None, "alice"]) == [0, 0, 48]
    assert cached(["bob", "bob", None]) == [48, 48, 48]
    with pytest.raises(ValueError, match="cache_salt"):
        SamplingParams(cache_salt="")


def _poison(llm: LLM) -> None:
    """Fill the KV pool with NaN: a slot read before this engine wrote it spoils the output."""
    for cache in (*llm.engine.runner.k_caches, *llm.engine.runner.v_caches):
        cache.fill_(float("nan"))


def test_prompts_admitted_together_compute_their_shared_prefix_once(tiny_model_dir):
    path = tiny_model_dir("llama")
    llm = _llm(path)
    _poison(llm)
    system = _prompts(384, [48], seed=3)[0]
    prompts = [[*system, 5, 6, 7], [*system, 9, 10], [*system[:20], 11]]
    outs = llm.generate(prompts, _greedy(), use_tqdm=False)  # all three in the first step
    # the second reads the 48 tokens the first writes in the same step; the third shares one
    # whole block (16 of its 20 tokens)
    assert [o.num_cached_tokens for o in outs] == [0, 48, 16]
    assert [o.outputs[0].token_ids for o in outs] == _hf_greedy(path, prompts)


def test_a_failed_step_leaves_no_unwritten_block_in_the_prefix_cache(tiny_model_dir, monkeypatch):
    from engine.errors import BatchFailedError

    path = tiny_model_dir("llama")
    llm = _llm(path)
    _poison(llm)
    system = _prompts(384, [48], seed=4)[0]
    prompts = [[*system, 5, 6, 7], [*system, 9, 10]]
    run = llm.engine.runner.run
    monkeypatch.setattr(llm.engine.runner, "run", lambda *a: 1 / 0)
    with pytest.raises(BatchFailedError):
        llm.generate(prompts, _greedy(), use_tqdm=False)
    assert llm.engine.requests == {} and llm.engine.block_manager.num_used_blocks == 0
    monkeypatch.setattr(llm.engine.runner, "run", run)
    outs = llm.generate(prompts, _greedy(), use_tqdm=False)
    assert [o.num_cached_tokens for o in outs] == [0, 48]  # nothing kept from the failed step
    assert [o.outputs[0].token_ids for o in outs] == _hf_greedy(path, prompts)


def test_seeded_sampling_is_independent_of_the_batch(tiny_model_dir):
    llm = _llm(tiny_model_dir("llama"))
    prompt = _prompts(384, [20], seed=5)[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10)
    alone = llm.generate(prompt, params)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.8, max_tokens=16) for _ in range(5)]
    busy = (
        llm.generate([*_prompts(384, [7, 30, 12, 3, 25], seed=6), prompt], [*others, params])[-1]
        .outputs[0]
        .token_ids
    )
    assert alone == busy
    assert len(alone) == 10


def test_engine_seed_none_seeds_the_random_numbers_at_random(tiny_model_dir):
    """vLLM's LLM(seed=None): requests without a seed of their own draw from a seed chosen
    at start, not from a fixed one (the default, 0, makes runs repeat)."""
    path = tiny_model_dir("llama")
    _llm(path)
    assert torch.initial_seed() == 0
    seeds = set()
    for _ in range(2):
        _llm(path, seed=None)
        seeds.add(torch.initial_seed())
    assert len(seeds) == 2 and 0 not in seeds


def test_vllm_dtype_half_loads_the_model_in_float16(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), device=str(TEST_DEVICE), dtype="half", num_kv_blocks=64)
    assert llm.engine.dtype == torch.float16
    (out,) = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 2


def test_max_tokens_and_stop_token(tiny_model_dir):
    path = tiny_model_dir("llama")
    llm = _llm(path)
    prompt = _prompts(384, [10], seed=8)[0]
    full = llm.generate(prompt, _greedy(8))[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 8
    stop_at = full.token_ids[3]
    params = SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_at])
    out = llm.generate(prompt, params)[0].outputs[0]
    first = full.token_ids.index(stop_at)
    assert out.token_ids == full.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at


def test_outputs_carry_vllms_request_metrics_in_the_order_things_happened(tiny_model_dir):
    """vLLM's RequestOutput.metrics, as benchmark scripts read them (TTFT as
    first_token_time - arrival_time): with room for one sequence, the second request waits
    in the queue until the first has finished."""
    llm = _llm(tiny_model_dir("llama"), max_num_seqs=1)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first, second = (out.metrics for out in llm.generate(_prompts(384, [9, 5]), params))
    for m in (first, second):
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time
        assert m.first_token_time <= m.last_token_time <= m.finished_time
        assert m.time_in_queue == m.first_scheduled_time - m.arrival_time
    assert second.first_scheduled_time >= first.finished_time
    # It waited from its own arrival, a little after the first's, until the first finished.
    assert second.arrival_time >= first.arrival_time
    assert second.time_in_queue >= first.finished_time - second.arrival_time
    scored = llm.generate([1, 2, 3], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert scored.metrics.first_token_time is None  # no token was generated
    assert scored.metrics.finished_time >= scored.metrics.first_scheduled_time


def test_n_completions_share_the_prompt(tiny_model_dir):
    llm = _llm(tiny_model_dir("llama"))
    prompt = _prompts(384, [37], seed=9)[0]
    out = llm.generate(
        prompt, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    )[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 6 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    greedy = llm.generate(
        prompt, SamplingParams(n=2, temperature=0, max_tokens=6, ignore_eos=True)
    )[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids
    assert llm.engine.block_manager.num_used_blocks == 0


def test_n_beyond_max_num_seqs_waits_its_turn(tiny_model_dir):
    """Siblings that do not fit the running batch wait in the queue: the batch never holds
    more than max_num_seqs sequences, and every completion is the one it is with room to
    fork (seeded sampling does not depend on the batch)."""
    path = tiny_model_dir("llama")
    prompt = _prompts(384, [37], seed=9)[0]
    params = SamplingParams(n=5, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    roomy = _llm(path).generate(prompt, params)[0]
    engine = _llm(path, max_num_seqs=2).engine
    engine.add_request("0", prompt, params)
    merged, most_running = None, 0
    while engine.has_unfinished_requests():
        for delta in engine.step():
            merged = merge_output(merged, delta)
        most_running = max(most_running, len(engine.scheduler.running))
    assert most_running == 2
    assert [o.token_ids for o in merged.outputs] == [o.token_ids for o in roomy.outputs]
    assert len({tuple(o.token_ids) for o in roomy.outputs}) > 1
    assert engine.block_manager.num_used_blocks == 0


def test_abort_in_every_state_frees_all_blocks(tiny_model_dir):
    llm = _llm(tiny_model_dir("llama"), max_num_batched_tokens=16, num_kv_blocks=40)
    engine, bm = llm.engine, llm.engine.block_manager
    free_at_start = bm.num_free_blocks + bm.num_evictable_blocks
    params = SamplingParams(temperature=0, max_tokens=50, n=2)
    prompts = _prompts(384, [40, 5, 70, 9], seed=11)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    engine.step()  # "0" is mid-prefill (chunked), the rest wait
    engine.abort_request("3")  # waiting
    engine.abort_request("0")  # running, mid-prefill
    for _ in range(6):
        engine.step()
    engine.abort_request("1")  # decoding, forked
    engine.abort_request("2")
    assert not engine.has_unfinished_requests()
    assert bm.num_used_blocks == 0
    assert bm.num_free_blocks + bm.num_evictable_blocks == free_at_start


def test_stats_count_finished_sequences_by_reason(tiny_model_dir):
    """As vLLM's request_success counter: each of a request's n sequences, by its reason."""
    llm = _llm(tiny_model_dir("llama"))
    engine = llm.engine
    length = SamplingParams(max_tokens=2, n=2, ignore_eos=True)
    stop = SamplingParams(max_tokens=5, allowed_token_ids=[5], stop_token_ids=[5])
    llm.generate([[1, 2, 3], [4, 5, 6]], [length, stop], use_tqdm=False)
    engine.add_request("gone", [1, 2, 3], SamplingParams(max_tokens=50))
    engine.abort_request("gone")
    assert engine.stats().finished_total == {"length": 2, "stop": 1, "abort": 1}


def test_a_request_failing_in_the_engine_fails_the_offline_call_cleanly(
    tiny_model_dir, monkeypatch
):
    """LLM.generate raises the failed request's error and leaves no request behind, so
    the next call starts clean."""
    from engine.errors import RequestFailedError

    llm = _llm(tiny_model_dir("llama"))
    append = llm.engine.outputs.append

    def append_or_fail(seq, *args, **kwargs):
        if seq.request.request_id == "1":
            raise TypeError("detokenizer exploded")
        return append(seq, *args, **kwargs)

    monkeypatch.setattr(llm.engine.outputs, "append", append_or_fail)
    prompts = _prompts(384, [5, 6, 7])
    with pytest.raises(RequestFailedError, match="detokenizer exploded"):
        llm.generate(prompts, _greedy(), use_tqdm=False)
    assert llm.engine.requests == {} and llm.engine.block_manager.num_used_blocks == 0
    monkeypatch.setattr(llm.engine.outputs, "append", append)
    assert len(llm.generate(prompts, _greedy(), use_tqdm=False)) == 3


def test_a_refused_prompt_leaves_none_of_the_call_behind(tiny_model_dir):
    """A prompt after good ones fails validation: the good ones do not run on into the
    next call."""
    llm = _llm(tiny_model_dir("llama"))
    with pytest.raises(ValueError, match="prompt token ids must be integers"):
        llm.generate([[5, 6, 7], [5, 9999]], _greedy(), use_tqdm=False)
    assert llm.engine.requests == {} and not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "user"}], r"messages\[0\] has no 'content'"),
        ([{"content": "hi"}], r"messages\[0\] must be a dict with a string 'role'"),
        (["hi"], r"messages\[0\] must be a dict"),
    ],
)
def test_chat_messages_of_the_wrong_shape_are_value_errors(tiny_chat_model_dir, messages, message):
    llm = _llm(tiny_chat_model_dir)
    with pytest.raises(ValueError, match=message):
        llm.chat(messages, _greedy(), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_prompts_the_engine_cannot_honour_are_value_errors_naming_them(tiny_chat_model_dir):
    """A vLLM prompt dict's keys beyond the text or token ids (images, its cache_salt) are
    refused rather than dropped, and a prompt of the wrong type is a ValueError saying so,
    not a TypeError from inside the engine or token ids read as text."""
    llm = _llm(tiny_chat_model_dir)
    for prompt, message in (
        ({"prompt": "Hi", "multi_modal_data": {"image": "x"}}, "multi_modal_data"),
        ({"prompt": "Hi", "cache_salt": "u1"}, "cache_salt"),
        ({"prompt": 5}, "'prompt' must be text"),
        ({"prompt_token_ids": "Hi"}, "'prompt_token_ids' must be a list of token ids"),
        ({"prompt_token_ids": 5}, "'prompt_token_ids' must be a list of token ids"),
        ([True, 2], "prompt token ids must be integers"),
    ):
        with pytest.raises(ValueError, match=message):
            llm.generate(prompt, _greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt must be text or a list of token ids"):
        llm.engine.add_request("r", 5, _greedy())
    assert not llm.engine.has_unfinished_requests()


def test_stop_token_ids_must_be_in_the_vocabulary(tiny_model_dir):
    llm = _llm(tiny_model_dir("llama"))
    with pytest.raises(ValueError, match="stop_token_ids must be token ids below"):
        llm.generate([1, 2, 3], SamplingParams(stop_token_ids=[384]), use_tqdm=False)


def _hf_prompt_logprobs(path: str, prompt: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at every prompt position: row p scores p + 1."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


@pytest.mark.parametrize("chunk", [2048, 16])
def test_prompt_logprobs_score_every_prompt_token_as_transformers_does(tiny_model_dir, chunk):
    """Each prompt token's logprob given the tokens before it, with the top alternatives;
    the prompt is computed in full (here in chunks of 16 too), even when a request before
    it left its prefix in the cache."""
    path = tiny_model_dir("llama")
    llm = _llm(path, max_num_batched_tokens=chunk)
    prompt = _prompts(384, [53], seed=5)[0]
    llm.generate(prompt, _greedy(), use_tqdm=False)  # its blocks now in the prefix cache
    params = dataclasses.replace(_greedy(), prompt_logprobs=3, logprobs=1)
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    assert out.num_cached_tokens == 0
    scored = out.prompt_logprobs
    assert len(scored) == len(prompt) and scored[0] is None
    assert [lp.token_id for lp in scored[1:]] == prompt[1:]
    reference = _hf_prompt_logprobs(path, prompt)
    expected = reference[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    got = torch.tensor([lp.logprob for lp in scored[1:]])
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)
    for p, lp in enumerate(scored[1:]):
        top = reference[p].topk(3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
    assert llm.generate(prompt, _greedy(), use_tqdm=False)[0].num_cached_tokens == 48
    assert llm.engine.block_manager.num_used_blocks == 0


def test_prompt_logprobs_arrive_once_in_a_stream_of_deltas(tiny_model_dir):
    llm = _llm(tiny_model_dir("llama"))
    prompt = _prompts(384, [20], seed=6)[0]
    engine = llm.engine
    engine.add_request("r", prompt, dataclasses.replace(_greedy(4), prompt_logprobs=0))
    deltas = []
    while engine.has_unfinished_requests():
        deltas += engine.step()
    carried = [d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None]
    assert len(deltas) == 4 and len(carried) == 1 and deltas[0].prompt_logprobs is carried[0]
    assert len(carried[0]) == 20 and all(lp.top == [] for lp in carried[0][1:])
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)


def test_max_tokens_zero_scores_the_prompt_and_generates_nothing(tiny_model_dir):
    """A prompt scored alone (max_tokens 0, what the completions endpoint's echo-only
    scoring sends): its prompt logprobs, the same as a request that continues it has, and
    no output token, in the output or in the engine's generation counter."""
    llm = _llm(tiny_model_dir("llama"))
    prompt = _prompts(384, [20], seed=7)[0]
    params = dataclasses.replace(_greedy(1), prompt_logprobs=2)
    continued = llm.generate(prompt, params, use_tqdm=False)[0]
    before = llm.engine.stats().generation_tokens_total
    params = SamplingParams(max_tokens=0, prompt_logprobs=2, logprobs=1, n=2)
    scored = llm.generate(prompt, params, use_tqdm=False)[0]
    for got, expected in zip(
        scored.prompt_logprobs[1:], continued.prompt_logprobs[1:], strict=True
    ):
        assert [t for t, _ in got.top] == [t for t, _ in expected.top]
        assert got.logprob == pytest.approx(expected.logprob, abs=1e-4)
    assert [(o.token_ids, o.text, o.finish_reason) for o in scored.outputs] == [
        ([], "", "length")
    ] * 2
    assert llm.engine.stats().generation_tokens_total == before
    assert llm.engine.block_manager.num_used_blocks == 0


def test_vllm_prompt_dicts_chat_content_parts_and_options(tiny_chat_model_dir):
    """What vLLM scripts pass: TextPrompt / TokensPrompt dicts, OpenAI content parts and a
    tool-call turn without content, tensor_parallel_size=1, get_tokenizer()."""
    llm = _llm(tiny_chat_model_dir, tensor_parallel_size=1)
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=0)
    by_ids = llm.generate({"prompt_token_ids": [1, 2, 3]}, params, use_tqdm=False)[0]
    assert (
        by_ids.outputs[0].token_ids
        == llm.generate([1, 2, 3], params, use_tqdm=False)[0].outputs[0].token_ids
    )
    text = llm.generate([{"prompt": "Hello"}], params, use_tqdm=False)[0]
    assert text.prompt_token_ids == llm.get_tokenizer().encode("Hello")
    out = text.outputs[0]
    assert text.finished and out.finished() and out.finish_reason == "length"
    assert out.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in out.logprobs))
    first = out.token_ids[0]
    spelled = llm.get_tokenizer().decode([first], skip_special_tokens=False)
    assert out.logprobs[0][first].decoded_token == spelled
    scored = llm.generate("Hello there", dataclasses.replace(params, prompt_logprobs=1))[0]
    second = scored.prompt_token_ids[1]
    assert scored.prompt_logprobs[1][second].decoded_token == (
        llm.get_tokenizer().decode([second], skip_special_tokens=False)
    )
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}],
        }
    ]
    plain = [{"role": "user", "content": "Hi\nthere"}]
    assert llm.chat(parts, params, use_tqdm=False)[0].prompt_token_ids == (
        llm.chat(plain, params, use_tqdm=False)[0].prompt_token_ids
    )
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    turns = [*plain, {"role": "assistant", "content": None, "tool_calls": [call]}]
    assert llm.chat(turns, params, use_tqdm=False)[0].outputs[0].token_ids
    for bad, message in (
        (123, "prompts must be"),
        ({"text": "x"}, "needs 'prompt'"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "only text parts"),
    ):
        with pytest.raises(ValueError, match=message):
            (llm.chat if isinstance(bad, list) else llm.generate)(bad, params, use_tqdm=False)
    for options in ({"max_tokens": 3}, [{"max_tokens": 3}]):
        with pytest.raises(TypeError, match="sampling_params must be SamplingParams, got dict"):
            llm.generate("Hi", options, use_tqdm=False)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        _llm(tiny_chat_model_dir, tensor_parallel_size=2)


def test_chat_template_kwargs_continue_final_message_and_prompt_text(tiny_chat_model_dir, tmp_path):
    """vLLM's LLM.chat options: chat_template_kwargs reach the template (and override the
    named options, as vLLM merges them), continue_final_message extends the last message
    instead of opening a turn, and each output's prompt is the rendered text."""
    folder = shutil.copytree(tiny_chat_model_dir, tmp_path / "model")
    template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
        "{% if enable_thinking is defined and not enable_thinking %}<no-think>{% endif %}"
    )
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    llm = _llm(str(folder))
    params = SamplingParams(temperature=0, max_tokens=2)
    user = [{"role": "user", "content": "Hi"}]
    [out] = llm.chat(user, params, use_tqdm=False, chat_template_kwargs={"enable_thinking": False})
    assert out.prompt == "<user>Hi\n<assistant><no-think>"
    assert out.prompt_token_ids == llm.tokenizer.encode_chat(user, enable_thinking=False)
    [out] = llm.chat(
        user, params, use_tqdm=False, chat_template_kwargs={"add_generation_prompt": False}
    )
    assert out.prompt == "<user>Hi\n"
    started = [*user, {"role": "assistant", "content": "Sure, "}]
    outs = llm.chat(
        [user, started],
        params,
        use_tqdm=False,
        add_generation_prompt=False,
        continue_final_message=True,
    )
    assert [o.prompt for o in outs] == ["<user>Hi", "<user>Hi\n<assistant>Sure, "]
    with pytest.raises(ValueError, match="continue_final_message and add_generation_prompt"):
        llm.chat(started, params, use_tqdm=False, continue_final_message=True)
    for kwargs, message in (
        ([("a", 1)], "chat_template_kwargs must be a dict"),
        ({"messages": []}, "messages"),
    ):
        with pytest.raises(ValueError, match=message):
            llm.chat(user, params, use_tqdm=False, chat_template_kwargs=kwargs)


def test_chat_hands_tool_call_arguments_to_the_template_as_dicts(tiny_chat_model_dir, tmp_path):
    """As vLLM's LLM.chat: an OpenAI tool call's arguments (a JSON string) reach the
    template parsed, so a template writing them with `tojson` (Qwen2.5's) renders JSON, not
    a quoted string; arguments that are not JSON are left as written."""
    folder = shutil.copytree(tiny_chat_model_dir, tmp_path / "model")
    template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
        "{% for c in m.tool_calls or [] %}{{ c.function.arguments | tojson }}{% endfor %}|"
        "{% endfor %}"
    )
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    llm = _llm(str(folder))
    calls = [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
        {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "not json"}},
    ]
    turn = {"role": "assistant", "content": None, "tool_calls": calls}
    [out] = llm.chat(
        [{"role": "user", "content": "Hi"}, turn],
        SamplingParams(max_tokens=1),
        use_tqdm=False,
        add_generation_prompt=False,
    )
    assert out.prompt == '<user>Hi|<assistant>{"x": 1}"not json"|'
    assert calls[0]["function"]["arguments"] == '{"x": 1}'  # the caller's messages unchanged


def test_the_window_cuts_the_output_not_the_request(tiny_chat_model_dir):
    """As in vLLM's engine: max_tokens past the window ends the output with "length" where
    the window does; a prompt that fills it gets one token (the last token sampled is
    never fed back); only a prompt longer than the window is refused."""
    llm = _llm(tiny_chat_model_dir, max_model_len=32)
    params = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
    for prompt, expected in ((list(range(1, 33)), 1), (list(range(1, 21)), 12)):
        [out] = llm.generate(prompt, params, use_tqdm=False)
        assert len(out.outputs[0].token_ids) == expected
        assert out.outputs[0].finish_reason == "length"
    with pytest.raises(ValueError, match="maximum context length is 32"):
        llm.generate(list(range(1, 34)), SamplingParams(max_tokens=1), use_tqdm=False)


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(tiny_chat_model_dir):
    """As vLLM's: k keeps the last k tokens, -1 the window's worth, so a prompt longer than
    the window runs."""
    llm = _llm(tiny_chat_model_dir, max_model_len=32)
    prompt = list(range(1, 41))
    for keep, kept in ((5, prompt[-5:]), (-1, prompt[-32:])):
        params = SamplingParams(max_tokens=1, truncate_prompt_tokens=keep)
        [out] = llm.generate(prompt, params, use_tqdm=False)
        assert out.prompt_token_ids == kept


def test_a_window_above_the_models_own_is_refused(tiny_chat_model_dir):
    """As vLLM refuses it: positions past the model's window were never trained, so a
    larger max_model_len is an error, not silently the model's window."""
    with pytest.raises(
        ValueError, match=r"max_model_len 513 is above the context window of .*: 512 tokens"
    ):
        _llm(tiny_chat_model_dir, max_model_len=513)
    assert _llm(tiny_chat_model_dir, max_model_len=512).engine.max_model_len == 512


def test_allowed_token_ids_confine_what_the_engine_generates(tiny_chat_model_dir):
    llm = _llm(tiny_chat_model_dir)
    allowed = [5, 9, 42]
    params = [
        SamplingParams(temperature=0, max_tokens=6, allowed_token_ids=allowed, ignore_eos=True),
        SamplingParams(temperature=1, seed=3, max_tokens=6, allowed_token_ids=allowed),
    ]
    for out in llm.generate([[1, 2, 3], [4, 5, 6]], params, use_tqdm=False):
        assert out.outputs[0].token_ids and set(out.outputs[0].token_ids) <= set(allowed)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        llm.generate([1, 2], SamplingParams(allowed_token_ids=[10**6]), use_tqdm=False)


def test_bad_words_never_complete_in_the_output(tiny_chat_model_dir):
    """vLLM's bad_words: the words an unconstrained run wrote do not appear, as a start
    of the text or after a space; a run without them is unchanged."""
    llm = _llm(tiny_chat_model_dir)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    [free] = llm.generate([[1, 2, 3]], params, use_tqdm=False)
    tokenizer = llm.engine.tokenizer
    words = [w for w in free.outputs[0].text.split() if w.strip()][:3]
    assert words  # the tiny model writes something
    banned = dataclasses.replace(params, bad_words=words)
    [out, again] = llm.generate([[1, 2, 3], [1, 2, 3]], [banned, params], use_tqdm=False)
    assert again.outputs[0].token_ids == free.outputs[0].token_ids
    ids = out.outputs[0].token_ids
    for word in words:
        for seq in (tokenizer.encode(word), tokenizer.encode(" " + word)):
            windows = (ids[i : i + len(seq)] for i in range(len(ids) - len(seq) + 1))
            assert list(seq) not in windows, (word, seq)


def test_a_kv_cache_smaller_than_the_window_is_refused(tiny_chat_model_dir):
    """A sequence could outgrow such a pool before its window ends and then wait forever
    for blocks (as vLLM, the engine refuses to start)."""
    with pytest.raises(ValueError, match=r"holds 96 tokens .* context window of 512"):
        _llm(tiny_chat_model_dir, num_kv_blocks=6, block_size=16)
    [out] = _llm(tiny_chat_model_dir, num_kv_blocks=6, block_size=16, max_model_len=96).generate(
        [1, 2, 3], SamplingParams(max_tokens=10**6, ignore_eos=True), use_tqdm=False
    )
    assert len(out.outputs[0].token_ids) == 93 and out.outputs[0].finish_reason == "length"


def test_a_prompt_that_fills_a_window_as_large_as_the_kv_cache_gets_its_token(
    tiny_chat_model_dir,
):
    """The pool may hold exactly the window; a prompt that fills both still fits (its one
    sampled token is never fed back), so it is answered, not refused."""
    llm = _llm(tiny_chat_model_dir, num_kv_blocks=6, block_size=16, max_model_len=96)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    [out] = llm.generate(list(range(1, 97)), params, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"
    assert llm.engine.block_manager.num_used_blocks == 0


def test_constraints_that_leave_no_token_fail_their_request_alone(tiny_chat_model_dir):
    """allowed_token_ids whose only token is a bad word: nothing is left to sample, so
    the request fails with a clear error instead of emitting a forbidden token."""
    llm = _llm(tiny_chat_model_dir)
    tokenizer = llm.engine.tokenizer
    word = next(w for w in ("a", "the", "is", "x", "1") if len(tokenizer.encode(w)) == 1)
    [token] = tokenizer.encode(word)
    params = SamplingParams(temperature=0, max_tokens=4, allowed_token_ids=[token])
    with pytest.raises(NothingToSampleError, match="no token was left"):
        llm.generate([1, 2, 3], dataclasses.replace(params, bad_words=[word]), use_tqdm=False)
    [out] = llm.generate([1, 2, 3], params, use_tqdm=False)  # the engine goes on
    assert set(out.outputs[0].token_ids) == {token}


def test_detokenize_false_gives_token_ids_without_text(tiny_chat_model_dir):
    """vLLM's detokenize=False: the same tokens, no text (no logprob's decoded_token
    either); stop strings need the text."""
    llm = _llm(tiny_chat_model_dir)
    params = SamplingParams(
        temperature=0, max_tokens=5, ignore_eos=True, logprobs=1, prompt_logprobs=1
    )
    [with_text] = llm.generate([1, 2, 3], params, use_tqdm=False)
    raw = dataclasses.replace(params, detokenize=False)
    [without] = llm.generate([1, 2, 3], raw, use_tqdm=False)
    assert without.outputs[0].token_ids == with_text.outputs[0].token_ids
    assert with_text.outputs[0].text and without.outputs[0].text == ""

    def decoded(out):
        positions = [*out.outputs[0].logprobs, *out.prompt_logprobs[1:]]
        return {entry.decoded_token for position in positions for entry in position.values()}

    assert None not in decoded(with_text) and decoded(without) == {None}
    with pytest.raises(ValueError, match="detokenize"):
        SamplingParams(stop=["x"], detokenize=False)
