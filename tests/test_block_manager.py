"""BlockManager: edge-case unit tests, and a stateful property test that drives it like a
scheduler + model runner would, against a fake KV store.

The fake KV slot for position p of a sequence holds the tuple of tokens [0, p]: real KV
depends on the whole prefix, so any wrong sharing, missed copy-on-write or wrong cache hit
shows up as a slot whose content does not match the sequence reading it.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.block_manager import BlockManager, NoFreeBlocksError
from engine.radix_cache import RadixNode


def _seq(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def _state(bm: BlockManager) -> tuple:
    return (
        bm.num_free_blocks,
        bm.num_evictable_blocks,
        list(bm._ref_counts),
        {s: list(t) for s, t in bm._tables.items()},
    )


# --------------------------------------------------------------------- unit tests


def test_empty_prompt() -> None:
    bm = BlockManager(4, block_size=4)
    assert bm.can_allocate([])
    assert bm.allocate(1, []) == 0
    assert bm.block_table(1) == []
    assert bm.ensure(1, 1, 0) == []
    assert len(bm.block_table(1)) == 1
    bm.free(1)
    assert bm.num_free_blocks == 4


def test_prompt_exactly_a_multiple_of_block_size_recomputes_its_last_block() -> None:
    bm = BlockManager(8, block_size=4)
    prompt = _seq(8)
    assert bm.allocate(1, prompt) == 0
    first = list(bm.block_table(1))
    bm.cache(1, prompt)
    bm.free(1)
    assert bm.num_evictable_blocks == 2 and bm.num_used_blocks == 0
    # The last token's logits are needed, so its block is computed again.
    assert bm.allocate(2, prompt) == 4
    table = bm.block_table(2)
    assert table[0] == first[0] and table[1] != first[1]
    assert bm.prefix_cache is not None
    assert bm.prefix_cache.num_hit_tokens == 4


def test_prefix_ending_mid_block_shares_only_whole_blocks() -> None:
    bm = BlockManager(8, block_size=4)
    bm.allocate(1, _seq(10))
    bm.cache(1, _seq(10))
    assert bm.prefix_cache is not None and bm.prefix_cache.num_cached_blocks == 2
    bm.free(1)
    assert bm.num_free_blocks == 6  # the partial third block went straight back
    assert bm.allocate(2, [*_seq(6), 77, 78, 79]) == 4


def test_pool_of_one_block() -> None:
    bm = BlockManager(1, block_size=4)
    assert bm.allocate(1, _seq(4)) == 0
    assert not bm.can_allocate([9])
    with pytest.raises(NoFreeBlocksError):
        bm.ensure(1, 5, 4)
    bm.cache(1, _seq(4))
    bm.free(1)
    assert (bm.num_free_blocks, bm.num_evictable_blocks, bm.num_used_blocks) == (0, 1, 0)
    assert bm.can_allocate([5, 6])
    assert bm.allocate(2, [5, 6]) == 0  # evicts the cached block to make room
    assert bm.prefix_cache is not None and bm.prefix_cache.num_evicted_blocks == 1
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(3, [1])
    bm.free(2)
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(3, _seq(5))


def test_copy_on_write_of_a_shared_partial_block() -> None:
    bm = BlockManager(8, block_size=4)
    bm.allocate(1, _seq(6))
    bm.fork(1, 2)
    parent = list(bm.block_table(1))
    assert bm.block_table(2) == parent
    assert bm.num_used_blocks == 2  # shared, not copied
    assert bm.blocks_needed(2, 7) == 1
    copies = bm.ensure(2, 7, 6)
    assert len(copies) == 1 and copies[0][0] == parent[1]
    child = bm.block_table(2)
    assert child[0] == parent[0] and child[1] == copies[0][1] != parent[1]
    # The parent is now the only owner of its last block: it writes in place.
    assert bm.blocks_needed(1, 7) == 0
    assert bm.ensure(1, 7, 6) == []
    assert bm.block_table(1) == parent
    # Growing into a new block needs no copy.
    assert bm.ensure(1, 9, 8) == []
    assert bm.num_used_blocks == 4


def test_writing_into_a_cached_block_copies_it() -> None:
    bm = BlockManager(8, block_size=4)
    bm.allocate(1, _seq(8))
    bm.cache(1, _seq(8))
    b0, b1 = bm.block_table(1)
    copies = bm.ensure(1, 8, 5)  # e.g. a recompute of positions 5..7
    assert copies == [(b1, bm.block_table(1)[1])]
    assert bm.block_table(1)[0] == b0


def test_failed_calls_change_nothing() -> None:
    bm = BlockManager(4, block_size=2, watermark=0.0)
    bm.allocate(1, _seq(5))
    bm.fork(1, 2)
    before = _state(bm)
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(3, _seq(4, 50))
    with pytest.raises(NoFreeBlocksError):
        bm.ensure(1, 10, 5)
    assert _state(bm) == before
    with pytest.raises(ValueError):
        bm.allocate(1, [1])


def test_watermark_applies_to_admission_only() -> None:
    bm = BlockManager(100, block_size=1, watermark=0.05)
    assert bm.can_allocate(_seq(95))
    assert not bm.can_allocate(_seq(96))
    bm.allocate(1, _seq(96))
    bm.ensure(1, 100, 96)  # running sequences may use the last blocks
    assert bm.num_free_blocks == 0 and bm.usage == 1.0


def test_admission_counts_cache_hits_and_the_blocks_they_pin() -> None:
    bm = BlockManager(4, block_size=2, watermark=0.0)
    bm.allocate(1, _seq(8))
    bm.cache(1, _seq(8))
    bm.free(1)
    assert bm.num_evictable_blocks == 4
    # A hit of 3 blocks pins them, leaving one evictable block for the remaining need.
    assert bm.can_allocate(_seq(8))  # 3 cached + 1 new
    assert not bm.can_allocate(_seq(10))  # 3 cached + 2 new
    assert bm.allocate(2, _seq(8)) == 6
    assert bm.num_free_blocks == 0 and bm.num_evictable_blocks == 0


def test_identical_prompts_prefilled_concurrently() -> None:
    bm = BlockManager(8, block_size=2)
    prompt = _seq(5)
    bm.allocate(1, prompt)
    bm.allocate(2, prompt)  # nothing cached yet: private blocks
    a, b = list(bm.block_table(1)), list(bm.block_table(2))
    bm.cache(1, prompt)
    bm.cache(2, prompt)  # the tree keeps 1's blocks; 2 keeps its private copies
    assert bm.block_table(2) == b
    assert bm.num_used_blocks == 6 and bm.num_evictable_blocks == 0
    bm.free(2)
    assert bm.num_free_blocks == 5
    bm.free(1)
    assert bm.num_free_blocks == 6 and bm.num_evictable_blocks == 2
    bm.allocate(3, prompt)
    assert bm.block_table(3)[:2] == a[:2]


def test_next_turn_of_a_conversation_reuses_the_generated_tokens() -> None:
    bm = BlockManager(16, block_size=4)
    prompt = _seq(6)
    bm.allocate(1, prompt)
    bm.cache(1, prompt)  # after prefill
    tokens = list(prompt)
    for t in range(100, 107):  # decode; the last sampled token has no KV yet
        bm.ensure(1, len(tokens) + 1, len(tokens))
        tokens.append(t)
    bm.cache(1, tokens)  # at finish: 13 tokens -> 3 whole blocks
    bm.free(1)
    assert bm.allocate(2, [*tokens, 107, 200, 201]) == 12


def test_prefix_caching_off() -> None:
    bm = BlockManager(8, block_size=2, enable_prefix_caching=False)
    assert bm.prefix_cache is None
    bm.allocate(1, _seq(6))
    bm.cache(1, _seq(6))
    bm.free(1)
    assert bm.num_free_blocks == 8 and bm.num_evictable_blocks == 0
    assert bm.allocate(2, _seq(6)) == 0
    assert bm.reset_prefix_cache() == 0


def test_caching_blocks_shared_by_forks_locks_them_for_every_sibling() -> None:
    bm = BlockManager(8, block_size=2, watermark=0.0)
    bm.allocate(1, _seq(4))
    bm.fork(1, 2)  # before caching: both use the 2 full prompt blocks
    bm.fork(2, 3)
    bm.ensure(3, 5, 4)
    bm.free(3)
    bm.ensure(1, 5, 4)
    bm.cache(1, _seq(5))  # caches the shared blocks, and pins them for seq 2 as well
    assert bm.prefix_cache is not None and bm.prefix_cache.num_cached_blocks == 2
    bm.free(1)
    assert bm.num_evictable_blocks == 0 and bm.num_used_blocks == 2
    bm.free(2)
    assert bm.num_evictable_blocks == 2 and bm.num_free_blocks == 6


def test_a_private_duplicate_does_not_pin_the_trees_copy() -> None:
    bm = BlockManager(8, block_size=2, watermark=0.0)
    bm.allocate(1, _seq(4))
    bm.allocate(2, _seq(4))
    bm.cache(1, _seq(4))
    bm.cache(2, _seq(4))
    bm.free(1)
    assert bm.num_evictable_blocks == 2  # seq 2 reads its own copies, not the tree's


def test_free_is_idempotent_and_fork_shares_the_lock() -> None:
    bm = BlockManager(8, block_size=2)
    bm.allocate(1, _seq(5))
    bm.cache(1, _seq(5))
    bm.fork(1, 2)
    bm.free(1)
    bm.free(1)
    bm.free(99)
    assert bm.num_evictable_blocks == 0  # the child still pins the cached prefix
    bm.free(2)
    assert bm.num_evictable_blocks == 2 and bm.num_free_blocks == 6
    assert bm.reset_prefix_cache() == 2 and bm.num_free_blocks == 8
    assert bm.usage == 0.0


# --------------------------------------------------------------- stateful model


class BlockManagerMachine(RuleBasedStateMachine):
    """Random interleavings of allocate / prefill / append / fork / cache / free / evict.

    As the scheduler does, a prompt is admitted with or without reusing the cache (a
    request asking for prompt logprobs computes its whole prompt) and prefilled in chunks:
    `computed[seq]` tokens of it have KV, and only those are cached, appended to or forked
    from. Every computed slot of a table must hold exactly its tokens' prefix, and so must
    every cached block.
    """

    @initialize(
        num_blocks=st.integers(1, 16),
        bs=st.sampled_from([1, 2, 4]),
        caching=st.booleans(),
    )
    def setup(self, num_blocks: int, bs: int, caching: bool) -> None:
        self.bm = BlockManager(num_blocks, bs, enable_prefix_caching=caching, watermark=0.0)
        self.bs = bs
        self.kv: list[list[tuple[int, ...] | None]] = [[None] * bs for _ in range(num_blocks)]
        self.seqs: dict[int, list[int]] = {}
        self.computed: dict[int, int] = {}  # tokens of each sequence whose KV is written
        self.ids = itertools.count()
        self.history: list[list[int]] = [[]]

    # The fake model runner.
    def _write(self, seq_id: int, start: int, tokens: list[int]) -> None:
        table = self.bm.block_table(seq_id)
        for pos in range(start, len(tokens)):
            block = table[pos // self.bs]
            assert self.bm._ref_counts[block] == 1, "writing into a shared block"
            self.kv[block][pos % self.bs] = tuple(tokens[: pos + 1])

    def _copy(self, copies: list[tuple[int, int]]) -> None:
        for src, dst in copies:
            self.kv[dst] = list(self.kv[src])

    @rule(data=st.data())
    def allocate(self, data: st.DataObject) -> None:
        base = data.draw(st.sampled_from(self.history))
        tokens = base[: data.draw(st.integers(0, len(base)))]
        tokens += data.draw(st.lists(st.integers(0, 1), max_size=10))
        seq_id = next(self.ids)
        reuse = data.draw(st.booleans())
        before = _state(self.bm)
        admissible = self.bm.can_allocate(tokens, reuse)
        try:
            cached = self.bm.allocate(seq_id, tokens, reuse)
        except NoFreeBlocksError:
            assert not admissible
            assert _state(self.bm) == before
            return
        assert admissible
        assert cached % self.bs == 0 and cached <= max(len(tokens) - 1, 0)
        assert reuse or cached == 0
        assert len(self.bm.block_table(seq_id)) == -(-len(tokens) // self.bs)
        for pos in range(cached):  # a cache hit must bring exactly this prefix's KV
            block = self.bm.block_table(seq_id)[pos // self.bs]
            assert self.kv[block][pos % self.bs] == tuple(tokens[: pos + 1])
        self.seqs[seq_id] = tokens
        self.computed[seq_id] = cached
        self._prefill(seq_id, data.draw(st.integers(0, len(tokens) - cached)))
        if data.draw(st.booleans()):
            self.bm.cache(seq_id, tokens[: self.computed[seq_id]])

    def _prefill(self, seq_id: int, n: int) -> None:
        """Compute the next `n` prompt tokens (a chunk): the table already covers them."""
        tokens, start = self.seqs[seq_id], self.computed[seq_id]
        end = start + n
        assert self.bm.blocks_needed(seq_id, end, start) == 0
        self._copy(self.bm.ensure(seq_id, end, start))
        self._write(seq_id, start, tokens[:end])
        self.computed[seq_id] = end
        if end == len(tokens):
            self.history.append(list(tokens))

    @precondition(lambda self: any(c < len(self.seqs[s]) for s, c in self.computed.items()))
    @rule(data=st.data())
    def prefill(self, data: st.DataObject) -> None:
        seq_id = data.draw(
            st.sampled_from(sorted(s for s, c in self.computed.items() if c < len(self.seqs[s])))
        )
        left = len(self.seqs[seq_id]) - self.computed[seq_id]
        self._prefill(seq_id, data.draw(st.integers(1, left)))
        if data.draw(st.booleans()):
            self.bm.cache(seq_id, self.seqs[seq_id][: self.computed[seq_id]])

    def _prefilled(self) -> list[int]:
        return sorted(s for s, c in self.computed.items() if c == len(self.seqs[s]))

    @precondition(lambda self: self._prefilled())
    @rule(data=st.data(), token=st.integers(0, 1))
    def append(self, data: st.DataObject, token: int) -> None:
        seq_id = data.draw(st.sampled_from(self._prefilled()))
        tokens = self.seqs[seq_id]
        n = len(tokens)
        need = self.bm.blocks_needed(seq_id, n + 1)
        available = self.bm.num_available_blocks()
        before = _state(self.bm)
        try:
            copies = self.bm.ensure(seq_id, n + 1, n)
        except NoFreeBlocksError:
            assert need > available
            assert _state(self.bm) == before
            return
        assert need <= available
        assert self.bm.num_available_blocks() == available - need
        self._copy(copies)
        tokens.append(token)
        self._write(seq_id, n, tokens)
        self.computed[seq_id] = n + 1
        self.history.append(list(tokens))

    @precondition(lambda self: self._prefilled())
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent = data.draw(st.sampled_from(self._prefilled()))
        child = next(self.ids)
        used = self.bm.num_used_blocks
        self.bm.fork(parent, child)
        assert self.bm.num_used_blocks == used
        self.seqs[child] = list(self.seqs[parent])
        self.computed[child] = self.computed[parent]

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def cache(self, data: st.DataObject) -> None:
        seq_id = data.draw(st.sampled_from(sorted(self.seqs)))
        self.bm.cache(seq_id, self.seqs[seq_id][: self.computed[seq_id]])

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), finish=st.booleans())
    def free(self, data: st.DataObject, finish: bool) -> None:
        seq_id = data.draw(st.sampled_from(sorted(self.seqs)))
        if finish:  # or preempted: what it computed goes into the cache
            self.bm.cache(seq_id, self.seqs[seq_id][: self.computed[seq_id]])
        self.bm.free(seq_id)
        self.bm.free(seq_id)  # an abort racing with completion
        del self.seqs[seq_id], self.computed[seq_id]

    @rule()
    def reset_cache(self) -> None:
        evictable = self.bm.num_evictable_blocks
        assert self.bm.reset_prefix_cache() == evictable
        assert self.bm.num_evictable_blocks == 0

    # Invariants.
    def _tree(self) -> list[tuple[RadixNode, tuple[int, ...]]]:
        """(node, tokens from the root to the end of its key) for every node."""
        cache = self.bm.prefix_cache
        if cache is None:
            return []
        out = []
        stack = [(cache.root, ())]
        while stack:
            node, prefix = stack.pop()
            for child in node.children.values():
                out.append((child, prefix + child.key))
                stack.append((child, prefix + child.key))
        return out

    @invariant()
    def accounting(self) -> None:
        if not hasattr(self, "bm"):
            return
        bm = self.bm
        tree = self._tree()
        in_tree = [b for node, _ in tree for b in node.blocks]
        assert len(in_tree) == len(set(in_tree))
        expected = [0] * bm.num_blocks
        for seq_id in self.seqs:
            for b in bm.block_table(seq_id):
                expected[b] += 1
        for b in in_tree:
            expected[b] += 1
        assert bm._ref_counts == expected, "a block leaked or was freed twice"
        assert len(bm._free) == len(set(bm._free))
        assert set(bm._free) == {b for b in range(bm.num_blocks) if expected[b] == 0}
        unlocked = [b for node, _ in tree if node.lock_ref == 0 for b in node.blocks]
        assert all(expected[b] == 1 for b in unlocked), "evictable block still in use"
        assert bm.num_evictable_blocks == len(unlocked)
        in_use = {b for s in self.seqs for b in bm.block_table(s)}
        in_use |= {b for node, _ in tree if node.lock_ref > 0 for b in node.blocks}
        assert bm.num_used_blocks == len(in_use)
        assert bm.num_free_blocks + bm.num_used_blocks + bm.num_evictable_blocks == bm.num_blocks
        assert 0.0 <= bm.usage <= 1.0

    @invariant()
    def kv_content(self) -> None:
        if not hasattr(self, "bm"):
            return
        for seq_id, tokens in self.seqs.items():
            table = self.bm.block_table(seq_id)
            assert len(table) == -(-len(tokens) // self.bs)
            for pos in range(self.computed[seq_id]):
                got = self.kv[table[pos // self.bs]][pos % self.bs]
                assert got == tuple(tokens[: pos + 1]), f"seq {seq_id} pos {pos}"
        for node, prefix in self._tree():
            start = len(prefix) - len(node.key)
            for i, block in enumerate(node.blocks):
                for slot in range(self.bs):
                    pos = start + i * self.bs + slot
                    assert self.kv[block][slot] == prefix[: pos + 1], "cached KV is wrong"

    @invariant()
    def locks(self) -> None:
        if not hasattr(self, "bm"):
            return
        for node, _ in self._tree():
            holders = 0
            for lock in self.bm._locks.values():
                while lock is not None and lock is not node:
                    lock = lock.parent
                holders += lock is node
            assert node.lock_ref == holders


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
