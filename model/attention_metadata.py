"""What the model needs to know about a flattened batch: passed in, never a global."""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from itertools import accumulate

import torch


@dataclass
class AttentionMetadata:
    """Describes T flattened tokens belonging to S sequences.

    Sequence s owns rows query_start_loc[s]:query_start_loc[s+1] of the batch; those are
    its newest tokens, and after this step its cache holds context_lens[s] tokens."""

    # [T] int64: cache slot of each token (block_id * block_size + offset); -1 skips it.
    slot_mapping: torch.Tensor
    # [S, max_blocks] int32: each sequence's block ids, padded with 0 past its length.
    block_tables: torch.Tensor
    # [S + 1] int32: prefix sums of the new-token counts.
    query_start_loc: torch.Tensor
    # [S] int32: cached tokens per sequence after this step's write, new ones included.
    context_lens: torch.Tensor

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    def last_token_indices(self) -> torch.Tensor:
        """[S] row of each sequence's last new token (where its next token is predicted)."""
        return self.query_start_loc[1:].long() - 1

    @classmethod
    def build(
        cls,
        block_tables: list[list[int]],
        query_lens: list[int],
        context_lens: list[int],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """From Python lists: the new tokens of sequence s are its last query_lens[s]. The
        engine builds one every step, so the lists become tensors through typed arrays
        (torch.tensor on a list costs ~0.1 us per element)."""
        slots: list[int] = []
        for table, q_len, ctx in zip(block_tables, query_lens, context_lens, strict=True):
            for pos in range(ctx - q_len, ctx):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max(map(len, block_tables), default=0) or 1
        padding = [0] * width
        padded: list[int] = []
        for table in block_tables:
            padded += table
            padded += padding[len(table) :]
        return cls(
            slot_mapping=int_tensor(slots, torch.long, device),
            block_tables=int_tensor(padded, torch.int32, device).view(len(block_tables), width),
            query_start_loc=int_tensor([0, *accumulate(query_lens)], torch.int32, device),
            context_lens=int_tensor(context_lens, torch.int32, device),
        )


_TYPECODES = {torch.int32: "i", torch.long: "q"}


def int_tensor(
    values: list[int] | array, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A 1-D int32 or int64 tensor of values, through a typed array (several times faster
    than torch.tensor on a list)."""
    code = _TYPECODES[dtype]
    if not isinstance(values, array) or values.typecode != code:
        values = array(code, values)
    if not values:
        return torch.empty(0, dtype=dtype, device=device)
    tensor = torch.frombuffer(values, dtype=dtype)
    return tensor if str(device) == "cpu" else tensor.to(device)
