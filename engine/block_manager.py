"""BlockManager: the paged KV pool in pure Python (no torch).

A fixed pool of block ids with reference counts and one free queue. With prefix caching a
full block is keyed by hash((parent block's hash, its token ids)); a freed block keeps its
key and stays findable until it is reused, so the free queue doubles as the LRU list of
evictable cached blocks (popped from the front, freed blocks appended at the back, a
sequence's tail first so its prefix is evicted last). As in vLLM v1."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Protocol

ROOT_HASH = -1  # the parent hash of a sequence's first block


class BlockOwner(Protocol):
    """What the block manager reads and writes of a sequence."""

    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int]
    block_hashes: list[int]


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    # Set while the block is registered in the prefix cache.
    block_hash: int | None = None
    # (parent hash, token ids): checked on a hit so a hash collision cannot alias blocks.
    key: tuple[int, tuple[int, ...]] | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Unreferenced blocks, least recently freed first (the eviction order).
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id

    # ---- figures -----------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody references (evictable cached blocks included)."""
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def usage(self) -> float:
        """Referenced blocks / total, 0..1 (the KV-usage metric)."""
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- allocation --------------------------------------------------------------------

    def find_cached_prefix(self, seq: BlockOwner) -> list[int]:
        """Cached blocks equal to the sequence's leading full blocks. At least one token is
        left uncovered: the last prompt position must run to give logits."""
        if not self.enable_prefix_caching:
            return []
        n_full = (len(seq.token_ids) - 1) // self.block_size
        self._extend_hashes(seq, n_full)
        hits: list[int] = []
        for i in range(n_full):
            block_id = self.cached.get(seq.block_hashes[i])
            if block_id is None or self.blocks[block_id].key != self._key(seq, i):
                break
            hits.append(block_id)
        return hits

    def allocate(
        self,
        seq: BlockOwner,
        num_new_tokens: int,
        cached: Seq[int] = (),
        num_lookahead_tokens: int = 0,
    ) -> bool:
        """Grow seq's block table to hold its computed tokens (or the cached prefix) plus
        num_new_tokens more; False, changing nothing, if the free blocks do not suffice.
        `cached` (from find_cached_prefix) is only for a sequence holding no blocks.
        num_lookahead_tokens: slots after the new ones for tokens not in token_ids (drafts,
        or the tokens of a plan's later forward passes): blocks holding any are not keyed
        (release_unverified settles them)."""
        if cached and seq.block_table:
            raise ValueError("cached prefix blocks can only start an empty block table")
        start = max(seq.num_computed_tokens, len(cached) * self.block_size)
        end = start + num_new_tokens
        bs = self.block_size
        if end + num_lookahead_tokens <= len(seq.block_table) * bs:
            # Room already (most decode steps): only a block this step fills gets its key.
            if self.enable_prefix_caching and end // bs > start // bs:
                self._register_full_blocks(seq, start // bs, end // bs)
            return True
        need = self.blocks_needed(end + num_lookahead_tokens) - len(seq.block_table) - len(cached)
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        if max(need, 0) + revived > len(self.free_queue):
            return False
        for block_id in cached:
            self._reference(block_id)
        seq.block_table.extend(cached)
        seq.block_table.extend(self._pop_free() for _ in range(need))
        if self.enable_prefix_caching:
            self._register_full_blocks(seq, start // bs, end // bs)
        return True

    def release_unverified(self, seq: BlockOwner, first_new: int) -> None:
        """After a step with lookahead slots (seq.num_computed_tokens now counts the
        accepted drafts, or the passes' tokens; first_new was the step's first position):
        key the blocks they filled, and return the blocks that only rejected drafts or
        passes not run reached, first in line for reuse (their K/V is garbage and they were
        never keyed)."""
        keep = self.blocks_needed(seq.num_computed_tokens)
        for block_id in seq.block_table[keep:]:
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                self.free_queue.move_to_end(block_id, last=False)
        del seq.block_table[keep:]
        if self.enable_prefix_caching:
            bs = self.block_size
            self._register_full_blocks(seq, first_new // bs, seq.num_computed_tokens // bs)

    def free(self, seq: BlockOwner) -> None:
        """Drop seq's references; its tail blocks go to the free queue first (evicted first)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
        seq.block_table.clear()

    def reset_prefix_cache(self) -> None:
        """Forget every cached key (after a failed step the written K/V cannot be trusted)."""
        for block in self.blocks:
            block.block_hash = block.key = None
        self.cached.clear()

    # ---- internals ---------------------------------------------------------------------

    def _reference(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict: the block gets new contents
            if self.cached.get(block.block_hash) == block_id:
                del self.cached[block.block_hash]
            block.block_hash = block.key = None
        block.ref_count = 1
        return block_id

    def _register_full_blocks(self, seq: BlockOwner, first: int, last: int) -> None:
        """Key blocks first..last-1 of seq (full once this step's tokens are written).
        A block whose key is already cached elsewhere stays unkeyed (a duplicate)."""
        self._extend_hashes(seq, last)
        for i in range(first, last):
            block = self.blocks[seq.block_table[i]]
            block_hash = seq.block_hashes[i]
            if block.block_hash is None and block_hash not in self.cached:
                block.block_hash, block.key = block_hash, self._key(seq, i)
                self.cached[block_hash] = block.block_id

    def _key(self, seq: BlockOwner, i: int) -> tuple[int, tuple[int, ...]]:
        parent = seq.block_hashes[i - 1] if i else ROOT_HASH
        bs = self.block_size
        return parent, tuple(seq.token_ids[i * bs : (i + 1) * bs])

    def _extend_hashes(self, seq: BlockOwner, n_blocks: int) -> None:
        """Hashes of seq's first n_blocks full blocks (computed once, then kept)."""
        for i in range(len(seq.block_hashes), n_blocks):
            seq.block_hashes.append(hash(self._key(seq, i)))
