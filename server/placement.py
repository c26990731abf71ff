"""Placement: which CPUs the core process and the front run on, how many torch threads the
core uses, and whether its OpenMP workers spin or sleep between parallel regions.

The default, by the number of CPUs (measured: docs/BENCHMARKS.md, "Placement on a quiet
machine" and "The engine core in its own process"):
- three or more: the front gets the first CPU, the core the others with one thread per
  CPU; no thread of ours shares the core's CPUs, so its OpenMP workers spin
  (OMP_WAIT_POLICY=ACTIVE) instead of paying a wake-up per parallel region;
- two: the core on both, two threads, the front unpinned beside it; its workers spin a
  bounded while (GOMP_SPINCOUNT) and then sleep. On a quiet 2-core machine this served the
  smoke burst at equal or higher throughput than one pinned core thread and answered first
  sooner (prompt work is what a second thread speeds up); a worker that spun without bound
  on a CPU shared with the front could stall the step (up to ten times slower under load);
- one: everything shares it and the workers sleep (PASSIVE).

Where the front shares the core's CPUs, a small model (weights under SMALL_MODEL_BYTES)
decodes on one thread: its decode step is so short that the front's work on one of the
step's CPUs, which every parallel region of the step then waits for, costs more than the
second thread saves. Steps with prompt work keep every thread."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# A user's own OpenMP wait settings win over the placement's.
OMP_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
# Spin iterations before a shared core's idle worker sleeps: tens of microseconds, about
# the gap between two parallel regions of a step, far less than the front's work.
SHARED_SPIN_COUNT = "20000"
# Checkpoint bytes under which a core that shares its CPUs with the front decodes on one
# thread. Measured at two sizes (docs/BENCHMARKS.md, "Decode threads by model size"): the
# 19 MB default PaLM served the smoke burst at 1.9-2.0x the output tok/s on one thread, the
# 221 MB tiny Llama at 0.87-1.01x; the bound sits between them.
SMALL_MODEL_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Placement:
    engine_cpus: tuple[int, ...]
    engine_threads: int
    # None: the front is not pinned.
    front_cpus: tuple[int, ...] | None
    # Set in the core's environment; empty when the user's environment decides.
    core_environment: dict[str, str]
    # Torch threads for a step of decodes only; None: engine_threads.
    decode_threads: int | None = None


def parse_cpus(text: str) -> tuple[int, ...]:
    """'0-1,3' -> (0, 1, 3), as taskset -c reads it; ValueError naming the bad part."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"{part!r} is not a CPU number or range (e.g. 1, 0-3, 0,2)")
        first, last = int(low), int(high or low)
        if last < first:
            raise ValueError(f"{part!r} is an empty range")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise ValueError("no CPU given")
    return tuple(sorted(cpus))


def available_cpus() -> tuple[int, ...]:
    """The CPUs this process may run on (all of os.cpu_count() where affinity is unknown)."""
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))


def plan_placement(
    available: Sequence[int],
    engine_cpus: tuple[int, ...] | None = None,
    engine_threads: int | None = None,
    front_cpus: tuple[int, ...] | None = None,
    environ: Mapping[str, str] | None = None,
    decode_threads: int | None = None,
    weight_bytes: int | None = None,
) -> Placement:
    """What is given, and the default for the rest (module doc); weight_bytes, the model's
    checkpoint size where known, decides the decode threads. ValueError for a CPU this
    process may not use."""
    have = tuple(sorted(available))
    for name, cpus in (("engine_cpus", engine_cpus), ("front_cpus", front_cpus)):
        outside = sorted(set(cpus or ()) - set(have))
        if outside:
            raise ValueError(f"{name}: CPU(s) {outside} are not available (this process: {have})")
    if engine_cpus is None:
        engine_cpus = have[1:] if len(have) > 2 else have
    if front_cpus is None:
        rest = tuple(c for c in have if c not in engine_cpus)
        front_cpus = rest or None
    threads = engine_threads or len(engine_cpus)
    environ = os.environ if environ is None else environ
    env: dict[str, str] = {}
    if not any(name in environ for name in OMP_WAIT_VARIABLES):
        alone = front_cpus is not None and not set(front_cpus) & set(engine_cpus)
        if alone and threads <= len(engine_cpus):
            env["OMP_WAIT_POLICY"] = "ACTIVE"
        elif 1 < threads <= len(engine_cpus):
            env["GOMP_SPINCOUNT"] = SHARED_SPIN_COUNT
        else:
            env["OMP_WAIT_POLICY"] = "PASSIVE"
    shared = front_cpus is None or bool(set(front_cpus) & set(engine_cpus))
    small = weight_bytes is not None and weight_bytes < SMALL_MODEL_BYTES
    if decode_threads is None and shared and small and threads > 1:
        decode_threads = 1
    return Placement(tuple(engine_cpus), threads, front_cpus, env, decode_threads)
