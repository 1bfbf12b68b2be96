"""The scheduler alone, on sequences whose sampled tokens the test appends itself."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Request, Sequence, Status


def _sequence(name: str, prompt_len: int, max_tokens: int) -> Sequence:
    ids = [(7 * i + len(name)) % 500 + 1 for i in range(prompt_len)]
    request = Request(name, None, ids, SamplingParams(max_tokens=max_tokens))
    seq = Sequence(request, 0, list(ids), prompt_len)
    request.seqs.append(seq)
    return seq


def _step(scheduler: Scheduler) -> list[tuple[Sequence, int]]:
    """One step: schedule, record it computed, sample a token where it reached the end."""
    batch = scheduler.schedule()
    work = list(zip(batch.seqs, batch.num_query_tokens, strict=True))
    sampling = [seq for i, seq in enumerate(batch.seqs) if batch.samples(i)]
    scheduler.advance(batch)
    for seq in sampling:
        seq.token_ids.append(1)
        if seq.num_output_tokens >= seq.params.max_tokens:
            scheduler.finish(seq)
    return work


def _steps_to_first_token(threshold: int) -> int:
    """A 300-token prompt, then a 5-token one after its first step: the steps the second
    waits for its first token."""
    scheduler = Scheduler(BlockManager(64), 8, 64, threshold)
    long, short = _sequence("long", 300, 4), _sequence("short", 5, 4)
    scheduler.add(long)
    _step(scheduler)
    scheduler.add(short)
    for steps in range(1, 20):
        _step(scheduler)
        if short.num_output_tokens:
            return steps
    raise AssertionError("the short prompt never started")


def test_a_prompt_behind_a_long_one_starts_in_the_next_step():
    assert _steps_to_first_token(16) == 1
    # Without the cap the long prompt takes the whole budget until it is prefilled.
    assert _steps_to_first_token(0) == 4


def test_past_the_budget_the_chunk_shrinks_with_the_context_it_reads():
    """A chunk's attention (its tokens times its context) stays what the cap's tokens cost
    at a context of the budget; 0 leaves the budget alone."""
    scheduler = Scheduler(BlockManager(64), 8, 2048, 256)
    assert [scheduler.chunk_limit(c) for c in (0, 1000, 2048)] == [256] * 3
    assert [scheduler.chunk_limit(c) for c in (4096, 8192)] == [128, 64]
    assert Scheduler(BlockManager(64), 8, 2048, 0).chunk_limit(8192) == 2048


@settings(max_examples=60, deadline=None)
@given(
    prompts=st.lists(
        st.tuples(st.integers(1, 200), st.integers(1, 6), st.integers(0, 8)),
        min_size=1,
        max_size=8,
    ),
    budget=st.integers(8, 96),
    threshold=st.integers(0, 48),
    max_num_seqs=st.integers(1, 6),
)
def test_steps_keep_the_budget_and_the_chunk_cap_and_every_request_ends(
    prompts, budget, threshold, max_num_seqs
):
    """Arrivals at random steps: no step computes more than its budget, no prompt more
    than its chunk limit (at most the threshold's tokens) a step, and every request
    finishes."""
    scheduler = Scheduler(BlockManager(256), max_num_seqs, budget, threshold)
    seqs = [_sequence(f"r{i}", n, out) for i, (n, out, _) in enumerate(prompts)]
    arrivals = {i: at for i, (_, _, at) in enumerate(prompts)}
    for step in range(2000):
        for i, at in arrivals.items():
            if at == step:
                scheduler.add(seqs[i])
        limits = {id(seq): scheduler.chunk_limit(seq.num_computed_tokens) for seq in seqs}
        work = _step(scheduler)
        assert sum(n for _, n in work) <= budget
        assert all(n <= limits[id(seq)] for seq, n in work)
        assert threshold == 0 or all(n <= threshold for _, n in work)
        if step > max(arrivals.values()) and all(s.status is Status.FINISHED for s in seqs):
            return
    raise AssertionError("requests left unfinished")
