"""The collector policy of long-lived processes (cluster/heap.py)."""

from __future__ import annotations

import gc
import weakref

from dailydoco.cluster.heap import freeze_startup_heap


class _Node:
    pass


def test_freeze_collects_garbage_first_then_exempts_what_is_alive():
    garbage = _Node()
    garbage.self = garbage  # a cycle: only the collector frees it
    gone = weakref.ref(garbage)
    kept = _Node()
    kept.self = kept
    del garbage
    frozen_before = gc.get_freeze_count()
    try:
        freeze_startup_heap()
        assert gone() is None  # collected, not frozen forever
        assert gc.get_freeze_count() > frozen_before
        assert not any(o is kept for o in gc.get_objects())  # out of the collector's reach
    finally:
        gc.unfreeze()
