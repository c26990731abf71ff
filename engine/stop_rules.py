"""Token-level stop conditions, checked by the core after every sampled token. Stop
strings are text, so the front checks them (output_processor.py) and tells the core."""

from __future__ import annotations

from .outputs import FinishReason
from .sequence import Sequence


def check_stop(
    seq: Sequence, token: int, eos_token_id: int | None, max_model_len: int
) -> FinishReason | None:
    """Why seq stops after its new token `token`: EOS (unless ignore_eos) or a stop token
    id ("stop"; the token counts as generated), max_tokens or the context end ("length")."""
    params = seq.params
    if token == eos_token_id and not params.ignore_eos:
        return "stop"
    if token in params.stop_token_ids:
        seq.stop_token_id = token
        return "stop"
    if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= max_model_len:
        return "length"
    return None
