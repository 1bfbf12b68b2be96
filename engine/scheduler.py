"""Continuous batching: choose, every step, which tokens of which sequences to run.

A step's batch mixes one decode token for each running sequence with chunks of
prompts still being prefilled, under a token budget (`max_num_batched_tokens`) and a
sequence cap (`max_num_seqs`). Decodes are counted first so a long prompt never
stalls the streams already flowing; prompts longer than what is left of the budget
are prefilled in chunks over several steps.

A prompt's chunk is also at most `long_prefill_token_threshold` tokens a step (vLLM's
option; 0: no cap). Without it a long prompt takes the whole budget every step until it is
prefilled, so a short prompt that arrives meanwhile waits for all of it, and each of those
steps, whose attention grows with the context, holds up the flowing streams' next tokens:
on a CPU a 2,048-token chunk deep into an 8K prompt takes seconds. With the cap, what is
left of the budget admits the prompts behind it in the next step. Past a context of
`max_num_batched_tokens` the cap shrinks in proportion to the context, so that a chunk's
attention (its tokens times the context they read) stays what the cap's tokens cost there.

The prefix cache is keyed by `Sequence.cache_key`: the token ids, shifted out of every
vocabulary for a request with a `cache_salt`, so that requests of different salts (users)
never share blocks.

Prompts admitted in the same step share what they have in common. As soon as a prompt is
admitted, the whole blocks its chunk will fill this step go into the prefix cache, so a
later prompt of the same step that starts with the same tokens takes those blocks instead
of computing them again: a burst of chats behind one system prompt computes the system
prompt once. This is sound because every layer writes the whole step's K/V before any
sequence of the step attends (engine/model.py, `Attention.forward`). Should the step fail,
those blocks were never written: `discard` has the whole unused cache dropped before the
next step.

When the KV pool runs dry the newest running sequence is preempted by recompute:
its computed blocks go into the prefix cache, its blocks are freed, and it returns
to the head of the waiting queue keeping what it generated. Admission is strictly
FCFS (the head of the queue is never skipped), so no request starves.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager, NoFreeBlocksError
from engine.sampler import make_generator
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """One step's work. `num_query_tokens[i]` tokens of `seqs[i]` are computed,
    starting at its `num_computed_tokens`."""

    seqs: list[Sequence] = field(default_factory=list)
    num_query_tokens: list[int] = field(default_factory=list)
    # KV blocks to copy before the step (copy-on-write of shared partial blocks).
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    # Siblings forked this step: they sample from their parent's logits row.
    forks: list[tuple[Sequence, Sequence]] = field(default_factory=list)
    # Siblings created this step that did not fit under max_num_seqs: they wait in the queue.
    deferred: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def samples(self, i: int) -> bool:
        """Whether seqs[i] reaches the end of its known tokens and so samples the next one."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_query_tokens[i] == seq.num_tokens


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        long_prefill_token_threshold: int = 0,
    ) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order, oldest first
        self.num_preemptions = 0
        self._drop_cache = False  # a failed step cached blocks it never wrote

    # -- queue management ---------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Retire a sequence (finished or aborted) and release its blocks at once."""
        if seq.status is Status.RUNNING:
            self._release_running(seq)
        else:
            if seq in self.waiting:
                self.waiting.remove(seq)
            self.bm.free(seq.seq_id)
        seq.status = Status.FINISHED

    def _release_running(self, seq: Sequence) -> None:
        """Take a running sequence off the batch; its computed blocks go into the prefix
        cache (so a resumed or follow-up request finds them) before its blocks are freed."""
        self.running.remove(seq)
        self.bm.cache(seq.seq_id, seq.cache_key(seq.num_computed_tokens))
        self.bm.free(seq.seq_id)

    # -- scheduling ---------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        if self._drop_cache:
            # The failed step's sequences are ended by now, so its blocks are unlocked.
            self.bm.reset_prefix_cache()
            self._drop_cache = False
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        budget -= self._schedule_running(batch, budget)
        self._schedule_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        """Give every running sequence its tokens, preempting the newest ones when
        blocks run out. Returns the tokens used."""
        num_decodes = sum(1 for s in self.running if s.num_tokens - s.num_computed_tokens == 1)
        prefill_budget = max(budget - num_decodes, 0)
        used = 0
        queue = list(self.running)
        kept: list[Sequence] = []
        while queue:
            seq = queue.pop(0)
            remaining = seq.num_tokens - seq.num_computed_tokens
            if remaining == 1:
                if used >= budget:
                    kept.append(seq)
                    continue
                n = 1
            else:
                n = min(remaining, prefill_budget, self.chunk_limit(seq.num_computed_tokens))
                if n == 0:
                    kept.append(seq)
                    continue
            end = seq.num_computed_tokens + n
            while (
                self.bm.blocks_needed(seq.seq_id, end, seq.num_computed_tokens)
                > self.bm.num_available_blocks()
            ):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            batch.block_copies += self.bm.ensure(seq.seq_id, end, seq.num_computed_tokens)
            if remaining > 1:
                prefill_budget -= n
            used += n
            kept.append(seq)
            self._add_to_batch(batch, seq, n)
        # Keep the survivors in admission order; siblings forked this step go last.
        kept_ids = {id(s) for s in kept}
        forked = [s for s in self.running if id(s) not in kept_ids and s.status is Status.RUNNING]
        self.running = kept + forked
        return used

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            key = seq.cache_key()
            reuse = not seq.request.needs_prompt_logprobs
            # With nothing running, the watermark must not block the only candidate.
            if self.running and not self.bm.can_allocate(key, reuse):
                break
            try:
                cached = self.bm.allocate(seq.seq_id, key, reuse)
            except NoFreeBlocksError:
                break
            self.waiting.popleft()
            if seq.num_prompt_tokens == seq.num_tokens and seq.index == 0:
                seq.request.num_cached_tokens = cached
            seq.num_computed_tokens = cached
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - cached, budget, self.chunk_limit(cached))
            budget -= n
            self._add_to_batch(batch, seq, n)
            # for the prompts admitted after this one (see the module docstring)
            self.bm.cache(seq.seq_id, key[: cached + n])

    def chunk_limit(self, computed: int) -> int:
        """The most tokens of a prompt, `computed` of whose tokens are in the cache, one step
        may take (see the module docstring)."""
        cap, reach = self.long_prefill_token_threshold, self.max_num_batched_tokens
        if not cap:
            return reach
        return max(1, cap * reach // max(computed, reach))

    def _add_to_batch(self, batch: ScheduledBatch, seq: Sequence, n: int) -> None:
        batch.seqs.append(seq)
        batch.num_query_tokens.append(n)
        if seq.pending_forks and seq.num_computed_tokens + n == seq.num_tokens:
            forked, deferred = self._fork(seq)
            batch.forks += [(seq, child) for child in forked]
            batch.deferred += deferred

    def _fork(self, parent: Sequence) -> tuple[list[Sequence], list[Sequence]]:
        """Create the request's remaining completions: (forked, deferred).

        As many as `max_num_seqs` leaves room for are forked, sharing the parent's blocks
        and sampling from its logits this step. The rest wait at the head of the queue (the
        request came before anything waiting there) and are admitted like a prompt when
        room frees up, their prompt mostly a prefix-cache hit.
        """
        request = parent.request
        room = max(self.max_num_seqs - len(self.running), 0)
        forked: list[Sequence] = []
        deferred: list[Sequence] = []
        for index in range(1, parent.pending_forks + 1):
            seed = None if request.params.seed is None else request.params.seed + index
            child = Sequence(
                request=request,
                index=index,
                token_ids=list(parent.token_ids),
                num_prompt_tokens=parent.num_prompt_tokens,
                generator=make_generator(seed),
            )
            request.seqs.append(child)
            if len(forked) < room:
                child.status = Status.RUNNING
                child.num_computed_tokens = parent.num_computed_tokens
                self.bm.fork(parent.seq_id, child.seq_id)
                self.running.append(child)
                forked.append(child)
            else:
                deferred.append(child)
        self.waiting.extendleft(reversed(deferred))
        parent.pending_forks = 0
        return forked, deferred

    def _preempt(self, seq: Sequence) -> None:
        self._release_running(seq)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # -- after the model ran --------------------------------------------------------

    def discard(self, batch: ScheduledBatch) -> None:
        """The batch failed, nothing of it was advanced: the blocks its prompts put in the
        prefix cache at admission hold no K/V. Its caller ends its requests; the next
        `schedule` then drops every cached block no running sequence uses, those included."""
        self._drop_cache = bool(batch.seqs)

    def advance(self, batch: ScheduledBatch) -> None:
        """Record that the batch's tokens are now in the KV cache; cache whole
        prompt blocks as soon as the prompt is done so concurrent requests share them."""
        for seq, n in zip(batch.seqs, batch.num_query_tokens, strict=True):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == seq.num_tokens and seq.num_output_tokens == 0:
                self.bm.cache(seq.seq_id, seq.cache_key())
        for parent, child in batch.forks:
            child.num_computed_tokens = parent.num_computed_tokens


def max_tokens_for(params: SamplingParams, prompt_len: int, max_model_len: int) -> int:
    """The output budget of a request: its max_tokens, or whatever the window leaves."""
    if params.max_tokens is None:
        return max_model_len - prompt_len
    return params.max_tokens
