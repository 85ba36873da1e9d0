"""What the supervisor asks of every actor it runs, besides its own work."""

from __future__ import annotations

import asyncio

import ray


class Watched:
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
