"""freeze_startup_heap, in a process of its own (freezing the test process's heap would
change what later tests see of the garbage collector)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import gc, weakref
    from palm_serve.engine.heap import freeze_startup_heap

    class Node:
        pass

    garbage = Node(); garbage.me = garbage  # a cycle nothing else holds
    collected = []
    weakref.finalize(garbage, collected.append, True)
    del garbage
    live = [Node()]
    gc.disable()  # no automatic collection may run first

    frozen = freeze_startup_heap()
    after = [Node()]
    tracked = gc.get_objects()
    assert collected == [True], "the start-up garbage was frozen, not collected"
    assert frozen == gc.get_freeze_count() > 0, frozen
    assert not any(o is live for o in tracked), "a live start-up object is still collected"
    assert any(o is after for o in tracked), "what serving allocates must stay collectable"
    print("ok")
    """
)


def test_start_up_garbage_is_collected_and_the_rest_frozen_but_not_what_comes_after():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
