"""A tensor-parallel worker process (ranks 1..N-1), in one of two ways:

- local: `python -m palm_serve.engine.tp_worker CORE_PID`, its RankSpec pickled on stdin, as
  tp_launch.spawn_worker starts it. It dies with the core (PR_SET_PDEATHSIG, as the core
  dies with the front); the front restarts the core, which starts fresh workers.
- external (`palm-serve tp-worker`, run_external_worker): rank R on another node, given
  only its rank, its model directory and rank 0's address (MASTER_ADDR:MASTER_PORT); it
  reads the rest of its spec from rank 0's rendezvous. Its supervisor (systemd,
  Kubernetes) restarts it after it exits, and it then waits for rank 0 (itself restarted
  by the front after the group broke) to meet again.

Either way it ends on any failure of a collective (rank 0 then fails its step too), with
one log line saying why and exit status 1; a normal stop of rank 0 (STOP) exits 0."""

from __future__ import annotations

import logging
import os
import pickle
import sys
from dataclasses import replace
from typing import NoReturn

import torch.distributed as dist

from .core_main import die_with_parent
from .tensor_parallel import serve_commands
from .tp_launch import RankSpec, allocate_cache, join_group, load_shard, place_rank
from .tp_rendezvous import ModelMismatchError, connect_store, read_spec

logger = logging.getLogger(__name__)

EXIT_FAILED = 1
EXIT_MISCONFIGURED = 2


def main() -> int:
    """A local worker's main: its RankSpec on stdin, the core's pid as argument."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s tp-worker: %(message)s")
    if len(sys.argv) > 1:
        die_with_parent(int(sys.argv[1]))
    spec: RankSpec = pickle.loads(sys.stdin.buffer.read())
    store = connect_store(spec.address, spec.start_timeout)
    return serve_rank(spec, store)


def run_external_worker(
    rank: int, model_dir: str, address: str, start_timeout: float, local_device: int = 0
) -> int:
    """`palm-serve tp-worker`: rank `rank` of rank 0's group at address (host:port), the
    model from model_dir (which must hold rank 0's weights). Its exit status: 0 after rank
    0 stopped normally, 1 when the group failed or could not form, 2 for a rank that rank
    0 does not leave to external workers."""
    try:
        store = connect_store(address, start_timeout)
        published = read_spec(store)
    except Exception as exc:  # noqa: BLE001 - the supervisor retries; say why once
        logger.error("no rank 0 at %s within %g s (%s)", address, start_timeout, exc)
        return EXIT_FAILED
    spec = RankSpec.from_json(published, rank=rank, model_dir=model_dir, cpus=None)
    if spec.torch_device.type == "cuda":  # this node's GPU, not rank 0's numbering
        spec = replace(spec, device=f"cuda:{local_device}")
    if rank not in spec.external_ranks:
        external = spec.external_ranks
        logger.error(
            "--rank %d: rank 0 at %s runs %d ranks, of which %s external",
            rank,
            address,
            spec.world,
            f"{external.start}..{external.stop - 1} are" if external else "none is",
        )
        return EXIT_MISCONFIGURED
    logger.info("rank %d of %d: rank 0 at %s", rank, spec.world, address)
    return serve_rank(spec, store)


def serve_rank(spec: RankSpec, store: dist.Store) -> NoReturn:
    """Load, meet the group, run rank 0's steps until STOP (exit 0) or a failure (1)."""
    place_rank(spec)
    shard, digest = load_shard(spec)
    cache = allocate_cache(spec, shard)  # before joining: rank 0's first step may follow
    try:
        group = join_group(spec, store, shard, digest)
        serve_commands(shard, group, cache)
    except ModelMismatchError as exc:  # the message says it all
        logger.error("rank %d stops: %s", spec.rank, exc)
        end_process(EXIT_FAILED)
    except Exception as exc:  # noqa: BLE001 - rank 0 fails its step too; say why here
        logger.error("rank %d stops: %s: %s", spec.rank, type(exc).__name__, exc)
        end_process(EXIT_FAILED)
    end_process(0)


def end_process(status: int) -> NoReturn:
    """Exit with `status`, skipping the interpreter's teardown: the group's and the store's
    C++ destructors then run against a rank 0 that has already closed its side, and could
    abort the process (SIGABRT) instead, which a supervisor reports as a crash."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
