"""Verifying draft tokens (speculative decoding; Leviathan et al. 2023, Chen et al. 2023).

A sequence with draft d_1..d_k runs k + 1 query rows in the step: its last known token and
the drafts. Row j's logits are the target's distribution after d_1..d_j. At each row the
target chooses its own token y_j exactly as the plain sampler would (argmax, or
inverse-CDF with one fresh uniform from the request's generator over the same processed
distribution); y_j is emitted, and verification goes on while y_j == d_{j+1}. After all k
drafts match, y_k is the bonus token.

For a one-hot draft this is the standard rejection rule: d is accepted with probability
p(d), and a rejected row's token is distributed as p with d removed and renormalized. It
also draws exactly one uniform per emitted token, in order, as decoding without drafts
does, so a seeded request emits the same tokens with or without speculation (and whether
it speculates, which depends on the batch, changes nothing in its output)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .outputs import TokenLogprob
from .sampler import chosen_logprobs, draw, target_probs
from .sampling_params import SamplingParams
from .sequence import Sequence


@dataclass
class Verified:
    # Emitted tokens: the accepted drafts, then the target's own token.
    token_ids: list[int]
    # One entry per emitted token when the request asked for logprobs.
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def num_accepted(self) -> int:
        return len(self.token_ids) - 1


def verify_drafts(
    logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]]
) -> list[Verified]:
    """logits [sum(len(d) + 1), V] fp32, each sequence's rows in order -> one Verified each.
    Penalties are not applied (penalized requests do not speculate: draft_policy.py)."""
    counts = [len(d) + 1 for d in drafts]
    firsts = [sum(counts[:i]) for i in range(len(counts))]
    greedy_choice = logits.argmax(dim=-1).tolist()
    cdf = _sampled_cdf(logits, seqs, counts)
    verified = []
    for seq, draft, first in zip(seqs, drafts, firsts, strict=True):
        tokens: list[int] = []
        for j in range(len(draft) + 1):
            row = first + j
            if seq.params.greedy:
                token = greedy_choice[row]
            else:
                u = torch.rand(1, generator=seq.generator)
                token = int(draw(cdf[row : row + 1], u)[0])
            tokens.append(token)
            if j == len(draft) or token != draft[j]:
                break
        verified.append(Verified(tokens))
    _attach_logprobs(logits, seqs, firsts, verified)
    return verified


def _sampled_cdf(logits: torch.Tensor, seqs: list[Sequence], counts: list[int]) -> torch.Tensor:
    """[rows, V] cumulative target distribution of every row (greedy rows left as logits:
    never read)."""
    params = [s.params for s, c in zip(seqs, counts, strict=True) for _ in range(c)]
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return logits
    cdf = logits.clone()
    cdf[rows] = target_probs(logits[rows], [params[i] for i in rows]).cumsum(dim=-1)
    return cdf


def _attach_logprobs(
    logits: torch.Tensor, seqs: list[Sequence], firsts: list[int], verified: list[Verified]
) -> None:
    """Logprobs of the raw distribution at each emitted token's row, as without drafts."""
    rows: list[int] = []
    tokens: list[int] = []
    params: list[SamplingParams] = []
    for seq, first, v in zip(seqs, firsts, verified, strict=True):
        if seq.params.logprobs is not None:
            rows += range(first, first + len(v.token_ids))
            tokens += v.token_ids
            params += [seq.params] * len(v.token_ids)
    if not rows:
        return
    entries = chosen_logprobs(logits[rows], torch.tensor(tokens), params)
    offset = 0
    for seq, v in zip(seqs, verified, strict=True):
        if seq.params.logprobs is not None:
            mine = entries[offset : offset + len(v.token_ids)]
            v.logprobs = [e for e in mine if e is not None]
            offset += len(v.token_ids)
