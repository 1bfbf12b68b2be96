"""Paged KV-cache bookkeeping: a fixed pool of blocks, per-sequence block tables, sharing.

The model runner preallocates `num_blocks` KV blocks of `block_size` token slots once;
this module decides which sequence uses which block. It is plain Python over integer ids.

Reference counts. Every block has one count: +1 for each block table that lists it and +1
while the radix cache holds it. A block is free exactly when its count is zero. Sharing a
common prefix or forking the n > 1 samples of one prompt therefore costs no copies; a
shared block is copied only when a sequence is about to write into it (copy-on-write, in
`ensure`, which hands the (src, dst) pairs to the model runner). In practice that is the
partly filled last block after `fork`: cached blocks are full and never written again.

Prefix cache and locks. With prefix caching on, `allocate` reuses the longest cached
prefix and locks its radix node, and `cache` moves that lock down to the deepest node the
sequence has inserted. So a cached block that some sequence also uses always sits under a
node that sequence has locked, which makes three states exact:
  free       count 0, on the free list;
  evictable  in an unlocked radix node, so its only reference is the cache's;
  used       everything else (in some block table, or in a locked node).
`num_free_blocks + num_used_blocks + num_evictable_blocks == num_blocks` always holds.
When the free list runs short, `allocate` and `ensure` evict least recently used unlocked
leaves from the cache before they give up with `NoFreeBlocksError`; both are all-or-
nothing, so a failed call changes nothing.

Forks and the cache. A block that is not cached yet can be shared only through `fork`.
So when `cache` adopts blocks, it also moves down the lock of every other sequence of the
same fork family that references them (the family is the sequence, its forks, their forks
and so on). Otherwise a sibling would keep using a cached block without holding a lock over
it, and that block would count as evictable while in use. Thus the prompt's blocks can be
cached before or after forking the n > 1 samples, by any of them.

Concurrent identical prompts. If two sequences prefilled the same tokens into different
blocks, the first `cache` call wins: the tree keeps its ids, and the other sequence keeps
its private copy, which is freed with the sequence.

Watermark. The admission check `can_allocate` keeps `watermark * num_blocks` blocks spare
so that admitting a prompt does not immediately force a preemption; `ensure` and
`allocate` themselves may use every block.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.radix_cache import InsertResult, RadixCache, RadixNode


class NoFreeBlocksError(RuntimeError):
    """The pool (free blocks plus evictable cached blocks) cannot satisfy a request."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Block pool, block tables, reference counts and the optional radix prefix cache."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        watermark: float = 0.01,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(
                f"need num_blocks > 0 and block_size > 0, got {num_blocks}, {block_size}"
            )
        if not 0.0 <= watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {watermark}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.watermark_blocks = int(watermark * num_blocks)
        self.prefix_cache: RadixCache | None = (
            RadixCache(block_size) if enable_prefix_caching else None
        )
        self._ref_counts = [0] * num_blocks
        # A stack: the most recently freed block is reused first.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[int, list[int]] = {}
        self._num_slots: dict[int, int] = {}  # token slots each table has been grown to
        self._locks: dict[int, RadixNode] = {}  # radix node each sequence holds locked
        self._families: dict[int, set[int]] = {}  # forked sequences -> their fork family

    # ------------------------------------------------------------- accounting

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_evictable_blocks(self) -> int:
        return self.prefix_cache.num_evictable_blocks if self.prefix_cache else 0

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks - self.num_evictable_blocks

    @property
    def usage(self) -> float:
        """Fraction of the pool that cannot be handed out without preempting anyone."""
        return self.num_used_blocks / self.num_blocks

    def num_available_blocks(self) -> int:
        """Blocks a request could get right now: free ones plus evictable cached ones."""
        return self.num_free_blocks + self.num_evictable_blocks

    def block_table(self, seq_id: int) -> list[int]:
        """The sequence's block ids in position order (the live list; do not mutate)."""
        return self._tables[seq_id]

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._tables

    # -------------------------------------------------------------- admission

    def _prompt_needs(self, token_ids: Sequence[int], reuse: bool = True) -> tuple[int, int]:
        """(fresh blocks `allocate` would take, blocks it would still find available).

        Locking the cache hit pins whatever part of it is evictable now, so that part is
        subtracted from what remains available.
        """
        bs = self.block_size
        cached = pinned = 0
        if self.prefix_cache is not None and len(token_ids) > 1 and reuse:
            cached, pinned = self.prefix_cache.peek(token_ids[:-1])
        need = _cdiv(len(token_ids), bs) - cached // bs
        return need, self.num_available_blocks() - pinned // bs

    def can_allocate(self, token_ids: Sequence[int], reuse: bool = True) -> bool:
        """Could a prompt be admitted now and still leave the watermark free?"""
        need, available = self._prompt_needs(token_ids, reuse)
        return need + self.watermark_blocks <= available

    def allocate(self, seq_id: int, token_ids: Sequence[int], reuse: bool = True) -> int:
        """Build `seq_id`'s block table covering `len(token_ids)` token slots.

        Reuses the longest cached prefix of `token_ids[:-1]` in whole blocks (the last
        prompt token is always computed, since its logits are needed) and locks it; fresh
        blocks cover the rest. Returns the number of cached tokens, a multiple of
        `block_size`. Raises `NoFreeBlocksError` (changing nothing) if the blocks cannot be
        found even after evicting from the cache. Without `reuse`, every token is computed
        (the lock is then on the cache's root, where `cache` moves it down as usual).
        """
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already has a block table")
        need, available = self._prompt_needs(token_ids, reuse)
        if need > available:
            raise NoFreeBlocksError(
                f"prompt of {len(token_ids)} tokens needs {need} blocks, {available} available"
            )
        table: list[int] = []
        cached = 0
        if self.prefix_cache is not None:
            match = self.prefix_cache.match_prefix(token_ids[:-1] if reuse else [])
            self.prefix_cache.lock(match.node)  # before evicting, so the hit stays put
            self._locks[seq_id] = match.node
            table = match.blocks
            cached = match.num_tokens
            for block in table:
                self._ref_counts[block] += 1
        table.extend(self._take(need))
        self._tables[seq_id] = table
        self._num_slots[seq_id] = len(token_ids)
        return cached

    # ----------------------------------------------------------------- growth

    def _plan(self, table: list[int], num_tokens: int, write_from: int) -> tuple[int, list[int]]:
        """(blocks to append, indexes of shared blocks that [write_from, num_tokens) fall in).

        Called for every running sequence every step, hence written for speed: a decode
        step that stays inside an exclusively owned last block loops once and allocates
        nothing.
        """
        bs = self.block_size
        end = -(-num_tokens // bs)
        refs = self._ref_counts
        shared = [i for i in range(write_from // bs, min(end, len(table))) if refs[table[i]] > 1]
        return max(0, end - len(table)), shared

    def blocks_needed(self, seq_id: int, num_tokens: int, write_from: int | None = None) -> int:
        """New blocks, copy-on-write copies included, that `ensure` would take.

        `write_from` defaults to the slots the table already covers, i.e. only the new
        positions are written (a decode step).
        """
        if write_from is None:
            write_from = self._num_slots[seq_id]
        grow, shared = self._plan(self._tables[seq_id], num_tokens, write_from)
        return grow + len(shared)

    def ensure(self, seq_id: int, num_tokens: int, write_from: int) -> list[tuple[int, int]]:
        """Grow `seq_id`'s table to cover `num_tokens` slots; make [write_from, num_tokens)
        writable.

        Every block that those positions fall in ends up owned by this sequence alone: a
        shared one is replaced in this table by a fresh block. Returns the (src, dst)
        block pairs whose KV the model runner must copy before it writes. Evicts from the
        cache if the free list is short; raises `NoFreeBlocksError` (changing nothing) if
        even that is not enough.
        """
        table = self._tables[seq_id]
        grow, shared = self._plan(table, num_tokens, write_from)
        copies: list[tuple[int, int]] = []
        if grow or shared:
            need = grow + len(shared)
            if need > self.num_available_blocks():
                raise NoFreeBlocksError(
                    f"sequence {seq_id} needs {need} blocks, "
                    f"{self.num_available_blocks()} available"
                )
            fresh = self._take(need)
            for i in shared:
                src, dst = table[i], fresh.pop()
                table[i] = dst
                self._release(src)
                copies.append((src, dst))
            table.extend(fresh)
        if num_tokens > self._num_slots[seq_id]:
            self._num_slots[seq_id] = num_tokens
        return copies

    def fork(self, parent_seq_id: int, child_seq_id: int) -> None:
        """Give `child_seq_id` the parent's blocks by reference (the n > 1 samples)."""
        if child_seq_id in self._tables:
            raise ValueError(f"sequence {child_seq_id} already has a block table")
        table = self._tables[parent_seq_id]
        for block in table:
            self._ref_counts[block] += 1
        self._tables[child_seq_id] = list(table)
        self._num_slots[child_seq_id] = self._num_slots[parent_seq_id]
        family = self._families.setdefault(parent_seq_id, {parent_seq_id})
        family.add(child_seq_id)
        self._families[child_seq_id] = family
        node = self._locks.get(parent_seq_id)
        if node is not None:
            self.prefix_cache.lock(node)  # type: ignore[union-attr]
            self._locks[child_seq_id] = node

    # ---------------------------------------------------------- prefix cache

    def cache(self, seq_id: int, token_ids: Sequence[int]) -> None:
        """Insert the full blocks of `token_ids` into the prefix cache.

        `token_ids` must be the sequence's tokens whose KV is already computed and stored
        in its table (a trailing partial block is ignored). The sequence's lock, and that
        of any fork relative sharing the inserted blocks, moves down to the deepest node
        whose blocks it uses, so they stay pinned while it runs. Where the tree already
        held other blocks for these tokens, the sequence keeps its private copies. No-op
        with prefix caching off.
        """
        if self.prefix_cache is None:
            return
        result = self.prefix_cache.insert(token_ids, self._tables[seq_id])
        for block in result.new_blocks:
            self._ref_counts[block] += 1
        for sid in self._families.get(seq_id, (seq_id,)):
            self._lock_down(sid, token_ids, result)

    def _lock_down(self, seq_id: int, token_ids: Sequence[int], inserted: InsertResult) -> None:
        """Move `seq_id`'s lock to the deepest node of the just inserted path whose block
        its table references, if that is deeper than its current lock.

        The new node is a descendant of the old one: a shared block means shared tokens
        before it, and the old lock covers a prefix of the sequence's own tokens.
        """
        cache = self.prefix_cache
        assert cache is not None
        table, path = self._tables[seq_id], inserted.blocks
        depth = min(len(table), len(path))
        while depth and table[depth - 1] != path[depth - 1]:
            depth -= 1
        end = depth * self.block_size
        old = self._locks[seq_id]
        if end <= old.end:
            return
        node = inserted.node if end == inserted.num_tokens else cache.node_at(token_ids[:end])
        cache.lock(node)
        cache.unlock(old)
        self._locks[seq_id] = node

    def reset_prefix_cache(self) -> int:
        """Evict every evictable cached block (benchmarks, tests); returns how many."""
        if self.prefix_cache is None:
            return 0
        released = self.prefix_cache.reset()
        for block in released:
            self._release(block)
        return len(released)

    # ---------------------------------------------------------------- release

    def free(self, seq_id: int) -> None:
        """Drop the sequence's references and its lock.

        Blocks the cache still holds become evictable (once no one else locks them); the
        rest go back to the free list. Unknown ids are ignored, so an abort that races
        with completion is harmless.
        """
        table = self._tables.pop(seq_id, None)
        if table is None:
            return
        del self._num_slots[seq_id]
        for block in table:
            self._release(block)
        family = self._families.pop(seq_id, None)
        if family is not None:
            family.discard(seq_id)
        node = self._locks.pop(seq_id, None)
        if node is not None:
            self.prefix_cache.unlock(node)  # type: ignore[union-attr]

    # -------------------------------------------------------------- internals

    def _take(self, n: int) -> list[int]:
        """Pop `n` free blocks (count 1 each), evicting from the cache to make up a
        shortfall. Callers check availability first."""
        short = n - len(self._free)
        if short > 0 and self.prefix_cache is not None:
            for block in self.prefix_cache.evict(short):
                self._release(block)
        if n > len(self._free):
            raise NoFreeBlocksError(f"need {n} blocks, {len(self._free)} free")
        blocks = self._free[len(self._free) - n :]
        del self._free[len(self._free) - n :]
        blocks.reverse()
        for block in blocks:
            self._ref_counts[block] = 1
        return blocks

    def _release(self, block: int) -> None:
        count = self._ref_counts[block] - 1
        if count < 0:
            raise RuntimeError(f"block {block} released more often than referenced")
        self._ref_counts[block] = count
        if count == 0:
            self._free.append(block)
