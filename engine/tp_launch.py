"""Starting the tensor-parallel ranks: rank 0 (the engine core) starts ranks 1..N-1 as
`python -m palm_serve.engine.tp_worker` (a subprocess: the core is a daemonic
multiprocessing child, which may not have multiprocessing children of its own) and hands
each its RankSpec, pickled over stdin. Every rank loads the full weights, keeps its shard
(model/sharding.py), then joins the rendezvous at rank 0's address."""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import socket
import subprocess
import sys
from contextlib import suppress
from dataclasses import dataclass, replace

import torch

from ..model.decoder import DecoderModel
from ..model.kv_cache import KVCache
from ..model.sharding import shard_model, use_reduce
from .config import EngineConfig
from .tensor_parallel import TensorParallelGroup, TensorParallelModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankSpec:
    """What one rank builds and where it meets the others."""

    rank: int
    world: int
    address: str  # host:port of rank 0's rendezvous
    model_dir: str
    dtype: str
    device: str  # "cpu", or "cuda" (rank r on cuda:r)
    kernel_backend: str
    prepack_cpu_linears: bool
    # seconds a collective may wait; the rendezvous waits start_timeout (loading)
    timeout: float
    start_timeout: float
    # CPUs as the core was given them; rank r runs on cpus[r % len(cpus)], one thread
    cpus: tuple[int, ...] | None
    # the KV pool's settings: every rank sizes its own pool from them, as rank 0 does
    engine_config: EngineConfig

    @property
    def torch_device(self) -> torch.device:
        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.rank)
        return device


def rendezvous_address() -> str:
    """MASTER_ADDR:MASTER_PORT as torch.distributed reads them; by default 127.0.0.1 and a
    port free now."""
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = os.environ.get("MASTER_PORT")
    if port is None:
        with socket.socket() as s:
            s.bind((host, 0))
            port = str(s.getsockname()[1])
    return f"{host}:{port}"


def place_rank(spec: RankSpec) -> None:
    """One thread per rank, each on a CPU of its own where there are enough."""
    torch.set_num_threads(1)
    if spec.cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {spec.cpus[spec.rank % len(spec.cpus)]})


def load_shard(spec: RankSpec) -> DecoderModel:
    """This rank's shard (its blocks reduce once use_reduce gives them the group)."""
    from .factory import load_served_model

    full = load_served_model(
        spec.model_dir,
        dtype=spec.dtype,
        device=str(spec.torch_device),
        kernel_backend=spec.kernel_backend,
    )
    shard = shard_model(full, spec.rank, spec.world)
    del full
    if spec.prepack_cpu_linears:
        from ..model.cpu_linear import prepack_linears

        prepack_linears(shard)
    return shard


def join_group(spec: RankSpec, shard: DecoderModel) -> TensorParallelGroup:
    """Meet the other ranks (after loading: the rendezvous waits start_timeout for the
    slowest load, and no collective's timeout runs while a rank still loads); the shard's
    blocks then reduce through the group."""
    group = TensorParallelGroup.join(
        spec.rank,
        spec.world,
        spec.address,
        spec.torch_device,
        timeout=spec.timeout,
        start_timeout=spec.start_timeout,
    )
    use_reduce(shard, group.all_reduce)
    return group


def allocate_cache(spec: RankSpec, shard: DecoderModel) -> KVCache:
    """A worker's pool: the size build_core gives rank 0's (same settings, and every rank
    holds the same number of K/V heads)."""
    from .factory import pool_blocks

    config, param = spec.engine_config, next(shard.parameters())
    num_blocks = config.num_blocks or pool_blocks(shard.config, config, param.dtype)
    return KVCache.allocate(shard.config, num_blocks, config.block_size, param.dtype, param.device)


def start_tensor_parallel(spec: RankSpec) -> TensorParallelModel:
    """Rank 0: start the workers, load this rank's shard, meet them: the model the engine
    core runs. (The core never waits on a worker's exit: the collectives tell it.)"""
    place_rank(spec)
    workers = [spawn_worker(replace(spec, rank=rank)) for rank in range(1, spec.world)]
    logger.info("tensor parallelism: %d ranks meet at %s", spec.world, spec.address)
    shard = load_shard(spec)
    group = join_group(spec, shard)
    model = TensorParallelModel(shard, group, spec.timeout, [w.pid for w in workers])
    # A core that exits normally (Shutdown) tells the workers to stop, rather than leaving
    # them to time out in their receive while it tears down.
    atexit.register(_close_quietly, model)
    return model


def _close_quietly(model: TensorParallelModel) -> None:
    with suppress(Exception):  # a broken group: the workers are going or gone anyway
        model.close()


def spawn_worker(spec: RankSpec) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "palm_serve.engine.tp_worker", str(os.getpid())],
        stdin=subprocess.PIPE,
    )
    assert process.stdin is not None
    process.stdin.write(pickle.dumps(spec))
    process.stdin.close()
    return process
