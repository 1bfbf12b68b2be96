"""The composition root's process-wide settings (engine/serve.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

PROBE = textwrap.dedent(
    """
    import gc, weakref
    from engine.serve import settle_heap

    class Node:
        pass

    kept = [Node() for _ in range(50_000)]  # long-lived, like the model and its modules
    cycle = Node()
    cycle.self = cycle  # garbage that only the collector can free
    dead = weakref.ref(cycle)
    del cycle
    settle_heap()
    print(dead() is None, gc.get_freeze_count() >= len(kept), len(gc.get_objects(2)) < 1000)
    """
)


def test_settle_heap_frees_garbage_then_keeps_survivors_out_of_full_collections():
    """In a fresh interpreter, since freezing is process-wide: the cycle is collected
    (not frozen forever), and the survivors leave the generation a full collection walks."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.split() == ["True", "True", "True"], done.stdout + done.stderr
