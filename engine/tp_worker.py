"""A tensor-parallel worker process (ranks 1..N-1): `python -m palm_serve.engine.tp_worker
CORE_PID` with its RankSpec pickled on stdin, as tp_launch.spawn_worker starts it.

It dies with the core (PR_SET_PDEATHSIG, as the core dies with the front) and ends on any
failure of a collective; rank 0 then fails its step and the front restarts the core,
which starts fresh workers."""

from __future__ import annotations

import logging
import pickle
import sys

from .core_main import die_with_parent
from .tensor_parallel import serve_commands
from .tp_launch import RankSpec, allocate_cache, join_group, load_shard, place_rank

logger = logging.getLogger(__name__)


def main() -> int:
    """A worker's main: its RankSpec on stdin, the core's pid as argument."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s tp-worker: %(message)s")
    if len(sys.argv) > 1:
        die_with_parent(int(sys.argv[1]))
    spec: RankSpec = pickle.loads(sys.stdin.buffer.read())
    place_rank(spec)
    shard = load_shard(spec)
    cache = allocate_cache(spec, shard)  # before joining: rank 0's first step may follow
    group = join_group(spec, shard)
    try:
        serve_commands(shard, group, cache)
    except Exception as exc:  # noqa: BLE001 - rank 0 fails its step too; say why here
        logger.error("rank %d stops: %s: %s", spec.rank, type(exc).__name__, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
