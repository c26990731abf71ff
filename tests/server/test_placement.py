"""Where the front and the engine core run: CPU lists as taskset takes them, the default
placement for one, two and many CPUs, and a user's own OpenMP settings winning."""

from __future__ import annotations

import pytest

from palm_serve.server.placement import SMALL_MODEL_BYTES, Placement, parse_cpus, plan_placement


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


def test_small_models_decode_on_one_thread_where_the_front_shares_the_cpus():
    small, large = SMALL_MODEL_BYTES - 1, SMALL_MODEL_BYTES
    # Two CPUs shared with the front: one decode thread for a small model only.
    assert plan_placement([0, 1], environ={}, weight_bytes=small).decode_threads == 1
    assert plan_placement([0, 1], environ={}, weight_bytes=large).decode_threads is None
    assert plan_placement([0, 1], environ={}).decode_threads is None  # size unknown
    # The front on a CPU of its own: nothing waits for it, every thread decodes.
    alone = plan_placement([0, 1, 2], environ={}, weight_bytes=small)
    assert alone.front_cpus == (0,) and alone.decode_threads is None
    # A front pinned onto a CPU of the core shares it.
    overlap = plan_placement(
        [0, 1, 2], engine_cpus=(1, 2), front_cpus=(1,), environ={}, weight_bytes=small
    )
    assert overlap.decode_threads == 1
    # One core thread: nothing to drop.
    assert plan_placement([5], environ={}, weight_bytes=small).decode_threads is None
    # The user's count wins either way.
    given = plan_placement([0, 1], environ={}, decode_threads=2, weight_bytes=small)
    assert given.decode_threads == 2
    given = plan_placement([0, 1, 2], environ={}, decode_threads=1, weight_bytes=large)
    assert given.decode_threads == 1
