"""Starting the tensor-parallel ranks: rank 0 (the engine core) hosts the rendezvous
(tp_rendezvous.py), starts its local ranks 1..K-1 as `python -m palm_serve.engine.tp_worker`
(a subprocess: the core is a daemonic multiprocessing child, which may not have
multiprocessing children of its own) and hands each its RankSpec, pickled over stdin; the
ranks K..N-1 are external (`palm-serve tp-worker` on other nodes) and read rank 0's spec
from the rendezvous. Every rank loads the full weights, checks they are rank 0's, keeps its
shard (model/sharding.py), then joins the group."""

from __future__ import annotations

import atexit
import json
import logging
import os
import pickle
import socket
import subprocess
import sys
from contextlib import suppress
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist

from ..model.decoder import DecoderModel
from ..model.kv_cache import KVCache
from ..model.sharding import shard_model, use_reduce
from .config import EngineConfig
from .tensor_parallel import TensorParallelGroup, TensorParallelModel
from .tp_rendezvous import (
    check_same_model,
    host_store,
    model_digest,
    publish_spec,
    withdraw_spec,
)

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
    # ranks 0..local_ranks-1 run on rank 0's machine, started by the core; the others are
    # external (`palm-serve tp-worker`), started and restarted by their own supervisor.
    # None: every rank is local.
    local_ranks: int | None = None

    @property
    def external_ranks(self) -> range:
        return range(self.local_ranks or self.world, self.world)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str, **overrides: object) -> RankSpec:
        """Rank 0's spec as published, with this rank's own fields (rank, model_dir, ...)."""
        fields = json.loads(text)
        fields["engine_config"] = EngineConfig(**fields["engine_config"])
        fields["cpus"] = tuple(fields["cpus"]) if fields["cpus"] is not None else None
        fields.update(overrides)
        return cls(**fields)

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


def load_shard(spec: RankSpec) -> tuple[DecoderModel, str]:
    """This rank's shard (its blocks reduce once use_reduce gives them the group), and the
    digest of the full model it was cut from."""
    from .factory import load_served_model

    full = load_served_model(
        spec.model_dir,
        dtype=spec.dtype,
        device=str(spec.torch_device),
        kernel_backend=spec.kernel_backend,
    )
    digest = model_digest(full)
    shard = shard_model(full, spec.rank, spec.world)
    del full
    if spec.prepack_cpu_linears:
        from ..model.cpu_linear import prepack_linears

        prepack_linears(shard)
    return shard, digest


def join_group(
    spec: RankSpec, store: dist.Store, shard: DecoderModel, digest: str
) -> TensorParallelGroup:
    """Meet the other ranks (after loading: the rendezvous waits start_timeout for the
    slowest load, and no collective's timeout runs while a rank still loads), once every
    rank is known to hold rank 0's model; the shard's blocks then reduce through the
    group."""
    check_same_model(store, spec.rank, spec.world, digest, spec.model_dir)
    group = TensorParallelGroup.join(
        spec.rank,
        spec.world,
        store,
        spec.torch_device,
        timeout=spec.timeout,
        start_timeout=spec.start_timeout,
    )
    use_reduce(shard, group.all_reduce)
    return group


def allocate_cache(spec: RankSpec, shard: DecoderModel) -> KVCache:
    """A worker's pool: the size build_core gives rank 0's (same settings, and every rank
    holds the same number of K/V heads)."""
    from .factory import pool_blocks, resolve_kv_cache_dtype

    config, param = spec.engine_config, next(shard.parameters())
    dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, param.dtype)
    num_blocks = config.num_blocks or pool_blocks(shard.config, config, dtype)
    return KVCache.allocate(shard.config, num_blocks, config.block_size, dtype, param.device)


def start_tensor_parallel(spec: RankSpec) -> TensorParallelModel:
    """Rank 0: host the rendezvous, start the local workers, load this rank's shard, meet
    them and the external ones: the model the engine core runs. (The core never waits on a
    worker's exit: the collectives tell it.)"""
    place_rank(spec)
    store = host_store(spec.address, spec.start_timeout)
    publish_spec(store, spec.to_json())
    local = range(1, spec.external_ranks.start)
    workers = [spawn_worker(replace(spec, rank=rank)) for rank in local]
    logger.info(
        "tensor parallelism: %d ranks (%d external) meet at %s",
        spec.world,
        len(spec.external_ranks),
        spec.address,
    )
    shard, digest = load_shard(spec)
    group = join_group(spec, store, shard, digest)
    withdraw_spec(store)
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
