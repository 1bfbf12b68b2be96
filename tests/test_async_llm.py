"""AsyncLLM: streamed deltas add up to the offline result, aborts free blocks at once,
and an engine failure ends requests with an error instead of hanging them."""

from __future__ import annotations

import asyncio
import dataclasses
import os

import pytest
import torch

from engine import LLM, AsyncLLM, SamplingParams
from engine.async_llm import MAX_FAILED_STEPS
from engine.errors import EngineError, RequestFailedError
from engine.sampling_params import RequestOutputKind
from tests.conftest import record_event_loop_calls

DELTA = RequestOutputKind.DELTA


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def tiny_path(tiny_model_dir):
    return tiny_model_dir("llama")


def test_streamed_deltas_equal_offline_output(tiny_path):
    params = SamplingParams(
        temperature=0, max_tokens=10, ignore_eos=True, n=2, logprobs=2, output_kind=DELTA
    )
    prompts = [_prompt(n, i) for i, n in enumerate([9, 30, 3])]
    offline = LLM(tiny_path, device="cpu", compile="off").generate(prompts, params)

    async def stream_all():
        engine = AsyncLLM(model=tiny_path, device="cpu", compile="off")

        async def one(i, prompt):
            tokens: dict[int, list[int]] = {0: [], 1: []}
            finished = []
            async for out in engine.generate(prompt, params, request_id=f"r{i}"):
                for o in out.outputs:
                    tokens[o.index] += o.token_ids
                    assert o.logprobs is not None and len(o.logprobs) == len(o.token_ids)
                    if o.finish_reason:
                        finished.append(o.finish_reason)
            assert out.finished and finished == ["length", "length"]
            return tokens

        try:
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        finally:
            await engine.shutdown()

    streamed = asyncio.run(stream_all())
    for off, got in zip(offline, streamed, strict=True):
        assert [o.token_ids for o in off.outputs] == [got[0], got[1]]


def test_outputs_are_cumulative_by_default_as_in_vllm_or_only_the_final_one(tiny_path):
    """vLLM's default: each output holds everything so far (and stays as it was yielded);
    FINAL_ONLY yields the finished request alone; both add up to the deltas."""
    base = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)

    async def collect(kind: RequestOutputKind) -> list:
        engine = AsyncLLM(model=tiny_path, device="cpu", compile="off")
        try:
            params = dataclasses.replace(base, output_kind=kind)
            return [out async for out in engine.generate(_prompt(9, 4), params, "r")]
        finally:
            await engine.shutdown()

    deltas = asyncio.run(collect(DELTA))
    tokens = [t for out in deltas for t in out.outputs[0].token_ids]
    cumulative = asyncio.run(collect(RequestOutputKind.CUMULATIVE))
    assert len(cumulative) == len(deltas)
    assert [out.outputs[0].token_ids for out in cumulative] == [
        tokens[: i + 1] for i in range(len(tokens))
    ]
    assert cumulative[-1].outputs[0].cumulative_logprob == pytest.approx(
        sum(lp.logprob for out in deltas for lp in out.outputs[0].logprobs)
    )
    [final] = asyncio.run(collect(RequestOutputKind.FINAL_ONLY))
    assert final.finished and final.outputs[0].token_ids == tokens


def test_streamed_outputs_carry_the_requests_metrics_as_they_stood(tiny_path):
    """Each output holds vLLM's RequestMetrics as they were when it was made: the first
    token's time fixed from the first output on, the latest token's as of that output, the
    end's only on the last."""
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)

    async def stream():
        engine = AsyncLLM(model=tiny_path, device="cpu", compile="off")
        try:
            return [out async for out in engine.generate(_prompt(9, 2), params, "r")]
        finally:
            await engine.shutdown()

    outs = asyncio.run(stream())
    metrics = [out.metrics for out in outs]
    first = metrics[0]
    assert first.arrival_time <= first.first_scheduled_time <= first.first_token_time
    assert {m.first_token_time for m in metrics} == {first.first_token_time}
    latest = [m.last_token_time for m in metrics]
    assert latest == sorted(latest) and latest[0] == first.first_token_time
    assert [m.finished_time is not None for m in metrics] == [False] * (len(outs) - 1) + [True]
    assert metrics[-1].finished_time >= metrics[-1].last_token_time


def test_abort_and_closed_streams_free_blocks(tiny_path):
    async def run():
        engine = AsyncLLM(model=tiny_path, device="cpu", num_kv_blocks=64, compile="off")
        bm = engine.engine.block_manager
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        try:
            gen = engine.generate(_prompt(20, 1), params, request_id="a")
            await gen.__anext__()
            await gen.aclose()  # a client that went away

            streaming = asyncio.Event()

            async def consume():
                reasons = []
                async for out in engine.generate(_prompt(20, 2), params, request_id="b"):
                    reasons += [o.finish_reason for o in out.outputs if o.finish_reason]
                    streaming.set()
                return reasons

            task = asyncio.create_task(consume())
            await asyncio.wait_for(streaming.wait(), timeout=60)
            await engine.abort("b")
            assert await task == ["abort"]
            for _ in range(100):
                if engine.stats().num_running == 0 and bm.num_used_blocks == 0:
                    break
                await asyncio.sleep(0.02)
            assert bm.num_used_blocks == 0
            assert engine.stats().kv_cache_usage == 0
        finally:
            await engine.shutdown()

    asyncio.run(run())


@pytest.mark.parametrize("kind", [DELTA, RequestOutputKind.FINAL_ONLY])
def test_a_closed_stream_reports_the_tokens_it_never_yielded(tiny_path, kind):
    """What the engine generated while the caller was not reading, up to the abort, is
    handed to `on_abort`: with what was yielded, every token the engine made (as its
    generation counter counts them), so a server can meter them all; and the prompt's
    prefix-cache hit, which only the finished output it never yields would carry."""

    async def run():
        engine = AsyncLLM(model=tiny_path, device="cpu", compile="off")
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, output_kind=kind)
        reported: list[tuple[int, int]] = []
        try:
            one = dataclasses.replace(params, max_tokens=1)
            [primed] = [out async for out in engine.generate(_prompt(20, 1), one, "p")]
            assert primed.num_cached_tokens == 0  # the next request finds its prompt cached
            while engine.stats().generation_tokens_total < 1:  # the snapshot follows the step
                await asyncio.sleep(0.01)
            gen = engine.generate(
                _prompt(20, 1), params, "a", lambda *counts: reported.append(counts)
            )
            yielded = 1  # the primed request's token
            if kind is DELTA:
                yielded += len((await gen.__anext__()).outputs[0].token_ids)
            else:  # nothing is yielded before the end: wait for the engine to be under way
                task = asyncio.ensure_future(gen.__anext__())
                while engine.stats().generation_tokens_total == 1:
                    await asyncio.sleep(0.01)
            while engine.stats().generation_tokens_total < yielded + 3:  # it runs on unread
                await asyncio.sleep(0.01)
            if kind is not DELTA:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            await gen.aclose()
            for _ in range(100):  # the stats snapshot follows the engine's next loop
                if engine.stats().num_running == 0:
                    break
                await asyncio.sleep(0.02)
            stats = engine.stats()
            generated = stats.generation_tokens_total
            assert reported == [(generated - yielded, stats.prefix_cache_hits)]
            assert generated < 200 and stats.prefix_cache_hits > 0
        finally:
            await engine.shutdown()

    asyncio.run(run())


def test_engine_failure_reaches_the_caller(tiny_path, monkeypatch):
    async def run():
        engine = AsyncLLM(model=tiny_path, device="cpu", compile="off")

        def boom(*args, **kwargs):
            raise RuntimeError("kernel exploded")

        monkeypatch.setattr(engine.engine.runner, "run", boom)
        try:
            with pytest.raises(EngineError, match="kernel exploded"):
                async for _ in engine.generate(_prompt(5, 3), SamplingParams(), "x"):
                    pass
            assert engine.engine.block_manager.num_used_blocks == 0
        finally:
            await engine.shutdown()

    asyncio.run(run())


def test_bad_requests_raise_value_error(tiny_path):
    async def run():
        engine = AsyncLLM(model=tiny_path, device="cpu", compile="off")
        try:
            window = engine.engine.max_model_len
            with pytest.raises(ValueError, match="maximum context length"):
                async for _ in engine.generate([1] * (window + 1), SamplingParams(), "y"):
                    pass
            with pytest.raises(ValueError, match="token ids"):
                async for _ in engine.generate([10**6], SamplingParams(), "z"):
                    pass
        finally:
            await engine.shutdown()

    asyncio.run(run())


def test_engine_is_built_and_stepped_on_its_own_thread(tiny_path, monkeypatch):
    """One OpenMP master per process: loading must not happen on the caller's thread."""
    import threading

    from engine import llm_engine

    threads: dict[str, str] = {}
    real_init, real_step = llm_engine.LLMEngine.__init__, llm_engine.LLMEngine.step

    def init(self, args):
        threads["init"] = threading.current_thread().name
        real_init(self, args)

    def step(self):
        threads["step"] = threading.current_thread().name
        return real_step(self)

    monkeypatch.setattr(llm_engine.LLMEngine, "__init__", init)
    monkeypatch.setattr(llm_engine.LLMEngine, "step", step)
    generate_briefly(model=tiny_path)
    assert threads == {"init": "tokenmill-engine", "step": "tokenmill-engine"}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="a team of one is never pinned")
@pytest.mark.parametrize("pin", [True, False])
def test_the_engine_steps_on_a_pinned_thread_unless_told_not_to(tiny_path, monkeypatch, pin):
    from engine import llm_engine

    cpus = sorted(os.sched_getaffinity(0))
    seen: list[set[int]] = []
    real_step = llm_engine.LLMEngine.step

    def step(self):
        seen.append(os.sched_getaffinity(0))
        return real_step(self)

    monkeypatch.setattr(llm_engine.LLMEngine, "step", step)
    generate_briefly(model=tiny_path, num_threads=len(cpus), pin_threads=pin)
    assert seen and all(s == ({cpus[0]} if pin else set(cpus)) for s in seen)
    assert sorted(os.sched_getaffinity(0)) == cpus  # the caller's thread is untouched


def generate_briefly(**engine_options) -> None:
    """One two-token request through a new AsyncLLM, shut down after."""

    async def run():
        engine = AsyncLLM(device="cpu", compile="off", **engine_options)
        try:
            async for _ in engine.generate([1, 2, 3], SamplingParams(max_tokens=2), "t"):
                pass
        finally:
            await engine.shutdown()

    asyncio.run(run())


def _first_step_batch(tiny_path, monkeypatch, burst_wait_ms: float, gap_s: float) -> int:
    """How many of three requests, sent `gap_s` apart to an idle engine, its first step saw."""
    from engine import llm_engine

    seen: list[int] = []
    real_step = llm_engine.LLMEngine.step

    def step(self):
        seen.append(len(self.requests))
        return real_step(self)

    monkeypatch.setattr(llm_engine.LLMEngine, "step", step)
    params = SamplingParams(max_tokens=2, ignore_eos=True)

    async def run():
        engine = AsyncLLM(model=tiny_path, device="cpu", compile="off", burst_wait_ms=burst_wait_ms)

        async def one(i):
            await asyncio.sleep(i * gap_s)
            async for _ in engine.generate(_prompt(5, i), params, request_id=f"b{i}"):
                pass

        try:
            await asyncio.gather(*(one(i) for i in range(3)))
        finally:
            await engine.shutdown()

    asyncio.run(run())
    return seen[0]


def test_an_idle_engine_takes_a_burst_in_its_first_step(tiny_path, monkeypatch):
    """Requests arriving while the burst wait runs join the first step; without the wait
    the first arrival steps alone."""
    assert _first_step_batch(tiny_path, monkeypatch, burst_wait_ms=300, gap_s=0.03) == 3
    assert _first_step_batch(tiny_path, monkeypatch, burst_wait_ms=0, gap_s=0.5) == 1


def test_burst_wait_is_bounded():
    with pytest.raises(ValueError, match="burst_wait_ms"):
        AsyncLLM(burst_wait_ms=-1)


def test_a_load_error_reaches_the_caller(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError)):
        AsyncLLM(model=str(tmp_path / "no-such-model"), device="cpu", compile="off")


async def _tokens(engine: AsyncLLM, request_id: str, max_tokens: int = 6) -> list[int]:
    params = SamplingParams(
        temperature=0, max_tokens=max_tokens, ignore_eos=True, output_kind=DELTA
    )
    tokens: list[int] = []
    async for out in engine.generate(_prompt(8, len(request_id)), params, request_id):
        tokens += out.outputs[0].token_ids if out.outputs else []
    return tokens


def test_a_request_failing_in_a_step_fails_alone(tiny_path, monkeypatch):
    """Appending a token (detokenizing, stop checks) fails for one request: it alone gets
    an error, its batch-mates finish, and the engine serves the next request."""

    async def run():
        engine = AsyncLLM(model=tiny_path, device="cpu", compile="off")
        append = engine.engine.outputs.append

        def append_or_fail(seq, *args, **kwargs):
            if seq.request.request_id == "bad" and seq.num_output_tokens >= 2:
                raise TypeError("detokenizer exploded")
            return append(seq, *args, **kwargs)

        monkeypatch.setattr(engine.engine.outputs, "append", append_or_fail)
        try:
            good, bad = await asyncio.gather(
                _tokens(engine, "good", 12), _tokens(engine, "bad", 12), return_exceptions=True
            )
            assert isinstance(bad, RequestFailedError) and "detokenizer exploded" in str(bad)
            assert len(good) == 12
            assert len(await _tokens(engine, "after")) == 6
            assert engine.failure is None
            assert engine.engine.requests == {}
            assert engine.engine.block_manager.num_used_blocks == 0  # "bad"'s blocks too
        finally:
            await engine.shutdown()

    asyncio.run(run())


def test_a_request_failing_on_entry_fails_alone(tiny_path, monkeypatch):
    async def run():
        engine = AsyncLLM(model=tiny_path, device="cpu", compile="off")
        start = engine.engine.outputs.start

        def start_or_fail(seq):
            if seq.request.request_id == "bad":
                raise TypeError("skip_special_tokens is not a bool")
            return start(seq)

        monkeypatch.setattr(engine.engine.outputs, "start", start_or_fail)
        try:
            with pytest.raises(RequestFailedError, match="skip_special_tokens"):
                await _tokens(engine, "bad")
            assert "bad" not in engine.engine.requests
            assert len(await _tokens(engine, "good")) == 6
        finally:
            await engine.shutdown()

    asyncio.run(run())


def test_failed_steps_end_their_batch_then_the_engine(tiny_path, monkeypatch):
    """One failed batched step ends that batch's requests and the engine goes on; a run of
    MAX_FAILED_STEPS failures means the engine is broken: `failure` is set and new
    requests are refused at once instead of hanging."""

    async def run():
        engine = AsyncLLM(model=tiny_path, device="cpu", compile="off")
        real_run = engine.engine.runner.run
        failures = {"left": 1}

        def flaky(*args):
            if failures["left"]:
                failures["left"] -= 1
                raise RuntimeError("kernel exploded")
            return real_run(*args)

        monkeypatch.setattr(engine.engine.runner, "run", flaky)
        try:
            with pytest.raises(EngineError, match="kernel exploded"):
                await _tokens(engine, "first")
            assert len(await _tokens(engine, "second")) == 6
            failures["left"] = MAX_FAILED_STEPS
            # One request per failed step: each is ended, the last failure ends the engine.
            for i in range(MAX_FAILED_STEPS):
                with pytest.raises(EngineError):
                    await _tokens(engine, f"doomed-{i}")
            assert engine.failure is not None
            with pytest.raises(EngineError, match="engine failed"):
                await _tokens(engine, "refused")
        finally:
            await engine.shutdown()

    asyncio.run(run())


def test_a_dead_engine_loop_fails_waiting_requests_and_says_so(tiny_path, monkeypatch):
    async def run():
        engine = AsyncLLM(model=tiny_path, device="cpu", compile="off")

        def broken_stats():
            raise RuntimeError("loop bug")

        try:
            stream = engine.generate(
                _prompt(8, 1), SamplingParams(max_tokens=500, ignore_eos=True), "long"
            )
            await stream.__anext__()
            monkeypatch.setattr(engine.engine, "stats", broken_stats)
            with pytest.raises(EngineError, match="loop bug"):
                async for _ in stream:
                    pass
            assert isinstance(engine.failure, RuntimeError)
        finally:
            await engine.shutdown()

    asyncio.run(run())


def test_a_token_outside_the_vocabulary_fails_only_its_request(tiny_path, monkeypatch):
    """NaN logits once sampled an id past the vocabulary, which failed the next forward
    pass for the whole batch; such a token now ends its own request."""

    async def run():
        engine = AsyncLLM(model=tiny_path, device="cpu", compile="off")
        real_run = engine.engine.runner.run

        def run_with_a_bad_token(*args):
            seqs, tokens, logprobs = real_run(*args)
            tokens = [
                10**6 if s.request.request_id == "bad" else t
                for s, t in zip(seqs, tokens, strict=True)
            ]
            return seqs, tokens, logprobs

        monkeypatch.setattr(engine.engine.runner, "run", run_with_a_bad_token)
        try:
            good, bad = await asyncio.gather(
                _tokens(engine, "good"), _tokens(engine, "bad"), return_exceptions=True
            )
            assert isinstance(bad, RequestFailedError) and "outside the vocabulary" in str(bad)
            assert len(good) == 6 and engine.failure is None
        finally:
            await engine.shutdown()

    asyncio.run(run())


def test_a_grammar_is_compiled_off_the_event_loop(tiny_chat_model_dir, monkeypatch):
    """A structured request's matcher (up to a second for a large schema) is built in a
    worker thread, where llguidance releases the GIL, so the event loop serves the other
    streams meanwhile."""
    from engine.structured_output import GrammarCompiler, StructuredOutputsParams

    compiled_on_loop = record_event_loop_calls(monkeypatch, GrammarCompiler, "compile")
    params = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(regex="[ab]+"))

    async def run() -> str:
        engine = AsyncLLM(model=tiny_chat_model_dir, device="cpu", compile="off")
        try:
            outs = [out async for out in engine.generate("x", params, request_id="r1")]
        finally:
            await engine.shutdown()
        return outs[-1].outputs[0].text

    text = asyncio.run(run())
    assert compiled_on_loop == [False] and set(text) <= {"a", "b"}
