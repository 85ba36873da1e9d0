"""The garbage collector's reach in the engine's long-lived processes.

A Serve replica or an actor holds some 150,000 objects from its imports
(Ray, Serve, Starlette, asyncpg, ...) and, once connected and recovered,
its pools and its state. CPython's full collection walks every one of them:
measured in a replica during the live benchmark, full collections stopped the
event loop for 6 to 70 ms while frames waited (1 s while 10,000 sockets
opened). None of those objects is ever garbage, so they are moved out of the
collector's reach once, when the process is ready; later objects are
collected as before.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect what is garbage now, then exempt everything still alive from
    later collections (gc.freeze). Call when a process has finished starting:
    it can be called again, each call adding what has been built since."""
    gc.collect()
    gc.freeze()
