"""Tensor parallelism over torch.distributed: one process per rank, rank 0 in the engine
core. The scheduler, block manager and sampler run once, on rank 0; its ModelRunner talks
to a TensorParallelModel (the same forward / compute_logits interface as a model), which
first broadcasts the step (a fixed-size header, then the step's tensors) and then runs
rank 0's own shard. The workers (ranks 1..N-1, tp_worker.py) loop in serve_commands: take
a header, run the same call on their shard and their own paged KV cache (same block
tables, same number of blocks), and meet rank 0 in the blocks' all-reduces and the
logits' gather.

Every collective runs in a group whose timeout is --tp-timeout: a peer that died breaks
the connection (an error at once), one that hangs raises after the timeout; either way the
step raises and the core's failure path (CoreFailed, restart) takes over. An idle core
sends a heartbeat every timeout / 4, so idle workers never time out in their receive, and
a worker that died while nothing ran is noticed without waiting for a request."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from enum import IntEnum

import torch
import torch.distributed as dist
from torch import nn

from ..model.attention_metadata import AttentionMetadata
from ..model.decoder import DecoderModel
from ..model.kv_cache import KVCache

logger = logging.getLogger(__name__)

HEADER_SIZE = 8


class Command(IntEnum):
    HEARTBEAT = 0
    FORWARD = 1  # header: T tokens, S sequences, W blocks per table, pool blocks, block size
    LOGITS = 2  # header: N rows
    STOP = 3


class TensorParallelGroup:
    """This rank's collectives: the step's broadcast from rank 0, the blocks' all-reduce
    and the logits' gather, all within the group's timeout."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device) -> None:
        self.group, self.device = group, device
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    @classmethod
    def join(
        cls,
        rank: int,
        world: int,
        store: dist.Store,
        device: torch.device,
        *,
        timeout: float,
        start_timeout: float,
    ) -> TensorParallelGroup:
        """Form the group through rank 0's store (tp_rendezvous.py) within start_timeout
        (the others may still be loading), then a group of all ranks whose collectives
        time out after `timeout` seconds."""
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=start_timeout),
        )
        group = dist.new_group(list(range(world)), timeout=timedelta(seconds=timeout))
        return cls(group, device)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks' reduction: the sum of every rank's partial x (in place)."""
        dist.all_reduce(x, group=self.group)
        return x

    def send_header(self, command: Command, *fields: int) -> None:
        header = torch.zeros(HEADER_SIZE, dtype=torch.long, device=self.device)
        header[: 1 + len(fields)] = torch.tensor([int(command), *fields])
        dist.broadcast(header, 0, group=self.group)

    def receive_header(self) -> list[int]:
        header = torch.empty(HEADER_SIZE, dtype=torch.long, device=self.device)
        dist.broadcast(header, 0, group=self.group)
        return header.tolist()

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x; the others pass a tensor of its shape and dtype to fill."""
        dist.broadcast(x, 0, group=self.group)
        return x

    def gather_vocab(self, local: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
        """Each rank's logits [N, its slice] -> on rank 0 [N, vocab] (None elsewhere).
        Slices differ by at most one column (the first ones larger, as sharding.py cuts
        them): each is padded to rank 0's width for the gather."""
        width = -(-vocab_size // self.world)
        padded = torch.zeros(local.shape[0], width, dtype=local.dtype, device=local.device)
        padded[:, : local.shape[1]] = local
        if self.rank != 0:
            dist.gather(padded, None, 0, group=self.group)
            return None
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.gather(padded, parts, 0, group=self.group)
        base, extra = divmod(vocab_size, self.world)
        return torch.cat([p[:, : base + (r < extra)] for r, p in enumerate(parts)], dim=1)


# ---- the step's tensors, packed into one broadcast -------------------------------------


def pack_step(
    input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    """[3T + S*W + 2S + 1] int64: ids, positions, slots, block tables, query starts, lens."""
    parts = (
        input_ids,
        positions,
        meta.slot_mapping,
        meta.block_tables.flatten(),
        meta.query_start_loc,
        meta.context_lens,
    )
    return torch.cat([p.long() for p in parts])


def unpack_step(
    packed: torch.Tensor, tokens: int, seqs: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    ids, positions, slots, tables, starts, lens = packed.split(
        [tokens, tokens, tokens, seqs * width, seqs + 1, seqs]
    )
    meta = AttentionMetadata(
        slot_mapping=slots,
        block_tables=tables.view(seqs, width).int(),
        query_start_loc=starts.int(),
        context_lens=lens.int(),
    )
    return ids, positions, meta


# ---- rank 0 ------------------------------------------------------------------------------


class TensorParallelModel(nn.Module):
    """Rank 0's model as the engine sees it: config, kernels, parameters, forward and
    compute_logits of its shard, each call first sent to the workers. A lock keeps the
    heartbeat thread's sends out of a step's collectives."""

    def __init__(
        self,
        shard: DecoderModel,
        group: TensorParallelGroup,
        timeout: float,
        worker_pids: list[int],
    ) -> None:
        super().__init__()
        self.shard, self.group, self.worker_pids = shard, group, worker_pids
        self.vocab_size = shard.config.vocab_size
        self.config = shard.config
        self.kernels = shard.kernels
        self._lock = threading.Lock()
        self._closed = False
        self._last_send = time.monotonic()
        self._heartbeat = threading.Thread(
            target=self._beat, args=(timeout / 4,), name="palm-serve-tp-heartbeat", daemon=True
        )
        self._heartbeat.start()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        seqs, width = meta.block_tables.shape
        header = (input_ids.shape[0], seqs, width, kv_cache.num_blocks, kv_cache.block_size)
        with self._lock, self._failing():
            self.group.send_header(Command.FORWARD, *header)
            self.group.broadcast(pack_step(input_ids, positions, meta))
            hidden = self.shard(input_ids, positions, kv_cache, meta)
            self._last_send = time.monotonic()
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, dim] (rank 0's rows, sent to all) -> logits [N, vocab]."""
        with self._lock, self._failing():
            self.group.send_header(Command.LOGITS, hidden.shape[0])
            self.group.broadcast(hidden.contiguous())
            logits = self.group.gather_vocab(self.shard.compute_logits(hidden), self.vocab_size)
            self._last_send = time.monotonic()
        assert logits is not None
        return logits

    def close(self) -> None:
        """Stop the workers and the heartbeat (the process group stays for the caller)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self.group.send_header(Command.STOP)

    @contextmanager
    def _failing(self) -> Iterator[None]:
        """A call whose collectives failed closes the model: the group is broken, and the
        core fails its step and exits (the heartbeat must not exit it first)."""
        try:
            yield
        except BaseException:
            self._closed = True
            raise

    def _beat(self, period: float) -> None:
        while not self._closed:
            time.sleep(period / 2)
            if time.monotonic() - self._last_send < period or not self._lock.acquire(False):
                continue  # a step ran recently, or runs now
            if self._closed:
                self._lock.release()
                return
            try:
                self.group.send_header(Command.HEARTBEAT)
                self._last_send = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - a worker is gone: so is this core
                logger.error("tensor-parallel worker lost while idle (%s): the core exits", exc)
                os._exit(1)  # the front sees the core die and restarts it, workers and all
            finally:
                self._lock.release()


# ---- ranks 1..N-1 ------------------------------------------------------------------------


@torch.inference_mode()
def serve_commands(shard: DecoderModel, group: TensorParallelGroup, cache: KVCache) -> None:
    """A worker's loop: run what rank 0 runs, on this shard and its own cache (allocated
    at start, as rank 0's is: a first step must not wait on it), until STOP (or an
    exception: a peer died or timed out)."""
    param = next(shard.parameters())
    while True:
        command, *fields = group.receive_header()
        if command == Command.HEARTBEAT:
            continue
        if command == Command.STOP:
            return
        if command == Command.FORWARD:
            tokens, seqs, width, num_blocks, block_size = fields[:5]
            if (cache.num_blocks, cache.block_size) != (num_blocks, block_size):
                raise RuntimeError(
                    f"rank {group.rank}'s KV pool is {cache.num_blocks} x {cache.block_size}, "
                    f"rank 0's {num_blocks} x {block_size}"
                )
            size = 3 * tokens + seqs * width + 2 * seqs + 1
            packed = torch.empty(size, dtype=torch.long, device=group.device)
            ids, positions, meta = unpack_step(group.broadcast(packed), tokens, seqs, width)
            shard(ids, positions, cache, meta)
        elif command == Command.LOGITS:
            hidden = torch.empty(
                fields[0], shard.config.dim, dtype=param.dtype, device=param.device
            )
            group.gather_vocab(
                shard.compute_logits(group.broadcast(hidden)), shard.config.vocab_size
            )
        else:
            raise RuntimeError(f"unknown tensor-parallel command {command}")
