"""What the supervisor and the actors' callers ask of every actor, besides its own work."""

from __future__ import annotations

import asyncio
import time

import ray

from .batching import start_shared_task

# Pings are answered on a thread and event loop of their own: a Ray
# concurrency group, named in each actor class's @ray.remote
# (`concurrency_groups=LIVENESS_GROUPS`). On the actor's own loop a ping
# waited behind everything ready to run there, and on a host of half the
# usual speed the ledger benchmark's batches held a chain's loop past
# PING_WAIT_S (actors/refs.py): its callers took the busy chain for a
# silent one and sent its purchases to the supervisor, which wrote them
# again as replays (session 56). The supervisor's hang check, with 5 s,
# would have replaced it for being busy.
LIVENESS_GROUP = "liveness"
LIVENESS_GROUPS = {LIVENESS_GROUP: 16}  # pings at once: every caller's, and the supervisor's
# A ping still says whether the actor's own loop runs: that loop notes the
# time every LOOP_TICK_S, and a ping waits while it has not for
# LOOP_STALLED_AFTER_S (a loop blocked by a call that never returns, a
# deadlock), so its callers time out as they would on a dead actor. Busy
# is not stalled: under the ledger benchmark's batches on that slow host,
# a chain's loop ran up to 1.03 s late, and its pings were answered within
# 0.38 s (README, "A silent chain's writes go to the next chain").
LOOP_TICK_S = 0.1
LOOP_STALLED_AFTER_S = 5.0


class Pinged:
    """Mixed into each actor class that is pinged. Its __init__, which Ray
    runs on the actor's loop, calls `keep_loop_ticking`."""

    _loop_ticked: float | None = None  # monotonic; written by the actor's loop, read by the ping's
    loop_stalled_after_s = LOOP_STALLED_AFTER_S

    def keep_loop_ticking(self) -> None:
        self._loop_ticked = time.monotonic()
        self._ticking = start_shared_task(self._tick())  # held: the loop keeps only weak references to tasks

    async def _tick(self) -> None:
        while True:
            self._loop_ticked = time.monotonic()
            await asyncio.sleep(LOOP_TICK_S)

    @ray.method(concurrency_group=LIVENESS_GROUP)
    async def ping(self) -> bool:
        """True once the actor's own loop has run within `loop_stalled_after_s`;
        raises what `raise_if_broken` finds."""
        if self._loop_ticked is None:
            raise RuntimeError(f"{type(self).__name__}.__init__ did not call keep_loop_ticking")
        while time.monotonic() - self._loop_ticked > self.loop_stalled_after_s:
            await asyncio.sleep(LOOP_TICK_S)
        self.raise_if_broken()
        return True

    def raise_if_broken(self) -> None:
        """Raise where the actor lives but work of its own has stopped (a loop
        that ended); called from the ping's thread, so it only reads."""


class Watched(Pinged):
    """Mixed into each actor class the supervisor runs (actors/supervisor.py)."""

    _watcher: asyncio.Event | None = None

    async def watched(self) -> None:
        """The supervisor's standing call, which never returns while this actor
        lives: Ray fails it the moment the actor's process dies, so a death is
        seen at once instead of at the next ping. A newer call ends the one
        before it, so a supervisor that died and came back leaves no waiter
        behind (the video processor takes 4 calls at a time)."""
        if self._watcher is not None:
            self._watcher.set()
        self._watcher = watcher = asyncio.Event()
        await watcher.wait()

    def node_id(self) -> str:
        """The Ray node this actor runs on (see SupervisorActor.placement)."""
        return ray.get_runtime_context().get_node_id()
