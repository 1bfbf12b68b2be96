"""Radix tree over token ids that maps cached prefixes to KV-cache block ids.

The tree lets a new request reuse the KV of any earlier request (or earlier turn of the
same conversation) that started with the same tokens, so the model only computes the
part that is new.

Granularity. Everything is in whole KV blocks of `block_size` tokens: an edge's key is
always a multiple of `block_size` long and holds exactly one block id per `block_size`
tokens. A partly filled last block is never cached; `insert` ignores a trailing partial
block and `match_prefix` rounds the match down to whole blocks. That keeps a cached block
immutable (nobody appends into it), so sharing needs no copy-on-write inside the tree.

Layout. Edges are compressed: a node's `key` is a tuple of token ids that may span many
blocks, and a parent finds its children by the tuple of their first block's tokens, so a
lookup costs one dict probe per node plus one C-level tuple comparison per edge. A
mismatch inside an edge is located by binary search over block-aligned prefixes.

Locks. A request that uses cached blocks locks the deepest node it uses; the lock count
is added to that node and to all its ancestors, so "unlocked" always means "no request
uses anything in my subtree". Only unlocked nodes are evictable, and the cache keeps a
running count of their blocks (`num_evictable_blocks`).

Eviction. Least recently used first, deepest first: the victim is the unlocked leaf with
the oldest access time (a logical clock bumped by every `match_prefix` / `insert` that
walks through a node). A leaf larger than what is asked for is trimmed from its tail, so
exactly the requested number of blocks is released when that many are evictable. Leaves
sit in a min-heap with lazy invalidation: a heap entry is acted on only if the node is
still attached, still a leaf, still unlocked and its access time is unchanged; the heap is
rebuilt when stale entries outnumber live nodes.

The cache only tracks ids: it neither owns nor frees blocks. `BlockManager` holds one
reference per cached block on the cache's behalf and returns evicted ids to its free list.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


class RadixNode:
    """One compressed edge of the tree plus the node it leads to."""

    __slots__ = ("blocks", "children", "end", "key", "last_access", "lock_ref", "parent")

    def __init__(
        self,
        key: tuple[int, ...],
        blocks: list[int],
        parent: RadixNode | None,
        end: int,
        last_access: int,
        lock_ref: int = 0,
    ) -> None:
        self.key = key  # token ids on the edge from `parent`; len == len(blocks) * block_size
        self.blocks = blocks  # one KV block id per block_size tokens of `key`
        self.parent = parent  # None for the root and for nodes removed from the tree
        self.children: dict[tuple[int, ...], RadixNode] = {}
        self.end = end  # number of tokens from the root to the end of this node's key
        self.last_access = last_access
        self.lock_ref = lock_ref

    def __repr__(self) -> str:
        return (
            f"RadixNode(end={self.end}, blocks={self.blocks}, lock_ref={self.lock_ref}, "
            f"children={len(self.children)})"
        )


@dataclass
class PrefixMatch:
    """Result of `RadixCache.match_prefix`.

    `node` is the deepest node of the match (the root when nothing matched); lock it to
    keep `blocks` from being evicted while a request uses them.
    """

    blocks: list[int]
    num_tokens: int
    node: RadixNode


@dataclass
class InsertResult:
    """Result of `RadixCache.insert`.

    `node` is the deepest node covering the inserted whole blocks (`num_tokens` tokens),
    and `blocks` the tree's ids along that path. `new_blocks` are the caller's ids the
    tree adopted; for token ranges the tree already held, the tree keeps its own ids and
    the caller's ids are not in `new_blocks`.
    """

    node: RadixNode
    num_tokens: int
    blocks: list[int]
    new_blocks: list[int]


class RadixCache:
    """Prefix cache: radix tree from token-id prefixes (in whole blocks) to KV block ids."""

    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.root = RadixNode(key=(), blocks=[], parent=None, end=0, last_access=0)
        self._clock = 0
        self._heap: list[tuple[int, int, RadixNode]] = []
        self._heap_seq = itertools.count()
        self._num_nodes = 0
        self.num_cached_blocks = 0
        self.num_evictable_blocks = 0
        # Counters for metrics; monotone over the cache's life.
        self.num_queries = 0
        self.num_query_tokens = 0
        self.num_hit_tokens = 0
        self.num_evicted_blocks = 0

    # ----------------------------------------------------------------- lookup

    def match_prefix(self, token_ids: Sequence[int]) -> PrefixMatch:
        """Longest cached prefix of `token_ids`, in whole blocks.

        Refreshes the access time of every node on the matched path and counts one query
        of `len(token_ids)` tokens with `num_tokens` hit tokens. If the match ends inside
        an edge, that edge is split so that the returned node covers exactly the match
        (locking it then protects just what the caller uses).
        """
        tokens = tuple(token_ids)
        self.num_queries += 1
        self.num_query_tokens += len(tokens)
        path, matched = self._descend(tokens)
        self._clock += 1
        blocks: list[int] = []
        for node in path:
            node.last_access = self._clock
            blocks.extend(node.blocks)
        node = path[-1] if path else self.root
        self._push_if_evictable(node)
        self.num_hit_tokens += matched
        return PrefixMatch(blocks=blocks, num_tokens=matched, node=node)

    def node_at(self, token_ids: Sequence[int]) -> RadixNode:
        """The node whose path is exactly `token_ids`, which must be cached whole blocks.

        Splits an edge if needed; counts nothing and leaves the LRU order alone. For
        moving a lock down a path that was just inserted.
        """
        path, matched = self._descend(tuple(token_ids))
        if matched != len(token_ids):
            raise KeyError(f"{len(token_ids)} tokens requested, {matched} cached")
        return path[-1] if path else self.root

    def _descend(self, tokens: tuple[int, ...]) -> tuple[list[RadixNode], int]:
        """`_walk`, then split the partly matched edge so the path ends at the match."""
        path, partial, matched = self._walk(tokens)
        if partial is not None:
            path.append(self._split(partial, matched - partial.end + len(partial.key)))
        return path, matched

    def peek(self, token_ids: Sequence[int]) -> tuple[int, int]:
        """(cached tokens, of which tokens in unlocked nodes) for `token_ids`, read-only.

        For admission checks: unlike `match_prefix` it changes nothing, counts no query and
        leaves the LRU order alone. The second figure tells how many currently evictable
        blocks a request would pin by locking its match.
        """
        path, partial, matched = self._walk(tuple(token_ids))
        unlocked = 0
        if partial is not None and partial.lock_ref == 0:
            unlocked = matched - (partial.end - len(partial.key))
        for node in reversed(path):  # lock counts only grow towards the root
            if node.lock_ref:
                break
            unlocked += len(node.key)
        return matched, unlocked

    def _walk(self, tokens: tuple[int, ...]) -> tuple[list[RadixNode], RadixNode | None, int]:
        """Follow `tokens` down the tree in whole blocks.

        Returns the fully matched nodes (root excluded), the node whose edge matched only
        partly (or None), and the number of matched tokens.
        """
        bs = self.block_size
        limit = len(tokens) - len(tokens) % bs
        path: list[RadixNode] = []
        node = self.root
        pos = 0
        while pos < limit:
            child = node.children.get(tokens[pos : pos + bs])
            if child is None:
                break
            klen = len(child.key)
            if pos + klen <= limit and tokens[pos : pos + klen] == child.key:
                path.append(child)
                pos += klen
                node = child
                continue
            return path, child, pos + self._common_blocks(tokens, pos, limit, child.key)
        return path, None, pos

    def _common_blocks(
        self, tokens: tuple[int, ...], pos: int, limit: int, key: tuple[int, ...]
    ) -> int:
        """Tokens (a multiple of block_size, at least one block) that `tokens[pos:limit]`
        and `key` share, found by binary search over block-aligned prefix equality.

        The caller guarantees the first block matches and the whole key does not.
        """
        bs = self.block_size
        lo = 1  # blocks known to match
        hi = min(len(key), limit - pos) // bs  # upper bound on matching blocks
        if tokens[pos : pos + hi * bs] == key[: hi * bs]:
            return hi * bs
        hi -= 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if tokens[pos : pos + mid * bs] == key[: mid * bs]:
                lo = mid
            else:
                hi = mid - 1
        return lo * bs

    # ----------------------------------------------------------------- insert

    def insert(self, token_ids: Sequence[int], blocks: Sequence[int]) -> InsertResult:
        """Cache the whole blocks of `token_ids`, whose KV lives in `blocks`.

        A trailing partial block of `token_ids` (and any extra entries of `blocks`) are
        ignored. Token ranges already in the tree keep the tree's block ids; the rest
        becomes one new leaf holding the caller's ids (`InsertResult.new_blocks`). Every
        node on the path gets a fresh access time.
        """
        bs = self.block_size
        tokens = tuple(token_ids)
        limit = len(tokens) - len(tokens) % bs
        if len(blocks) < limit // bs:
            raise ValueError(
                f"{limit // bs} whole blocks of tokens but only {len(blocks)} block ids"
            )
        self._clock += 1
        node = self.root
        pos = 0
        path_blocks: list[int] = []
        new_blocks: list[int] = []
        while pos < limit:
            child = node.children.get(tokens[pos : pos + bs])
            if child is None:
                new_blocks = list(blocks[pos // bs : limit // bs])
                child = RadixNode(
                    key=tokens[pos:limit],
                    blocks=new_blocks,
                    parent=node,
                    end=limit,
                    last_access=self._clock,
                )
                node.children[tokens[pos : pos + bs]] = child
                self._num_nodes += 1
                self.num_cached_blocks += len(new_blocks)
                self.num_evictable_blocks += len(new_blocks)
                path_blocks.extend(new_blocks)
                node = child
                break
            klen = len(child.key)
            if not (pos + klen <= limit and tokens[pos : pos + klen] == child.key):
                child = self._split(child, self._common_blocks(tokens, pos, limit, child.key))
            child.last_access = self._clock
            path_blocks.extend(child.blocks)
            pos += len(child.key)
            node = child
        self._push_if_evictable(node)
        return InsertResult(node=node, num_tokens=limit, blocks=path_blocks, new_blocks=new_blocks)

    def _split(self, node: RadixNode, at: int) -> RadixNode:
        """Cut `node`'s edge `at` tokens in (a block multiple); return the new upper node.

        `node` keeps its identity (and so any lock a request holds on it) as the lower
        half; the upper half inherits its lock count, since every lock on `node` also
        counts on its ancestors.
        """
        bs = self.block_size
        parent = node.parent
        assert parent is not None and 0 < at < len(node.key) and at % bs == 0
        upper = RadixNode(
            key=node.key[:at],
            blocks=node.blocks[: at // bs],
            parent=parent,
            end=node.end - len(node.key) + at,
            last_access=node.last_access,
            lock_ref=node.lock_ref,
        )
        parent.children[node.key[:bs]] = upper
        node.key = node.key[at:]
        node.blocks = node.blocks[at // bs :]
        node.parent = upper
        upper.children[node.key[:bs]] = node
        self._num_nodes += 1
        return upper

    # ------------------------------------------------------------------ locks

    def lock(self, node: RadixNode) -> None:
        """Pin `node` and its ancestors against eviction (counted; pair with `unlock`)."""
        while node is not self.root:
            if node.lock_ref == 0:
                self.num_evictable_blocks -= len(node.blocks)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: RadixNode) -> None:
        """Undo one `lock(node)`; nodes whose count drops to zero become evictable."""
        leaf = node
        while node is not self.root:
            if node.lock_ref <= 0:
                raise RuntimeError(f"unlock of an unlocked node {node!r}")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.num_evictable_blocks += len(node.blocks)
            node = node.parent  # type: ignore[assignment]
        self._push_if_evictable(leaf)

    # --------------------------------------------------------------- eviction

    def evict(self, num_blocks: int) -> list[int]:
        """Release up to `num_blocks` blocks from unlocked leaves, least recently used first.

        Returns the released ids in eviction order (a leaf's deepest block first). Fewer
        than asked come back only when fewer are evictable.
        """
        released: list[int] = []
        heap = self._heap
        while len(released) < num_blocks and heap:
            stamp, _, node = heap[0]
            if not self._is_evictable_leaf(node) or node.last_access != stamp:
                heapq.heappop(heap)
                continue
            take = min(len(node.blocks), num_blocks - len(released))
            if take < len(node.blocks):  # trim the tail; the node stays the LRU leaf
                released.extend(reversed(node.blocks[-take:]))
                del node.blocks[-take:]
                node.key = node.key[: -take * self.block_size]
                node.end -= take * self.block_size
                continue
            heapq.heappop(heap)
            released.extend(reversed(node.blocks))
            parent = node.parent
            assert parent is not None
            del parent.children[node.key[: self.block_size]]
            node.parent = None
            self._num_nodes -= 1
            self._push_if_evictable(parent)
        self.num_cached_blocks -= len(released)
        self.num_evictable_blocks -= len(released)
        self.num_evicted_blocks += len(released)
        return released

    def reset(self) -> list[int]:
        """Evict everything that is evictable; returns the released block ids."""
        return self.evict(self.num_evictable_blocks)

    def _is_evictable_leaf(self, node: RadixNode) -> bool:
        return node.parent is not None and not node.children and node.lock_ref == 0

    def _push_if_evictable(self, node: RadixNode) -> None:
        """Offer `node` to the LRU heap; stale entries are skipped when popped."""
        if not self._is_evictable_leaf(node):
            return
        if len(self._heap) > 2 * self._num_nodes + 64:
            self._rebuild_heap()
        heapq.heappush(self._heap, (node.last_access, next(self._heap_seq), node))

    def _rebuild_heap(self) -> None:
        self._heap = [
            (n.last_access, next(self._heap_seq), n)
            for n in self.nodes()
            if self._is_evictable_leaf(n)
        ]
        heapq.heapify(self._heap)

    def nodes(self) -> Iterator[RadixNode]:
        """Every node except the root, parents before children."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())
