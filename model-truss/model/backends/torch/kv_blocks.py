"""Which KV blocks each sequence owns: paged allocation with reference counts and prefix reuse.

The pool (`attention.KVPool`) holds `num_blocks` blocks of `block_size` token slots; slot
`block * block_size + offset` holds one token's keys and values in every layer. Block 0 is the scratch block:
never handed out, it takes the writes of the padding rows of a CUDA-graph bucket.

A sequence's block table lists its blocks in order, so logical position p lives in slot
`table[p // block_size] * block_size + p % block_size`; rows join and leave without moving anything.

Prefix caching: once a block is full and its tokens are known, it is registered under a chained hash of every
token from position 0 to its end, so a later prompt with the same prefix reuses its KV (nano-vllm's scheme).
Freed blocks keep their hash and stay reusable until they are handed out again, least recently freed first.
Because a hash covers the whole prefix, a cached block always sits at the same logical index, so
`logical_index[block]` is well defined; the attention masks use it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

SCRATCH_BLOCK = 0


@dataclass
class BlockTable:
    """One sequence's blocks, and how many of them are registered in the prefix cache."""

    blocks: list[int] = field(default_factory=list)
    hashed: int = 0  # blocks[:hashed] are registered under `hashes`
    hashes: list[int] = field(default_factory=list)


class BlockManager:
    """Allocates blocks to sequences; all bookkeeping is on the host (the engine thread owns it)."""

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool) -> None:
        if num_blocks < 2:
            raise ValueError(f"a KV pool needs at least 2 blocks (one is scratch), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._refs = [0] * num_blocks
        self._hash_of: list[int | None] = [None] * num_blocks
        self._tokens_of: list[tuple[int, ...] | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}  # prefix hash -> block
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self.logical_index = np.zeros(num_blocks, dtype=np.int32)  # block -> its index in the tables holding it
        self.changed: list[int] = []  # blocks whose logical_index changed since the runner last read them
        self.queries = 0  # prompt tokens looked up in the prefix cache
        self.hits = 0  # of those, tokens whose KV was reused

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the usable blocks held by sequences (cached-but-free blocks count as free)."""
        return 1.0 - self.free_blocks / self.usable_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def cached_prefix(self, token_ids: list[int]) -> list[int]:
        """The cached blocks of the longest known prefix, leaving at least the last token to compute."""
        if not self.prefix_caching:
            return []
        found: list[int] = []
        parent = 0
        for index in range((len(token_ids) - 1) // self.block_size):
            chunk = tuple(token_ids[index * self.block_size : (index + 1) * self.block_size])
            parent = hash((parent, chunk))
            block = self._cached.get(parent)
            if block is None or self._tokens_of[block] != chunk:
                break
            found.append(block)
        return found

    def can_allocate(self, token_ids: list[int], reserve: int = 0) -> bool:
        """Whether a sequence of these tokens fits now, keeping `reserve` blocks free."""
        cached = self.cached_prefix(token_ids)
        reused_free = sum(1 for block in cached if self._refs[block] == 0)
        needed = self.blocks_for(len(token_ids)) - len(cached) + reused_free
        return needed + reserve <= self.free_blocks

    def allocate(self, table: BlockTable, token_ids: list[int]) -> int:
        """Give a new sequence blocks for `token_ids`; returns how many leading tokens are already computed."""
        if table.blocks:
            raise ValueError("allocate() is for a sequence that holds no blocks")
        cached = self.cached_prefix(token_ids)
        for block in cached:
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
            table.blocks.append(block)
        table.hashes = [self._hash_of[b] for b in cached]  # type: ignore[misc]
        table.hashed = len(cached)
        self.grow(table, len(token_ids))
        reused = len(cached) * self.block_size
        self.queries += len(token_ids)
        self.hits += reused
        return reused

    def can_grow(self, table: BlockTable, tokens: int) -> bool:
        return self.blocks_for(tokens) - len(table.blocks) <= self.free_blocks

    def grow(self, table: BlockTable, tokens: int) -> None:
        """Make the table cover `tokens` positions (the caller checked `can_grow`)."""
        while len(table.blocks) < self.blocks_for(tokens):
            block = self._take_free()
            self.logical_index[block] = len(table.blocks)
            self.changed.append(block)
            table.blocks.append(block)

    def register(self, table: BlockTable, token_ids: list[int], computed: int) -> None:
        """Put the table's full blocks whose KV is computed and whose tokens are known into the prefix cache."""
        if not self.prefix_caching:
            return
        full = min(computed, len(token_ids)) // self.block_size
        while table.hashed < full:
            index = table.hashed
            chunk = tuple(token_ids[index * self.block_size : (index + 1) * self.block_size])
            parent = table.hashes[-1] if table.hashes else 0
            digest = hash((parent, chunk))
            block = table.blocks[index]
            if self._hash_of[block] is None and digest not in self._cached:
                self._hash_of[block], self._tokens_of[block] = digest, chunk
                self._cached[digest] = block
            table.hashes.append(digest)
            table.hashed += 1

    def free(self, table: BlockTable) -> None:
        """Release a sequence's blocks; cached ones stay reusable until handed out again."""
        for block in reversed(table.blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
        table.blocks.clear()
        table.hashes.clear()
        table.hashed = 0

    def _take_free(self) -> int:
        block, _ = self._free.popitem(last=False)  # least recently freed
        digest = self._hash_of[block]
        if digest is not None:
            if self._cached.get(digest) == block:
                del self._cached[digest]
            self._hash_of[block] = self._tokens_of[block] = None
        self._refs[block] = 1
        return block
