"""Where the tensor-parallel ranks meet, before they form their group: a TCPStore that rank 0
hosts at MASTER_ADDR:MASTER_PORT (torch.distributed's usual rendezvous), through which

- rank 0 publishes its RankSpec (JSON, "spec"): a worker started on another node with only
  its rank, its model directory and the address learns everything else from it (world
  size, dtype, kernels, timeouts, the KV pool's settings), so the nodes cannot disagree on
  them;
- every rank publishes the digest of its full model ("digest/R", config + state dict, taken
  before sharding) and checks it against rank 0's: nodes must serve the same weights, and a
  node that has another model (or another revision of it) stops with an error naming both,
  rather than computing garbage in the all-reduces.

Rank 0 deletes "spec" once the group is formed: a worker that connects to a store whose
group is complete (its rank is taken) waits for the next rank 0 instead of joining.
A core that restarts hosts a fresh store on the same port, so nothing from the previous
group reaches the next."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from contextlib import suppress
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

SPEC_KEY = "spec"
# Rank 0, refusing a worker's model, waits this long for it to have read rank 0's digest
# (the store dies with rank 0's core), so that both sides say why.
MISMATCH_LINGER_SECONDS = 10.0


class ModelMismatchError(RuntimeError):
    """Two ranks loaded different models: the group must not form."""


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def host_store(address: str, start_timeout: float) -> dist.TCPStore:
    """Rank 0's store at address (host:port), listening without waiting for anyone; its
    requests (a worker's digest) wait start_timeout: the others may still be loading."""
    host, port = split_address(address)
    timeout = timedelta(seconds=start_timeout)
    return dist.TCPStore(host, port, None, True, timeout, wait_for_workers=False)


def connect_store(address: str, start_timeout: float) -> dist.TCPStore:
    """A worker's connection to rank 0's store: retried until start_timeout (rank 0 may not
    be listening yet, or be restarting)."""
    host, port = split_address(address)
    return dist.TCPStore(host, port, None, False, timedelta(seconds=start_timeout))


def publish_spec(store: dist.Store, spec_json: str) -> None:
    store.set(SPEC_KEY, spec_json)


def read_spec(store: dist.Store) -> str:
    """Rank 0's RankSpec (JSON), once it is there."""
    return store.get(SPEC_KEY).decode()


def withdraw_spec(store: dist.Store) -> None:
    store.delete_key(SPEC_KEY)


def model_digest(model: nn.Module) -> str:
    """sha256 of the model's config and every tensor of its state dict (names, dtypes,
    shapes and bytes), in name order."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and dataclasses.is_dataclass(config):
        digest.update(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())  # type: ignore[arg-type]
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def check_same_model(store: dist.Store, rank: int, world: int, digest: str, model_dir: str) -> None:
    """Publish this rank's digest, then compare: rank 0 with every worker's (waiting for
    each), a worker with rank 0's. ModelMismatchError names the rank and both digests, on
    both sides: rank 0 holds its store open until the worker has read its digest."""
    store.set(f"digest/{rank}", digest)
    for other in range(1, world) if rank == 0 else (0,):
        theirs = store.get(f"digest/{other}").decode()
        if rank != 0:
            store.set(f"compared/{rank}", "1")
        elif theirs != digest:
            with suppress(Exception):  # it may be gone already: then it needs no answer
                store.wait([f"compared/{other}"], timedelta(seconds=MISMATCH_LINGER_SECONDS))
        if theirs != digest:
            raise ModelMismatchError(
                f"rank {other}'s model differs from rank {rank}'s ({model_dir}): config + "
                f"weights sha256 {theirs[:16]} vs {digest[:16]}; every node must serve "
                "the same model directory"
            )
