"""BlockManager: exact block ids in deterministic cases, invariants under random use."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palm_serve.engine.block_manager import BlockManager


@dataclass(eq=False)
class FakeSeq:
    """What the block manager sees of a sequence (no torch)."""

    token_ids: list[int]
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)


def admit(bm: BlockManager, seq: FakeSeq, budget: int | None = None) -> bool:
    """As the scheduler admits: prefix hits, then a chunk of the rest."""
    cached = bm.find_cached_prefix(seq)
    done = len(cached) * bm.block_size
    n = len(seq.token_ids) - done if budget is None else min(budget, len(seq.token_ids) - done)
    if not bm.allocate(seq, n, cached):
        return False
    seq.num_computed_tokens = done + n
    return True


def decode(bm: BlockManager, seq: FakeSeq, token: int) -> bool:
    seq.token_ids.append(token)
    if not bm.allocate(seq, 1):
        seq.token_ids.pop()
        return False
    seq.num_computed_tokens += 1
    return True


def test_allocation_order_and_exact_ids() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = FakeSeq(list(range(10)))  # 3 blocks
    assert admit(bm, a)
    assert a.block_table == [0, 1, 2]
    b = FakeSeq(list(range(100, 105)))  # 2 blocks
    assert admit(bm, b)
    assert b.block_table == [3, 4]
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.usage) == (3, 5, 5 / 8)
    for t in (10, 11):  # a: 10 -> 12 tokens, still 3 blocks
        assert decode(bm, a, t)
    assert a.block_table == [0, 1, 2]
    assert decode(bm, a, 12)  # token 12 opens block 3 of a
    assert a.block_table == [0, 1, 2, 5]


def test_free_returns_tail_first_and_prefix_hit_revives_blocks() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    a = FakeSeq(list(range(9)))  # full blocks 0, 1 (keyed), partial 2
    assert admit(bm, a) and a.block_table == [0, 1, 2]
    bm.free(a)
    # Never used blocks first (3, 4, 5), then a's, tail first: 2, 1, 0.
    assert list(bm.free_queue) == [3, 4, 5, 2, 1, 0]
    b = FakeSeq(list(range(8)) + [99, 98])  # same first two blocks
    assert bm.find_cached_prefix(b) == [0, 1]
    assert admit(bm, b)
    assert b.block_table == [0, 1, 3] and b.num_computed_tokens == 10
    assert list(bm.free_queue) == [4, 5, 2]


def test_prefix_hit_leaves_the_last_token_to_compute() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    a = FakeSeq(list(range(8)))
    assert admit(bm, a) and a.block_table == [0, 1]
    b = FakeSeq(list(range(8)))  # identical: only block 0 may be reused
    assert bm.find_cached_prefix(b) == [0]
    assert admit(bm, b)
    # Block 1 is recomputed into a fresh block, which stays unkeyed (a duplicate).
    assert b.block_table == [0, 2]
    assert bm.blocks[0].ref_count == 2 and bm.blocks[2].block_hash is None


def test_eviction_is_lru_over_unreferenced_cached_blocks() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = FakeSeq([1, 2, 3]), FakeSeq([5, 6, 7])
    assert admit(bm, a) and admit(bm, b)  # a: [0, 1], b: [2, 3]
    bm.free(a)
    bm.free(b)  # queue: 1, 0, 3, 2
    c = FakeSeq([9, 9, 9, 9, 9])  # needs 3 blocks: evicts 1, 0, 3
    assert admit(bm, c) and c.block_table == [1, 0, 3]
    assert bm.find_cached_prefix(FakeSeq([1, 2, 3])) == []  # a's block 0 was evicted
    assert bm.find_cached_prefix(FakeSeq([5, 6, 7])) == [2]  # b's first block survives


def test_allocation_failure_changes_nothing() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    a = FakeSeq(list(range(12)))
    assert admit(bm, a)
    b = FakeSeq(list(range(50, 55)))
    assert not admit(bm, b)
    assert b.block_table == [] and bm.num_free_blocks == 0


def test_chunked_allocation_keys_blocks_as_they_fill() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = FakeSeq(list(range(14)))
    assert admit(bm, a, budget=6)  # tokens 0..5: block 0 full, block 1 half
    assert a.block_table == [0, 1] and set(bm.cached.values()) == {0}
    assert bm.allocate(a, 8)
    a.num_computed_tokens = 14
    assert a.block_table == [0, 1, 2, 3] and set(bm.cached.values()) == {0, 1, 2}


# ---- invariants under random operations (hypothesis) -------------------------------------


def check_invariants(bm: BlockManager, live: list[FakeSeq]) -> None:
    refs = [0] * bm.num_blocks
    for seq in live:
        assert len(set(seq.block_table)) == len(seq.block_table)
        assert len(seq.block_table) == bm.blocks_needed(seq.num_computed_tokens)
        for b in seq.block_table:
            refs[b] += 1
    assert refs == [b.ref_count for b in bm.blocks]
    assert set(bm.free_queue) == {i for i, r in enumerate(refs) if r == 0}
    assert bm.usage == sum(r > 0 for r in refs) / bm.num_blocks
    for block_hash, block_id in bm.cached.items():
        assert bm.blocks[block_id].block_hash == block_hash
    # A keyed block referenced by a sequence holds exactly that sequence's tokens.
    for seq in live:
        for i, b in enumerate(seq.block_table):
            key = bm.blocks[b].key
            if key is not None:
                assert key[1] == tuple(seq.token_ids[i * bm.block_size : (i + 1) * bm.block_size])


ops = st.lists(
    st.tuples(st.sampled_from(["admit", "decode", "free", "reset"]), st.integers(0, 10**6)),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(1, 12), block_size=st.sampled_from([1, 2, 4]))
def test_invariants_under_random_operations(ops, num_blocks: int, block_size: int) -> None:
    bm = BlockManager(num_blocks, block_size)
    live: list[FakeSeq] = []
    for op, r in ops:
        if op == "admit":
            # Few distinct prefixes so prefix hits and shared blocks are common.
            prefix = [r % 3] * (r % 7)
            seq = FakeSeq(prefix + [r % 5, (r // 5) % 4] * (1 + r % 3))
            if admit(bm, seq, budget=1 + r % 9):
                live.append(seq)
        elif op == "decode" and live:
            seq = live[r % len(live)]
            if seq.num_computed_tokens < len(seq.token_ids):  # continue a chunked prefill
                n = len(seq.token_ids) - seq.num_computed_tokens
                if bm.allocate(seq, n):
                    seq.num_computed_tokens += n
            else:
                decode(bm, seq, r % 4)
        elif op == "free" and live:
            bm.free(live.pop(r % len(live)))
        elif op == "reset":
            bm.reset_prefix_cache()
        check_invariants(bm, live)
    for seq in live:
        bm.free(seq)
    check_invariants(bm, [])
    assert bm.num_free_blocks == bm.num_blocks


def test_the_prefix_key_chains_every_block_to_its_own_parent() -> None:
    """C shares A's first block and B's second; its third block equals A's third, but
    follows another prefix, so it must not be served from A's (K/V computed for X Y Z is
    not the K/V of X Y' Z)."""
    bm = BlockManager(num_blocks=12, block_size=2)
    x, y, y2, z = [1, 1], [2, 2], [3, 3], [4, 4]
    a = FakeSeq(x + y + z + [9])  # blocks 0, 1, 2 keyed (+ 3 partial)
    b = FakeSeq(x + y2 + [9])  # X hit (0); Y' in block 4 (+ 5 partial)
    assert admit(bm, a) and a.block_table == [0, 1, 2, 3]
    assert admit(bm, b) and b.block_table == [0, 4, 5]
    c = FakeSeq(x + y2 + z + [9])
    assert bm.find_cached_prefix(c) == [0, 4]
    assert admit(bm, c) and c.block_table == [0, 4, 6, 7]


def test_a_prefix_hit_revives_freed_cached_blocks_exactly() -> None:
    bm = BlockManager(num_blocks=6, block_size=2)
    a = FakeSeq([1, 2, 3, 4, 5, 6, 7])  # 3 full blocks keyed + 1 partial
    assert admit(bm, a) and a.block_table == [0, 1, 2, 3]
    bm.free(a)
    assert (bm.num_free_blocks, [bm.blocks[i].ref_count for i in range(4)]) == (6, [0] * 4)
    b = FakeSeq([1, 2, 3, 4, 5, 6, 70, 71])  # 3 cached blocks, then its own
    cached = bm.find_cached_prefix(b)
    assert cached == [0, 1, 2]
    # Three revived blocks and one new one must be free; with only 3 free, it must fail.
    c = FakeSeq([50, 51, 52, 53, 54])  # takes blocks 4, 5, 3 (never used first, then a's tail)
    assert admit(bm, c) and c.block_table == [4, 5, 3]
    assert not bm.allocate(b, 2, cached)  # needs 3 revived + 1 new: 4 > 3 free
    assert b.block_table == [] and bm.num_free_blocks == 3
    bm.free(c)
    assert bm.allocate(b, 2, cached)
    assert b.block_table[:3] == [0, 1, 2]
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1, 1, 1]
    assert bm.num_free_blocks == 2 and 0 not in bm.free_queue


@pytest.mark.parametrize("num_blocks, block_size", [(0, 4), (4, 0)])
def test_an_empty_pool_or_block_is_refused_naming_both_sizes(num_blocks, block_size) -> None:
    with pytest.raises(ValueError) as refused:
        BlockManager(num_blocks, block_size)
    expected = f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
    assert str(refused.value) == expected


def test_cached_blocks_cannot_extend_a_table_that_holds_blocks() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = FakeSeq([1, 2, 3])
    assert admit(bm, a)
    with pytest.raises(ValueError) as refused:
        bm.allocate(a, 1, cached=[0])
    assert str(refused.value) == "cached prefix blocks can only start an empty block table"


def test_lookahead_slots_get_blocks_past_the_new_tokens() -> None:
    """Draft tokens are written after the new ones: 4 new + 1 draft need a second block."""
    bm = BlockManager(num_blocks=4, block_size=4)
    a = FakeSeq([1, 2, 3, 4])
    assert bm.allocate(a, 4, num_lookahead_tokens=1)
    assert a.block_table == [0, 1]
    assert not bm.allocate(FakeSeq([5] * 8), 8, num_lookahead_tokens=1)  # 3 > 2 free


def test_blocks_filled_by_decodes_are_found_by_the_next_request() -> None:
    """Blocks keyed one at a time as decodes fill them chain like a prompt's blocks."""
    bm = BlockManager(num_blocks=12, block_size=2)
    a = FakeSeq([1, 2, 3])
    assert admit(bm, a)  # block 0 keyed
    for token in (4, 5, 6, 7):
        assert decode(bm, a, token)  # blocks 1, 2 fill one decode at a time
    assert a.block_table == [0, 1, 2, 3]
    b = FakeSeq([1, 2, 3, 4, 5, 6, 8])
    assert bm.find_cached_prefix(b) == [0, 1, 2]


def test_a_block_evicted_and_computed_again_is_cached_again() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = FakeSeq([1, 2, 3])
    assert admit(bm, a) and a.block_table == [0, 1]  # block 0 keyed (1, 2)
    bm.free(a)
    c = FakeSeq([9] * 7)  # takes every block: block 0 is evicted
    assert admit(bm, c)
    bm.free(c)
    again = FakeSeq([1, 2, 3])
    assert bm.find_cached_prefix(again) == [] and admit(bm, again)
    assert bm.find_cached_prefix(FakeSeq([1, 2, 5])) == again.block_table[:1]
