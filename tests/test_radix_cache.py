"""RadixCache: unit tests for the edge cases, and a stateful property test that checks the
tree against a brute-force model (a dict from block-aligned prefixes to block ids)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.radix_cache import RadixCache, RadixNode

BS = 4


def _seq(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


# --------------------------------------------------------------------- unit tests


def test_empty_cache_and_empty_query() -> None:
    cache = RadixCache(BS)
    for query in ([], [1, 2, 3], _seq(9)):
        m = cache.match_prefix(query)
        assert (m.blocks, m.num_tokens, m.node) == ([], 0, cache.root)
    assert cache.num_queries == 3
    assert cache.num_query_tokens == 12
    assert cache.num_hit_tokens == 0
    r = cache.insert([], [])
    assert (r.node, r.num_tokens, r.new_blocks) == (cache.root, 0, [])
    assert cache.num_cached_blocks == 0


def test_exact_multiple_of_block_size() -> None:
    cache = RadixCache(BS)
    r = cache.insert(_seq(8), [10, 11])
    assert r.new_blocks == [10, 11] and r.num_tokens == 8 and r.node.end == 8
    m = cache.match_prefix(_seq(8))
    assert m.blocks == [10, 11] and m.num_tokens == 8 and m.node is r.node
    assert cache.num_cached_blocks == cache.num_evictable_blocks == 2


def test_partial_last_block_is_ignored_on_insert_and_match() -> None:
    cache = RadixCache(BS)
    r = cache.insert(_seq(10), [10, 11, 12])  # 2 whole blocks; the 3rd id is ignored
    assert r.new_blocks == [10, 11] and r.num_tokens == 8
    assert cache.num_cached_blocks == 2
    # A prefix ending mid-block matches only the whole blocks before it.
    m = cache.match_prefix(_seq(7))
    assert m.blocks == [10] and m.num_tokens == 4
    # A query diverging in the middle of the 2nd block keeps just the first.
    m = cache.match_prefix([*_seq(6), 99, 99])
    assert m.blocks == [10] and m.num_tokens == 4
    assert cache.num_hit_tokens == 8


def test_insert_needs_enough_block_ids() -> None:
    cache = RadixCache(BS)
    with pytest.raises(ValueError):
        cache.insert(_seq(8), [1])


def test_match_splits_an_edge_so_the_lock_covers_just_the_match() -> None:
    cache = RadixCache(BS)
    cache.insert(_seq(12), [1, 2, 3])
    m = cache.match_prefix(_seq(8))
    assert m.blocks == [1, 2] and m.node.end == 8 and len(m.node.children) == 1
    cache.lock(m.node)
    assert cache.num_evictable_blocks == 1
    assert cache.evict(10) == [3]
    assert cache.num_cached_blocks == 2 and cache.num_evictable_blocks == 0
    cache.unlock(m.node)
    assert cache.num_evictable_blocks == 2
    assert cache.evict(10) == [2, 1]


def test_node_at_finds_or_splits_without_counting() -> None:
    cache = RadixCache(BS)
    cache.insert(_seq(12), [1, 2, 3])
    node = cache.node_at(_seq(8))
    assert node.end == 8 and node.blocks == [1, 2] and node.parent is cache.root
    assert [c.blocks for c in node.children.values()] == [[3]]
    assert cache.node_at([]) is cache.root
    with pytest.raises(KeyError):
        cache.node_at(_seq(16))
    assert cache.num_queries == 0 and cache.num_hit_tokens == 0


def test_existing_tokens_keep_the_trees_block_ids() -> None:
    cache = RadixCache(BS)
    cache.insert(_seq(8), [1, 2])
    r = cache.insert(_seq(16), [7, 8, 9, 10])  # first two blocks already cached as 1, 2
    assert r.new_blocks == [9, 10] and r.blocks == [1, 2, 9, 10]
    assert cache.match_prefix(_seq(16)).blocks == [1, 2, 9, 10]
    # Diverging inside an edge splits it and adds a sibling.
    r = cache.insert([*_seq(12), 50, 51, 52, 53], [7, 8, 9, 20])
    assert r.new_blocks == [20]
    assert cache.match_prefix([*_seq(12), 50, 51, 52, 53]).blocks == [1, 2, 9, 20]
    assert cache.num_cached_blocks == 5


def test_locked_nodes_are_never_evicted_and_unlock_is_checked() -> None:
    cache = RadixCache(BS)
    r = cache.insert(_seq(8), [1, 2])
    cache.lock(r.node)
    cache.lock(r.node)
    assert cache.evict(5) == []
    cache.unlock(r.node)
    assert cache.evict(5) == []
    cache.unlock(r.node)
    with pytest.raises(RuntimeError):
        cache.unlock(r.node)
    assert cache.evict(5) == [2, 1]
    assert cache.num_evicted_blocks == 2


def test_eviction_is_lru_and_trims_the_tail_of_a_large_leaf() -> None:
    cache = RadixCache(BS)
    a, b, c = _seq(12, 0), _seq(12, 100), _seq(12, 200)
    cache.insert(a, [1, 2, 3])
    cache.insert(b, [4, 5, 6])
    cache.insert(c, [7, 8, 9])
    cache.match_prefix(a)  # a is now the most recent; b the least
    assert cache.evict(1) == [6]  # only the deepest block of b goes
    assert cache.match_prefix(b).blocks == [4, 5]  # ... and b is now the most recent
    assert cache.evict(4) == [9, 8, 7, 3]
    assert sorted(n.blocks for n in cache.nodes()) == [[1, 2], [4, 5]]


def test_parent_becomes_a_leaf_after_its_children_go() -> None:
    cache = RadixCache(BS)
    cache.insert(_seq(8), [1, 2])
    cache.insert([*_seq(4), 9, 9, 9, 9], [1, 3])  # sibling of block 2 under block 1
    cache.insert(_seq(8, 500), [4, 5])
    assert cache.evict(3) == [2, 3, 1]
    assert [n.blocks for n in cache.nodes()] == [[4, 5]]


def test_lru_heap_stays_bounded_under_repeated_hits() -> None:
    cache = RadixCache(BS)
    for i in range(8):
        cache.insert(_seq(8, 100 * i), [2 * i, 2 * i + 1])
    for _ in range(2000):
        cache.match_prefix(_seq(8, 300))
    assert len(cache._heap) <= 2 * 8 + 65
    assert cache.evict(2) == [1, 0]


# --------------------------------------------------------------- stateful model

Path = tuple[tuple[int, ...], ...]

tokens_st = st.lists(st.integers(0, 2), max_size=14)


def _chunks(tokens: list[int], bs: int) -> Path:
    return tuple(tuple(tokens[i : i + bs]) for i in range(0, len(tokens) - bs + 1, bs))


class RadixCacheMachine(RuleBasedStateMachine):
    """Random interleavings of insert / match / lock / unlock / evict against a model:
    `entries` maps every cached block-aligned prefix to its block id (prefix-closed), and
    `stamps` records the model's own access clock per prefix."""

    @initialize(bs=st.sampled_from([1, 2, 3]))
    def setup(self, bs: int) -> None:
        self.bs = bs
        self.cache = RadixCache(bs)
        self.entries: dict[Path, int] = {}
        self.stamps: dict[Path, int] = {}
        self.clock = 0
        self.ids = itertools.count()
        self.locks: list[tuple[RadixNode, Path]] = []
        self.history: list[list[int]] = []
        self.released: set[int] = set()

    def _draw_tokens(self, data: st.DataObject) -> list[int]:
        if self.history and data.draw(st.booleans()):
            base = data.draw(st.sampled_from(self.history))
            cut = data.draw(st.integers(0, len(base)))
            return base[:cut] + data.draw(tokens_st)
        return data.draw(tokens_st)

    def _touch(self, path: Path, depth: int) -> None:
        self.clock += 1
        for i in range(1, depth + 1):
            self.stamps[path[:i]] = self.clock

    def _expected_depth(self, path: Path) -> int:
        depth = 0
        while depth < len(path) and path[: depth + 1] in self.entries:
            depth += 1
        return depth

    @rule(data=st.data())
    def insert(self, data: st.DataObject) -> None:
        tokens = self._draw_tokens(data)
        path = _chunks(tokens, self.bs)
        blocks = [next(self.ids) for _ in path]
        extra = data.draw(st.integers(0, 1))  # an id for a partial block may come along
        res = self.cache.insert(tokens, blocks + [next(self.ids) for _ in range(extra)])
        expected_new = [b for i, b in enumerate(blocks) if path[: i + 1] not in self.entries]
        assert res.new_blocks == expected_new
        assert res.num_tokens == len(path) * self.bs
        assert res.node.end == res.num_tokens
        for i, b in enumerate(blocks):
            self.entries.setdefault(path[: i + 1], b)
        assert res.blocks == [self.entries[path[: i + 1]] for i in range(len(path))]
        self._touch(path, len(path))
        self.history.append(tokens)

    def _match(self, tokens: list[int]) -> tuple[RadixNode, Path]:
        path = _chunks(tokens, self.bs)
        depth = self._expected_depth(path)
        hits_before = self.cache.num_hit_tokens
        m = self.cache.match_prefix(tokens)
        assert m.num_tokens == depth * self.bs
        assert m.blocks == [self.entries[path[: i + 1]] for i in range(depth)]
        assert m.node.end == m.num_tokens
        assert self.cache.num_hit_tokens - hits_before == m.num_tokens
        self._touch(path, depth)
        return m.node, path[:depth]

    @rule(data=st.data())
    def match(self, data: st.DataObject) -> None:
        self._match(self._draw_tokens(data))

    @rule(data=st.data())
    def match_and_lock(self, data: st.DataObject) -> None:
        node, path = self._match(self._draw_tokens(data))
        self.cache.lock(node)
        self.locks.append((node, path))

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.locks) - 1))
        node, _ = self.locks.pop(i)
        self.cache.unlock(node)

    def _locked(self) -> set[Path]:
        return {path[:i] for _, path in self.locks for i in range(1, len(path) + 1)}

    @rule(n=st.integers(0, 6))
    def evict(self, n: int) -> None:
        locked = self._locked()
        evictable = len(self.entries) - len(locked)
        released = self.cache.evict(n)
        assert len(released) == min(n, evictable)
        by_block = {b: p for p, b in self.entries.items()}
        for block in released:
            assert block not in self.released, "block evicted twice"
            self.released.add(block)
            path = by_block[block]
            parents = {p[:-1] for p in self.entries}
            leaves = [p for p in self.entries if p not in parents and p not in locked]
            assert path in leaves, "evicted a locked node or a non-leaf"
            assert self.stamps[path] == min(self.stamps[p] for p in leaves), "not LRU"
            del self.entries[path]

    @invariant()
    def tree_matches_model(self) -> None:
        if not hasattr(self, "cache"):
            return
        cache, bs = self.cache, self.bs
        rebuilt: dict[Path, int] = {}
        locked = self._locked()
        stack: list[tuple[RadixNode, Path]] = [(cache.root, ())]
        while stack:
            node, path = stack.pop()
            for first, child in node.children.items():
                assert child.parent is node and child.key[:bs] == first
                assert len(child.key) == bs * len(child.blocks) > 0
                assert child.end == bs * len(path) + len(child.key)
                child_path = path + _chunks(list(child.key), bs)
                for i, b in enumerate(child.blocks):
                    rebuilt[child_path[: len(path) + i + 1]] = b
                holders = sum(1 for _, p in self.locks if p[: len(child_path)] == child_path)
                assert child.lock_ref == holders
                stack.append((child, child_path))
        assert rebuilt == self.entries
        assert cache.num_cached_blocks == len(self.entries)
        assert cache.num_evictable_blocks == len(self.entries) - len(locked)


TestRadixCacheMachine = RadixCacheMachine.TestCase
TestRadixCacheMachine.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
