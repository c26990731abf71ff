"""Sampler: logits of the sequences due a token -> one token each, vectorized over the batch.

Order (as vLLM): the structured-output bitmask (tokens the grammar forbids become -inf),
penalties, then greedy argmax or temperature -> top-k -> top-p -> min-p,
then inverse-CDF sampling with one uniform draw from the request's own torch.Generator, so
a request's tokens do not depend on its neighbours (filters are masks in vocabulary order,
whatever the batch needs). Logprobs are those of the raw model distribution:
log_softmax of the fp32 logits before penalties and temperature (OpenAI/vLLM default),
over the tokens the grammar allows when there is one (as vLLM, which masks first too)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..kernels.argmax import argmax_rows as twin_argmax_rows
from .outputs import TokenLogprob
from .sampling_params import SamplingParams
from .sequence import Sequence
from .structured_output import apply_token_bitmask

NEG_INF = float("-inf")


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # One entry per row; None where the request did not ask for logprobs.
    logprobs: list[TokenLogprob | None]


class Sampler:
    """argmax_rows: the greedy choice over [N, V] logits (the kernel backend's; the torch
    twin by default)."""

    def __init__(
        self, argmax_rows: Callable[[torch.Tensor], torch.Tensor] = twin_argmax_rows
    ) -> None:
        self.argmax_rows = argmax_rows

    def __call__(
        self, logits: torch.Tensor, seqs: list[Sequence], bitmask: torch.Tensor | None = None
    ) -> SamplerOutput:
        """logits [N, V] (any float dtype), one row per sequence in seqs; bitmask: int32
        [N, ceil(V / 32)] of the allowed tokens (structured_output.py), None: all allowed."""
        logits = logits.float()
        if bitmask is not None:
            logits = apply_token_bitmask(logits, bitmask)
        params = [s.params for s in seqs]
        raw = logits
        if any(is_penalized(p) for p in params):
            logits = apply_penalties(logits.clone(), seqs)
        if all(p.greedy for p in params):
            tokens = self.argmax_rows(logits)
        else:
            tokens = self._mixed(logits, seqs)
        token_list = tokens.tolist()
        return SamplerOutput(token_list, chosen_logprobs(raw, tokens, params))

    def _mixed(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        tokens = self.argmax_rows(logits)
        rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        drawn = sample_rows(
            logits[rows], [seqs[i].params for i in rows], [seqs[i].generator for i in rows]
        )
        tokens[rows] = drawn
        return tokens


def sample_rows(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> torch.Tensor:
    """logits [R, V] of non-greedy rows -> [R] token ids."""
    cdf = target_probs(logits, params).cumsum(dim=-1)  # (R, V)
    # One uniform per row from the row's own generator: the only randomness of the step.
    u = torch.cat([torch.rand(1, generator=g) for g in generators])
    return draw(cdf, u)


def target_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits [R, V] of non-greedy rows -> [R, V] the distribution each row samples from
    (temperature, top-k, top-p, min-p), unnormalized where min-p dropped tokens."""
    dev = logits.device
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=dev)
    temps = temps.unsqueeze(1)
    logits = finite(logits / temps)
    if any(p.top_k > 0 or p.top_p < 1 for p in params):
        logits = top_k_top_p(logits, params)
    probs = logits.softmax(dim=-1)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=probs.dtype, device=dev)
        min_p = min_p.unsqueeze(1)
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return probs


def draw(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: cdf [R, V] (cumulative target_probs), u [R] uniforms in [0, 1)
    -> [R] token ids."""
    target = (u.to(cdf.device, cdf.dtype) * cdf[:, -1]).unsqueeze(1)
    # right=True: the first token whose cumulative mass exceeds the target (never a zero one).
    index = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return index.clamp_(max=cdf.shape[1] - 1)


# torch's CPU sort of a whole vocabulary is slow; topk of a few hundred candidates is an
# order of magnitude cheaper (docs/BENCHMARKS.md) and a trained model's nucleus almost
# always lies within them. Checked per row (so a row's result never depends on its
# neighbours); a row whose nucleus reaches past the candidates is redone with a full sort.
NUCLEUS_CANDIDATES = 256


def top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask (-inf) tokens outside each row's top-k, then outside its nucleus top-p (the
    smallest most-likely set whose mass reaches top_p, over the top-k renormalized)."""
    vocab = logits.shape[1]
    width = min(vocab, max(NUCLEUS_CANDIDATES, *(p.top_k for p in params)))
    kept, fits = _filter_candidates(logits, params, width)
    if width < vocab and not bool(fits.all()):
        rows = torch.nonzero(~fits).flatten().tolist()
        kept[rows] = _filter_candidates(logits[rows], [params[i] for i in rows], vocab)[0]
    return kept


def _filter_candidates(
    logits: torch.Tensor, params: list[SamplingParams], width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k / top-p over each row's `width` best tokens: (filtered logits [N, V], [N] bool
    True where that is exact: the candidates hold the top-k set or pass the nucleus)."""
    vocab, dev = logits.shape[1], logits.device
    ks = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=dev)
    ps = torch.tensor([p.top_p for p in params], dtype=logits.dtype, device=dev)
    has_k, has_p = ks < vocab, ps < 1
    if width < vocab:
        ordered, order = logits.topk(width, dim=-1)  # sorted, most likely first
    else:
        ordered, order = logits.sort(dim=-1, descending=True)
    ordered = ordered.masked_fill(torch.arange(width, device=dev) >= ks.unsqueeze(1), NEG_INF)
    # Probabilities over the top-k set, or over the whole vocabulary when there is no top-k.
    norm = torch.where(
        has_k.unsqueeze(1),
        ordered.logsumexp(dim=-1, keepdim=True),
        logits.logsumexp(dim=-1, keepdim=True),
    )
    probs = (ordered - norm).exp()
    cum = probs.cumsum(dim=-1)
    drop = (cum - probs > ps.unsqueeze(1)) & has_p.unsqueeze(1)  # the first token stays
    filtered = torch.full_like(logits, NEG_INF).scatter(
        1, order, ordered.masked_fill(drop, NEG_INF)
    )
    active = (has_k | has_p).unsqueeze(1)
    fits = has_k | ~has_p | (cum[:, -1] > ps)
    return torch.where(active, filtered, logits), fits


def argmax_suffices(params: list[SamplingParams]) -> bool:
    """The sampler's tokens for these rows are their logits' argmax and nothing more is
    asked: every row greedy, without penalties or logprobs (and no grammar's bitmask)."""
    return all(p.greedy and p.logprobs is None and not is_penalized(p) for p in params)


def needs_only_the_model(seq: Sequence) -> bool:
    """seq's next tokens can be chosen row after row from the model's logits alone (drafts
    verified in one pass, several passes in one step): no penalties (they count the tokens
    before each row), no structured output (its matcher advances one accepted token at a
    time and cannot take one back), no prompt logprobs still owed."""
    return (
        not is_penalized(seq.params)
        and seq.params.structured_output is None
        and not seq.wants_prompt_logprobs
    )


def is_penalized(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """In place on logits [N, V]. Repetition (CTRL, sign-aware) over prompt and output
    tokens; presence and frequency (OpenAI) over output tokens only."""
    rows = [i for i, s in enumerate(seqs) if is_penalized(s.params)]
    sub = logits[rows]
    counts = _token_counts([seqs[i].output_token_ids for i in rows], sub.shape).to(sub.device)
    in_prompt = _token_counts([seqs[i].prompt_token_ids for i in rows], sub.shape) > 0
    in_prompt = in_prompt.to(sub.device)
    params = [seqs[i].params for i in rows]
    rep = _column([p.repetition_penalty for p in params], sub.device)
    seen = in_prompt | (counts > 0)
    penalized = torch.where(sub > 0, sub / rep, sub * rep)
    sub = torch.where(seen, penalized, sub)
    freq = _column([p.frequency_penalty for p in params], sub.device)
    pres = _column([p.presence_penalty for p in params], sub.device)
    sub = sub - freq * counts - pres * (counts > 0).to(sub.dtype)
    logits[rows] = finite(sub)
    return logits


def finite(logits: torch.Tensor) -> torch.Tensor:
    """Logits pushed past the float range by an extreme (but admitted) penalty or
    temperature are clamped to it, so softmax and sampling stay defined; -inf (a token
    filtered out) stays -inf."""
    top = torch.finfo(logits.dtype).max
    return torch.nan_to_num(logits, nan=-top, posinf=top, neginf=float("-inf"))


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    """[N] Python values -> [N, 1] float32 tensor, for per-row parameters."""
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _token_counts(token_lists: list[list[int]], shape: torch.Size) -> torch.Tensor:
    counts = torch.zeros(shape)
    rows = torch.repeat_interleave(
        torch.arange(len(token_lists)),
        torch.tensor([len(t) for t in token_lists], dtype=torch.long),
    )
    tokens = torch.tensor([t for ids in token_lists for t in ids], dtype=torch.long)
    counts.index_put_((rows, tokens), torch.ones(len(tokens)), accumulate=True)
    return counts


def chosen_logprobs(
    raw: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]
) -> list[TokenLogprob | None]:
    """raw [N, V] fp32 logits, tokens [N] -> each row's entry (None where not requested)."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    result: list[TokenLogprob | None] = [None] * len(params)
    if not rows:
        return result
    entries = token_logprobs(
        raw[rows].log_softmax(dim=-1), tokens[rows], max(params[i].logprobs or 0 for i in rows)
    )
    for i, entry in zip(rows, entries, strict=True):
        entry.top = entry.top[: params[i].logprobs]
        result[i] = entry
    return result


def token_logprobs(
    logprobs: torch.Tensor, tokens: torch.Tensor, num_top: int
) -> list[TokenLogprob]:
    """logprobs [N, V], tokens [N] -> the chosen token's logprob and the top num_top, with
    one host transfer per tensor (no per-token .item())."""
    chosen = logprobs.gather(1, tokens.long().unsqueeze(1)).squeeze(1).tolist()
    token_list = tokens.tolist()
    num_top = min(num_top, logprobs.shape[-1])
    if num_top == 0:
        return [TokenLogprob(t, lp) for t, lp in zip(token_list, chosen, strict=True)]
    top_values, top_ids = logprobs.topk(num_top, dim=-1)
    return [
        TokenLogprob(t, lp, list(zip(ids, vals, strict=True)))
        for t, lp, ids, vals in zip(
            token_list, chosen, top_ids.tolist(), top_values.tolist(), strict=True
        )
    ]
