"""ModelRunner.prepare: the flat batch of a mixed step (prefill chunks mid-prompt, decodes,
a drafted sequence) against a per-token oracle written out the slow way; and int_tensor,
the typed-array route from Python lists to tensors that prepare and
AttentionMetadata.build take."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from palm_serve.engine.model_runner import ModelRunner
from palm_serve.engine.scheduler import ScheduledSeq
from palm_serve.model.attention_metadata import int_tensor

BLOCK_SIZE = 4


def runner() -> ModelRunner:
    cache = SimpleNamespace(k=[torch.empty(0)])  # prepare reads only the device
    return ModelRunner(None, cache, BLOCK_SIZE, None)  # type: ignore[arg-type]


def scheduled(rng: random.Random, start: int, new: int, draft: int = 0) -> ScheduledSeq:
    """A sequence whose cache holds `start` tokens and whose step adds `new` (drafts
    included), with a shuffled block table covering them and a spare block."""
    known = new - draft
    tokens = [rng.randrange(1000) for _ in range(start + known)]
    blocks = -(-(start + new) // BLOCK_SIZE) + 1
    seq = SimpleNamespace(token_ids=tokens, block_table=rng.sample(range(500), blocks))
    drafts = [rng.randrange(1000) for _ in range(draft)]
    return ScheduledSeq(seq=seq, start=start, num_new_tokens=new, sample=True, draft=drafts)


def oracle(items: list[ScheduledSeq]) -> dict[str, list]:
    ids, positions, slots, contexts = [], [], [], []
    starts = [0]
    for it in items:
        ids += it.seq.token_ids[it.start : it.start + it.num_new_tokens - len(it.draft)]
        ids += it.draft
        for pos in range(it.start, it.start + it.num_new_tokens):
            positions.append(pos)
            block = it.seq.block_table[pos // BLOCK_SIZE]
            slots.append(block * BLOCK_SIZE + pos % BLOCK_SIZE)
        starts.append(starts[-1] + it.num_new_tokens)
        contexts.append(it.start + it.num_new_tokens)
    width = max(len(it.seq.block_table) for it in items)
    tables = [it.seq.block_table + [0] * (width - len(it.seq.block_table)) for it in items]
    return {
        "ids": ids,
        "positions": positions,
        "slots": slots,
        "starts": starts,
        "contexts": contexts,
        "tables": tables,
    }


@pytest.mark.parametrize("seed", range(4))
def test_prepare_matches_the_per_token_oracle(seed: int) -> None:
    rng = random.Random(seed)
    items = [
        scheduled(rng, 0, 7),  # a prompt's first chunk, ending mid-block
        scheduled(rng, 9, 1),  # decodes around block edges
        scheduled(rng, 12, 1),
        scheduled(rng, 5, 6),  # a later chunk starting mid-block
        scheduled(rng, 15, 3, draft=2),  # a known token and two drafts
        scheduled(rng, 3, 1),
    ]
    rng.shuffle(items)
    input_ids, positions, meta = runner().prepare(items)
    want = oracle(items)
    assert input_ids.dtype == positions.dtype == meta.slot_mapping.dtype == torch.long
    assert input_ids.tolist() == want["ids"]
    assert positions.tolist() == want["positions"]
    assert meta.slot_mapping.tolist() == want["slots"]
    assert meta.query_start_loc.dtype == meta.context_lens.dtype == torch.int32
    assert meta.block_tables.dtype == torch.int32
    assert meta.query_start_loc.tolist() == want["starts"]
    assert meta.context_lens.tolist() == want["contexts"]
    assert meta.block_tables.tolist() == want["tables"]


def test_prepare_decodes_only() -> None:
    rng = random.Random(7)
    items = [scheduled(rng, rng.randrange(1, 40), 1) for _ in range(5)]
    input_ids, positions, meta = runner().prepare(items)
    want = oracle(items)
    assert input_ids.tolist() == want["ids"]
    assert meta.slot_mapping.tolist() == want["slots"]
    assert meta.last_token_indices().tolist() == list(range(5))


@pytest.mark.parametrize("dtype", [torch.int32, torch.long])
def test_int_tensor(dtype: torch.dtype) -> None:
    limit = torch.iinfo(dtype)
    values = [0, -1, 7, limit.max, limit.min]
    out = int_tensor(values, dtype)
    assert out.dtype == dtype and out.tolist() == values
    assert int_tensor([], dtype).shape == (0,)
    with pytest.raises(OverflowError):
        int_tensor([limit.max + 1], dtype)


def test_int_tensor_outlives_its_list() -> None:
    out = int_tensor(list(range(1000)), torch.long)
    junk = [list(range(1000, 2000)) for _ in range(50)]  # reuse freed memory, if any was
    assert out.tolist() == list(range(1000)) and len(junk) == 50
