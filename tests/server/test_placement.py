"""Where the front and the engine core run: CPU lists as taskset takes them, the default
placement for one, two and many CPUs, and a user's own OpenMP settings winning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from palm_serve.server.placement import Placement, parse_cpus, plan_placement
from palm_serve.server.settings import Settings


@pytest.mark.parametrize(
    "text, cpus",
    [("1", (1,)), ("0-3", (0, 1, 2, 3)), ("0,2", (0, 2)), ("3, 0-1", (0, 1, 3)), ("2-2", (2,))],
)
def test_cpu_lists(text, cpus):
    assert parse_cpus(text) == cpus


@pytest.mark.parametrize("text", ["", "a", "1-", "3-1", "0-1,x"])
def test_bad_cpu_lists_say_what_is_wrong(text):
    with pytest.raises(ValueError):
        parse_cpus(text)


def test_default_placement():
    spin = {"OMP_WAIT_POLICY": "ACTIVE"}
    # Three or more CPUs: the front on the first, the core alone on the others, spinning.
    assert plan_placement([0, 1, 2], environ={}) == Placement((1, 2), 2, (0,), spin)
    assert plan_placement([0, 1, 2, 3], environ={}) == Placement((1, 2, 3), 3, (0,), spin)
    # Two CPUs: the core on both, the front beside it, spinning a bounded while.
    bounded = {"GOMP_SPINCOUNT": "20000"}
    assert plan_placement([0, 1], environ={}) == Placement((0, 1), 2, None, bounded)
    # One CPU: shared, so the core's workers sleep.
    sleep = {"OMP_WAIT_POLICY": "PASSIVE"}
    assert plan_placement([5], environ={}) == Placement((5,), 1, None, sleep)


def test_given_values_and_the_users_environment_win():
    p = plan_placement([0, 1], engine_cpus=(0, 1), engine_threads=1, environ={})
    assert p == Placement((0, 1), 1, None, {"OMP_WAIT_POLICY": "PASSIVE"})
    p = plan_placement([0, 1], engine_cpus=(1,), front_cpus=(0,), environ={})
    assert p == Placement((1,), 1, (0,), {"OMP_WAIT_POLICY": "ACTIVE"})
    p = plan_placement([0, 1, 2, 3], engine_cpus=(2, 3), front_cpus=(0,), environ={})
    assert p == Placement((2, 3), 2, (0,), {"OMP_WAIT_POLICY": "ACTIVE"})
    for env in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "1000"}):
        assert plan_placement([0, 1], environ=env).core_environment == {}
    with pytest.raises(ValueError, match="not available"):
        plan_placement([0, 1], engine_cpus=(2,), environ={})


FRONT_NICE_PROBE = """
import os, threading
from palm_serve.server.serve import lower_front_priority
started, stop = threading.Event(), threading.Event()
def park():
    started.set()
    stop.wait()
before = threading.Thread(target=park)
before.start()
started.wait()
lower_front_priority(3)
after = threading.Thread(target=lambda: print(os.getpriority(os.PRIO_PROCESS, 0)))
after.start()
after.join()
print(sorted({os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")}))
stop.set()
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread nice is Linux's")
def test_front_nice_reaches_every_thread_and_those_started_later():
    """In a child process: a nice value cannot be lowered again without privileges."""
    out = subprocess.run(
        [sys.executable, "-c", FRONT_NICE_PROBE], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[:2] == ["3", "[3]"]


def test_front_nice_needs_the_core_process():
    with pytest.raises(ValueError, match="front_nice"):
        Settings(front_nice=5, engine_process=False)
