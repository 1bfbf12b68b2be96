"""LLM.beam_search, vLLM's: width 1 is greedy, wider finds at least as likely sequences,
and on a model of a four-token vocabulary it finds exactly the best sequences that trying
every one of them finds."""

from __future__ import annotations

import asyncio
import itertools
import math

import pytest
import torch
import transformers

from engine import LLM, AsyncLLM, BeamSearchParams, SamplingParams
from engine.errors import EngineShutdownError, EngineStoppedError
from tests.conftest import TINY, save_random_model

EOS = 2  # LlamaConfig's default eos_token_id


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(
        tiny_model_dir("llama"),
        device="cpu",
        compile="off",
        dtype="float32",
        quantization="none",
        num_kv_blocks=512,
    )


@pytest.fixture(scope="module")
def four_tokens(tmp_path_factory):
    """A tiny random Llama whose vocabulary is four tokens (EOS is 2): the engine on it,
    and its transformers twin to score sequences by brute force."""
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(**{**TINY, "vocab_size": 4}, eos_token_id=EOS)
    path = tmp_path_factory.mktemp("tiny-vocab4")
    model = save_random_model(cfg, path, std=0.5)
    return LLM(
        str(path),
        device="cpu",
        compile="off",
        dtype="float32",
        quantization="none",
        num_kv_blocks=64,
    ), model.eval()


def _logprob(model, prompt: list[int], continuation: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + continuation])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(continuation))


def test_width_one_is_greedy(llm):
    prompts = [[5, 9, 200, 17], [300, 1, 2, 3, 4, 5, 6]]
    greedy = llm.generate(
        prompts,
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0),
        use_tqdm=False,
    )
    beams = llm.beam_search(prompts, BeamSearchParams(beam_width=1, max_tokens=6, ignore_eos=True))
    for prompt, g, b in zip(prompts, greedy, beams, strict=True):
        [best] = b.sequences
        assert best.tokens == prompt + g.outputs[0].token_ids
        assert best.cum_logprob == pytest.approx(g.outputs[0].cumulative_logprob, abs=1e-4)
        assert best.finish_reason == "length" and best.text is None  # no tokenizer
        assert len(best.logprobs) == 6 and best.tokens[-1] in best.logprobs[-1]


def test_a_wider_beam_finds_likelier_sequences_than_greedy_scored_as_transformers_does(
    llm, tiny_model_dir
):
    """Every beam's cum_logprob is its continuation's logprob under the model; width 4
    finds likelier sequences than greedy on these prompts but one (beam search does not
    promise it for every prompt: greedy's prefix can fall out of the beam)."""
    prompts = [[i, 7 * i % 384, 11] for i in range(1, 6)]
    greedy = llm.generate(
        prompts,
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0),
        use_tqdm=False,
    )
    params = BeamSearchParams(beam_width=4, max_tokens=8, ignore_eos=True, length_penalty=0.0)
    beams = llm.beam_search(prompts, params)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    better = 0
    for prompt, g, b in zip(prompts, greedy, beams, strict=True):
        scores = [s.cum_logprob for s in b.sequences]
        assert len(scores) == 4 and scores == sorted(scores, reverse=True)
        for s in b.sequences:
            expected = _logprob(model, prompt, s.tokens[len(prompt) :])
            assert s.cum_logprob == pytest.approx(expected, abs=1e-4)
        better += scores[0] > g.outputs[0].cumulative_logprob + 1e-4
    assert better == 4


@pytest.mark.parametrize("width,length", [(4, 2), (9, 3)])
def test_a_beam_as_wide_as_the_prefixes_finds_the_best_sequences_exactly(
    four_tokens, width, length
):
    """With as many beams as there are prefixes one token short, no prefix is dropped:
    beam search's sequences are the best of all 4**length, as brute force ranks them."""
    llm, model = four_tokens
    prompt = [1, 3, 0]
    params = BeamSearchParams(
        beam_width=width, max_tokens=length, ignore_eos=True, length_penalty=0.0
    )
    [out] = llm.beam_search([prompt], params)
    every = {
        seq: _logprob(model, prompt, list(seq))
        for seq in itertools.product(range(4), repeat=length)
    }
    best = sorted(every, key=every.get, reverse=True)[:width]
    assert [tuple(s.tokens[len(prompt) :]) for s in out.sequences] == best
    for s in out.sequences:
        assert s.cum_logprob == pytest.approx(every[tuple(s.tokens[len(prompt) :])], abs=1e-4)


def test_beams_end_at_eos_and_rank_with_the_rest(four_tokens):
    """EOS finishes a beam ("stop"), which is ranked with the unfinished ones; the
    brute-force best of every sequence that EOS ends or max_tokens cuts is what comes back.
    The EOS stays in the tokens only with include_stop_str_in_output."""
    llm, model = four_tokens
    for prompt in map(list, itertools.product(range(4), repeat=3)):
        every = {(EOS,): _logprob(model, prompt, [EOS])}
        for a in (0, 1, 3):
            for b in range(4):
                every[(a, b)] = _logprob(model, prompt, [a, b])
        best = sorted(every, key=every.get, reverse=True)[:4]
        if (EOS,) in best and any(len(seq) == 2 and seq[-1] == EOS for seq in best):
            break  # a prompt whose best sequences end at EOS at either step
    else:
        pytest.fail("no prompt of the model's makes a case of EOS")
    kept = BeamSearchParams(
        beam_width=4, max_tokens=2, length_penalty=0.0, include_stop_str_in_output=True
    )
    [out] = llm.beam_search([prompt], kept)
    assert [tuple(s.tokens[len(prompt) :]) for s in out.sequences] == best
    for s, seq in zip(out.sequences, best, strict=True):
        assert s.finish_reason == ("stop" if seq[-1] == EOS else "length")
        assert s.stop_reason == (EOS if seq[-1] == EOS else None)
    [dropped] = llm.beam_search([prompt], BeamSearchParams(4, 2, length_penalty=0.0))
    for s, seq in zip(dropped.sequences, best, strict=True):
        assert s.tokens[len(prompt) :] == [t for t in seq if t != EOS]
        assert s.cum_logprob == pytest.approx(every[seq], abs=1e-4)


def test_the_length_penalty_divides_by_the_sequence_length_as_vllm_does(four_tokens):
    """vLLM's score: cumulative logprob / len(tokens) ** length_penalty, the prompt counted."""
    llm, _ = four_tokens
    prompt = [0, 1]
    params = BeamSearchParams(beam_width=3, max_tokens=2, length_penalty=2.0)
    [out] = llm.beam_search([prompt], params)
    scores = [s.cum_logprob / len(s.tokens) ** 2.0 for s in out.sequences]
    assert scores == sorted(scores, reverse=True)


def test_text_is_the_whole_sequence_as_vllm_gives_it(tiny_chat_model_dir):
    llm = LLM(tiny_chat_model_dir, device="cpu", compile="off", num_threads=1)
    [out] = llm.beam_search(["The sky is"], BeamSearchParams(beam_width=2, max_tokens=3))
    for s in out.sequences:
        assert s.text == llm.tokenizer.decode(s.tokens)
        assert s.text.startswith("The sky is")


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"beam_width": 0, "max_tokens": 4}, "beam_width"),
        ({"beam_width": 11, "max_tokens": 4}, "beam_width"),
        ({"beam_width": 2, "max_tokens": 0}, "max_tokens"),
        ({"beam_width": 2, "max_tokens": 4, "temperature": -1}, "temperature"),
        ({"beam_width": 2, "max_tokens": 4, "length_penalty": math.inf}, "length_penalty"),
        ({"beam_width": 2, "max_tokens": 4, "length_penalty": 1e308}, "length_penalty"),
        ({"beam_width": 2, "max_tokens": 4, "length_penalty": -11}, "length_penalty"),
        ({"beam_width": 2, "max_tokens": 4, "ignore_eos": 1}, "ignore_eos"),
    ],
)
def test_bad_beam_search_params_are_refused_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BeamSearchParams(**kwargs)


def test_bad_calls_are_clear_errors(llm):
    with pytest.raises(TypeError, match="BeamSearchParams"):
        llm.beam_search([[1, 2]], SamplingParams())
    with pytest.raises(ValueError, match="list of prompts"):
        llm.beam_search("a prompt", BeamSearchParams(2, 2))
    assert llm.beam_search([], BeamSearchParams(2, 2)) == []


# -- AsyncLLM.beam_search -----------------------------------------------------------------

ENGINE = dict(device="cpu", compile="off", dtype="float32", quantization="none")


def _async_search(engine, prompt, params, request_id="beam", on_abort=None):
    async def run():
        outs = [o async for o in engine.beam_search(prompt, params, request_id, on_abort)]
        assert len(outs) == 1 and outs[0].finished  # vLLM's: the result once, at the end
        return outs[0]

    return run()


@pytest.mark.parametrize("width", [1, 3])
def test_async_beam_search_equals_the_offline_one_while_it_batches_with_other_work(
    llm, tiny_model_dir, width
):
    """Each step's beams are engine requests, batched with another caller's generation
    running meanwhile; the result is the offline search's, each beam a completion of its
    generated tokens, best first; `num_generated_tokens` is every token the engine made for
    the search (one per live beam a step), and no block stays in use."""
    prompt = [5, 9, 200, 17]
    params = BeamSearchParams(beam_width=width, max_tokens=6, ignore_eos=True)
    [offline] = llm.beam_search([prompt], params)

    async def run():
        engine = AsyncLLM(model=tiny_model_dir("llama"), num_kv_blocks=512, **ENGINE)
        batches: list[set[str]] = []
        schedule = engine.engine.scheduler.schedule

        def recording():
            batch = schedule()
            batches.append({s.request.request_id for s in batch.seqs})
            return batch

        engine.engine.scheduler.schedule = recording
        other = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        try:
            await _drain(engine.generate([1, 2, 3], other, "other"))
            task = asyncio.ensure_future(_drain(engine.generate([7, 8, 9], other, "other2")))
            out = await _async_search(engine, prompt, params)
            await task
            while engine.stats().num_running or engine.engine.requests:  # stats lag a step
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            generated = engine.stats().generation_tokens_total - 2 * 200
            return out, batches, generated, engine.engine.block_manager.num_used_blocks
        finally:
            await engine.shutdown()

    out, batches, generated, used = asyncio.run(run())
    assert [prompt + o.token_ids for o in out.outputs] == [s.tokens for s in offline.sequences]
    assert [o.index for o in out.outputs] == list(range(width))
    for o, s in zip(out.outputs, offline.sequences, strict=True):
        assert o.cumulative_logprob == pytest.approx(s.cum_logprob, abs=1e-5)
        assert o.finish_reason == "length" and o.text == ""  # no tokenizer
        assert [lp.token_id for lp in o.logprobs] == o.token_ids
    assert out.prompt_token_ids == prompt
    assert out.num_generated_tokens == generated == 1 + width * 5
    assert any("other2" in b and any(i.startswith("beam-") for i in b) for b in batches)
    assert used == 0


async def _drain(stream) -> None:
    async for _ in stream:
        pass


def test_async_beam_search_ends_at_eos_as_the_offline_one(four_tokens, tmp_path_factory):
    """A beam EOS finishes ranks with the rest, as offline, the EOS kept in the tokens or
    not as include_stop_str_in_output says."""
    llm, _ = four_tokens
    path = llm.engine.args.model
    engine = AsyncLLM(model=path, num_kv_blocks=64, **ENGINE)
    try:
        for keep in (False, True):
            for prompt in map(list, itertools.product(range(4), repeat=2)):
                params = BeamSearchParams(4, 3, length_penalty=0.0, include_stop_str_in_output=keep)
                [offline] = llm.beam_search([prompt], params)
                out = asyncio.run(_async_search(engine, prompt, params, f"p{keep}{prompt}"))
                got = [(prompt + o.token_ids, o.finish_reason, o.stop_reason) for o in out.outputs]
                want = [(s.tokens, s.finish_reason, s.stop_reason) for s in offline.sequences]
                assert got == want
    finally:
        asyncio.run(engine.shutdown())
    assert any(s.stop_reason == EOS for s in offline.sequences)


@pytest.mark.parametrize("how", ["cancel", "abort"])
def test_a_stopped_async_beam_search_ends_its_requests_and_frees_their_blocks(tiny_model_dir, how):
    """A client gone mid-search (its task cancelled) or `abort(request_id)` ends the step's
    requests; no step runs after and no block stays in use. Cancelled, `on_abort` reports
    every token the search generated and its prompt's cache hit (for metering); aborted,
    it yields the best beams so far, the live ones finished with "abort", and the count."""
    prompt = list(range(1, 40))
    cached = 32  # the primed prompt's whole blocks (of 16), as the first step finds them

    async def run():
        engine = AsyncLLM(model=tiny_model_dir("llama"), num_kv_blocks=512, **ENGINE)
        reported: list[tuple[int, int]] = []
        params = BeamSearchParams(beam_width=4, max_tokens=400, ignore_eos=True)
        one = SamplingParams(temperature=0, max_tokens=1)
        try:
            await _drain(engine.generate(prompt, one, "primed"))  # the prompt, now cached
            stream = engine.beam_search(prompt, params, "b", lambda *c: reported.append(c))
            task = asyncio.ensure_future(stream.__anext__())
            while engine.stats().generation_tokens_total < 1 + 4 * 5:
                await asyncio.sleep(0.01)
            if how == "cancel":
                task.cancel()
            else:
                await engine.abort("b")
            [out] = await asyncio.gather(task, return_exceptions=True)
            # Idle: nothing submitted left to take in, no request left (read in the engine
            # itself: its stats() snapshot lags a step behind).
            while not engine._inbox.empty() or engine.engine.has_unfinished_requests():
                await asyncio.sleep(0.01)
            stats = engine.engine.stats()
            await asyncio.sleep(0.3)  # nothing more runs
            assert engine.engine.stats().generation_tokens_total == stats.generation_tokens_total
            return out, reported, stats, engine.engine.block_manager.num_used_blocks
        finally:
            await engine.shutdown()

    out, reported, stats, used = asyncio.run(run())
    assert used == 0 and stats.kv_cache_usage == 0
    generated = stats.generation_tokens_total - 1  # the primed request's token aside
    assert generated < 4 * 400
    if how == "cancel":
        assert isinstance(out, asyncio.CancelledError)
        assert reported == [(generated, cached)]
    else:
        assert reported == [] and out.finished and out.num_generated_tokens == generated
        assert [o.finish_reason for o in out.outputs] == ["abort"] * 4
        assert out.num_cached_tokens == cached


def test_a_search_submitted_to_a_stopped_engine_says_none_of_it_was_computed(tiny_model_dir):
    """A search whose first step meets an engine already shut down raises
    EngineStoppedError (a server charges none of its prompt); one the stop meets between
    steps had its earlier steps computed, so it raises the shutdown's plain error."""
    params = BeamSearchParams(beam_width=2, max_tokens=4, ignore_eos=True)

    async def run() -> tuple[BaseException, BaseException]:
        engine = AsyncLLM(model=tiny_model_dir("llama"), num_kv_blocks=64, **ENGINE)
        generate = engine.generate
        steps: list[str] = []

        def stopping_after_the_first_step(prompt, step_params, request_id, on_abort=None):
            steps.append(request_id)
            if not request_id.startswith("late-0-"):  # as if the stop came after step 0
                raise EngineStoppedError("the engine is shut down")
            return generate(prompt, step_params, request_id, on_abort)

        try:
            engine.generate = stopping_after_the_first_step
            [late] = await asyncio.gather(
                _async_search(engine, [5, 9, 200], params, "late"), return_exceptions=True
            )
            engine.generate = generate
        finally:
            await engine.shutdown()
        [early] = await asyncio.gather(
            _async_search(engine, [5, 9, 200], params, "early"), return_exceptions=True
        )
        assert any(s.startswith("late-1-") for s in steps)
        return early, late

    early, late = asyncio.run(run())
    assert isinstance(early, EngineStoppedError)
    assert isinstance(late, EngineShutdownError) and not isinstance(late, EngineStoppedError)
