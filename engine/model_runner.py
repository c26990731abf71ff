"""ModelRunner: executes a plan. Flattens the scheduled sequences into one batch (ids,
positions, slot mapping, block tables, query starts, context lengths), runs the model once
for the whole mixed prefill + decode batch, and samples only where a token is due. A
sequence with draft tokens is a causal chunk of its last known token and the drafts; the
logits of all its rows go to the verifier (speculative.py). A plan of several forward
passes (decodes only) feeds each pass's sampled tokens to the next."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..model.attention_metadata import AttentionMetadata, int_tensor
from ..model.decoder import DecoderModel
from ..model.kv_cache import KVCache
from .outputs import TokenLogprob
from .sampler import Sampler, argmax_suffices, token_logprobs
from .scheduler import ScheduledSeq, SchedulerOutput
from .sequence import Sequence
from .speculative import verify_drafts

# Prompt positions whose logits are materialized at once (prompt logprobs).
PROMPT_LOGPROB_ROWS = 256


@dataclass
class StepResult:
    # One entry per plan.scheduled: the tokens to append: none (mid-chunked-prefill), the
    # sampled one, or a draft's accepted tokens and the one after them.
    sampled: list[list[int]]
    # One entry per plan.scheduled: the tokens' logprobs when requested.
    logprobs: list[list[TokenLogprob]]
    # Prompt logprobs computed this step, per sequence, in prompt order.
    prompt_logprobs: list[tuple[Sequence, list[TokenLogprob]]] = field(default_factory=list)
    # Forward passes run (plan.num_passes, or fewer when interrupted).
    num_passes: int = 1


class ModelRunner:
    def __init__(
        self,
        model: DecoderModel,
        kv_cache: KVCache,
        block_size: int,
        sampler: Sampler,
        decode_threads: int | None = None,
    ) -> None:
        self.model = model
        # Threads per step: decode_threads for decodes only, torch's count at construction
        # (the core's placement) for a step with prompt work.
        self.decode_threads = decode_threads
        self.full_threads = torch.get_num_threads()
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.sampler = sampler
        self.device = kv_cache.k[0].device

    @torch.inference_mode()
    def execute(
        self,
        plan: SchedulerOutput,
        bitmask: torch.Tensor | None = None,
        last_pass: Callable[[list[int]], bool] | None = None,
    ) -> StepResult:
        """bitmask: the allowed tokens of the sequences due a token, in plan order (rows of
        the structured-output bitmask, StructuredOutputManager.bitmask), or None.
        last_pass: asked after each forward pass but the last of a several-pass plan, with
        the tokens it sampled (in plan order); True ends the plan there."""
        items = plan.scheduled
        # One pass over the batch: the rows due a sampled token, the drafted ones, and
        # whether every sequence brings one known token (a decode, drafts or not).
        due: list[int] = []
        drafted: list[int] = []
        decodes_only = True
        for i, it in enumerate(items):
            if it.draft:
                drafted.append(i)
                decodes_only = decodes_only and it.num_new_tokens == len(it.draft) + 1
            else:
                if it.sample:
                    due.append(i)
                decodes_only = decodes_only and it.num_new_tokens == 1
        if self.decode_threads is not None:
            threads = self.decode_threads if decodes_only else self.full_threads
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
        if plan.num_passes > 1:
            return self._run_passes(items, plan.num_passes, last_pass)
        input_ids, positions, meta = self.prepare(items)
        hidden = self.model.forward(input_ids, positions, self.kv_cache, meta)  # (T, dim)
        query_start = meta.query_start_loc.tolist()
        if len(due) == len(items):  # a token for every sequence (due is then 0, 1, ...)
            result = StepResult(*self._sample(items, due, hidden, query_start, bitmask))
        else:
            result = StepResult([[] for _ in items], [[] for _ in items])
            if due:
                sampled, logprobs = self._sample(items, due, hidden, query_start, bitmask)
                for i, tokens, entries in zip(due, sampled, logprobs, strict=True):
                    result.sampled[i], result.logprobs[i] = tokens, entries
        if drafted:
            self._verify(items, drafted, hidden, query_start, result)
        prompt_rows, prompt_jobs = self._prompt_rows(items, query_start)
        if prompt_jobs:
            result.prompt_logprobs = self._prompt_logprobs(hidden, prompt_rows, prompt_jobs)
        return result

    def _run_passes(
        self,
        items: list[ScheduledSeq],
        num_passes: int,
        last_pass: Callable[[list[int]], bool] | None,
    ) -> StepResult:
        """Up to num_passes forward passes over decodes (one row each, slots reserved by the
        scheduler), each pass's sampled tokens the next one's input ids: per sequence, a
        token (and its logprob entry, when requested) per pass run."""
        seqs = [it.seq for it in items]
        tables = [seq.block_table for seq in seqs]
        bs = self.block_size
        # Per pass: the argmax alone where that is all the sampler would do, which spares
        # its per-row checks and the input ids' trip through a list.
        argmax_only = argmax_suffices([seq.params for seq in seqs])
        sampled: list[list[int]] = []
        entries: list[list[TokenLogprob | None]] = []
        input_ids, positions_tensor, meta = self.prepare(items)
        positions = [it.start for it in items]
        for done in range(1, num_passes + 1):
            hidden = self.model.forward(input_ids, positions_tensor, self.kv_cache, meta)
            logits = self.model.compute_logits(hidden)
            if argmax_only:
                chosen = self.sampler.argmax_rows(logits)
                tokens = chosen.tolist()
            else:
                out = self.sampler(logits.float(), seqs)
                tokens = out.token_ids
                chosen = int_tensor(tokens, torch.long, self.device)
                entries.append(out.logprobs)
            sampled.append(tokens)
            if done == num_passes or (last_pass is not None and last_pass(tokens)):
                break
            positions = [p + 1 for p in positions]
            input_ids = chosen
            positions_tensor = int_tensor(positions, torch.long, self.device)
            slots = [
                table[p // bs] * bs + p % bs for table, p in zip(tables, positions, strict=True)
            ]
            meta = AttentionMetadata(
                slot_mapping=int_tensor(slots, torch.long, self.device),
                block_tables=meta.block_tables,  # the reserved blocks are in it already
                query_start_loc=meta.query_start_loc,
                context_lens=int_tensor([p + 1 for p in positions], torch.int32, self.device),
            )
        per_seq_entries = zip(*entries, strict=True) if entries else ([] for _ in items)
        return StepResult(
            [list(row) for row in zip(*sampled, strict=True)],
            [[e for e in row if e is not None] for row in per_seq_entries],
            num_passes=len(sampled),
        )

    def _sample(
        self,
        items: list[ScheduledSeq],
        due: list[int],
        hidden: torch.Tensor,
        query_start: list[int],
        bitmask: torch.Tensor | None,
    ) -> tuple[list[list[int]], list[list[TokenLogprob]]]:
        """A token for each sequence of `due` (indices into items) from its last row: per
        sequence, the token as a list and its logprob entry (none unless requested)."""
        if not due:
            return [], []
        if len(due) == hidden.shape[0]:  # decodes only: every row is a last row
            rows = hidden
        else:
            last_rows = [query_start[i + 1] - 1 for i in due]
            rows = hidden.index_select(0, int_tensor(last_rows, torch.long, hidden.device))
        logits = self.model.compute_logits(rows).float()  # (due, V)
        out = self.sampler(logits, [items[i].seq for i in due], bitmask)
        return (
            [[token] for token in out.token_ids],
            [[lp] if lp is not None else [] for lp in out.logprobs],
        )

    def _verify(
        self,
        items: list[ScheduledSeq],
        drafted: list[int],
        hidden: torch.Tensor,
        query_start: list[int],
        result: StepResult,
    ) -> None:
        """Logits of every row of each drafted sequence (its known token's and its drafts'),
        verified against the drafts."""
        rows = [
            r
            for i in drafted
            for r in range(query_start[i + 1] - len(items[i].draft) - 1, query_start[i + 1])
        ]
        index = torch.tensor(rows, dtype=torch.long, device=hidden.device)
        logits = self.model.compute_logits(hidden[index]).float()  # (rows, V)
        verified = verify_drafts(
            logits, [items[i].seq for i in drafted], [items[i].draft for i in drafted]
        )
        for i, v in zip(drafted, verified, strict=True):
            result.sampled[i], result.logprobs[i] = v.token_ids, v.logprobs

    def prepare(
        self, items: list[ScheduledSeq]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The flat batch, from Python lists: at decode sizes each separate tensor op here
        would cost more than the list work it replaces."""
        ids: list[int] = []
        positions: list[int] = []
        tables: list[list[int]] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        for it in items:
            seq, start, num_new = it.seq, it.start, it.num_new_tokens
            if num_new == 1 and not it.draft:  # a decode: the common row, taken without slices
                ids.append(seq.token_ids[start])
                positions.append(start)
            else:
                ids.extend(seq.token_ids[start : start + it.num_known_tokens])
                ids.extend(it.draft)
                positions.extend(range(start, start + num_new))
            tables.append(seq.block_table)
            query_lens.append(num_new)
            context_lens.append(start + num_new)
        meta = AttentionMetadata.build(
            tables, query_lens, context_lens, self.block_size, self.device
        )
        return (
            int_tensor(ids, torch.long, self.device),
            int_tensor(positions, torch.long, self.device),
            meta,
        )

    def _prompt_rows(
        self, items: list[ScheduledSeq], query_start: list[int]
    ) -> tuple[list[int], list[tuple[Sequence, list[int]]]]:
        """Rows whose logits give prompt logprobs: row of position p predicts token p + 1.
        Token j is due once (tokens 1..k are done when seq.prompt_logprobs has k + 1 entries)."""
        rows: list[int] = []
        jobs: list[tuple[Sequence, list[int]]] = []
        for i, it in enumerate(items):
            seq = it.seq
            if not seq.wants_prompt_logprobs:
                continue
            done = len(seq.prompt_logprobs or [None])
            first = max(it.start + 1, done)
            last = min(it.start + it.num_new_tokens, seq.num_prompt_tokens - 1)  # target index
            if first > last:
                continue
            row0 = query_start[i] - it.start
            rows.extend(range(row0 + first - 1, row0 + last))
            jobs.append((seq, seq.prompt_token_ids[first : last + 1]))
        return rows, jobs

    def _prompt_logprobs(
        self, hidden: torch.Tensor, row_list: list[int], jobs: list[tuple[Sequence, list[int]]]
    ) -> list[tuple[Sequence, list[TokenLogprob]]]:
        """fp32 log_softmax of the logits of `rows`, PROMPT_LOGPROB_ROWS at a time: a whole
        chunk of [2048, vocab] logits at once would be hundreds of MB for a real vocabulary."""
        rows = int_tensor(row_list, torch.long, self.device)
        targets = torch.tensor([t for _, ids in jobs for t in ids], dtype=torch.long)
        num_top = max(seq.params.prompt_logprobs or 0 for seq, _ in jobs)
        entries: list[TokenLogprob] = []
        for start in range(0, len(rows), PROMPT_LOGPROB_ROWS):
            piece = rows[start : start + PROMPT_LOGPROB_ROWS]
            logits = self.model.compute_logits(hidden[piece]).float()
            goal = targets[start : start + PROMPT_LOGPROB_ROWS].to(logits.device)
            entries += token_logprobs(logits.log_softmax(dim=-1), goal, num_top)
        result, offset = [], 0
        for seq, ids in jobs:
            chunk = entries[offset : offset + len(ids)]
            for entry in chunk:
                entry.top = entry.top[: seq.params.prompt_logprobs]
            result.append((seq, chunk))
            offset += len(ids)
        return result
