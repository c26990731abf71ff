"""When to split a sequence's keys across programs (flash-decoding, split-K).

Splitting pays when the query tiles alone leave SMs idle (a few long decodes); it costs a
partial write and a merge pass, so it is only used below one program per SM, and only over
contexts long enough that the saving outweighs the merge's launch: on an H200 every measured
shape at 1024 keys ran slower split, every one at 8192 faster (docs/BENCHMARKS.md, "The GPU
check on an H200"). Pure Python and shape-only (no device sync), so the choice is made on
the host before the launch."""

from __future__ import annotations

import functools

import torch

MAX_SPLITS = 16
MIN_STEPS_PER_SPLIT = 4  # a split covers at least 4 key steps (4 x BLOCK_N keys)
MIN_KEYS_TO_SPLIT = 2048  # shorter contexts are never split
PROGRAMS_PER_SM = 2  # aim: two resident programs per SM once split
NOMINAL_SMS = 108  # an A100's count, for the CPU interpreter (no device to ask)


def choose_num_splits(
    num_tiles: int, num_kv_heads: int, max_kv_steps: int, block_n: int, num_sms: int
) -> int:
    """num_tiles query tiles x num_kv_heads programs; max_kv_steps bounds any sequence's
    key steps of block_n keys (from the block table's width, so no sync). Returns 1 (no
    split) .. 16."""
    programs = num_tiles * num_kv_heads
    if programs >= num_sms or max_kv_steps * block_n < MIN_KEYS_TO_SPLIT:
        return 1
    by_occupancy = -(-PROGRAMS_PER_SM * num_sms // programs)
    by_length = max_kv_steps // MIN_STEPS_PER_SPLIT
    return max(1, min(by_occupancy, by_length, MAX_SPLITS))


@functools.cache
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return NOMINAL_SMS
