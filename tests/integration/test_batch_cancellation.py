"""On the real Ray cluster: a caller of a shared batch that is cancelled (a
client hanging up) fails only itself, not the others in the same Ray call."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray
from ray.exceptions import TaskCancelledError

from dailydoco.actors.batching import MicroBatcher

DOWNSTREAM_CALL_S = 2.0


def test_cancelling_one_caller_leaves_the_others_in_its_batch(engine):
    @ray.remote(num_cpus=0)
    class Downstream:
        async def work(self, items: list[str]) -> list[str]:
            await asyncio.sleep(DOWNSTREAM_CALL_S)
            return [item.upper() for item in items]

    @ray.remote(num_cpus=0)
    class Front:
        """Callers wait at a gate, then submit in one loop turn: one batch."""

        def __init__(self, downstream):
            self.downstream = downstream
            self.gate = asyncio.Event()
            self.batcher = MicroBatcher(self._call, items_max=100, in_flight_max=1)

        async def _call(self, items: list[str]) -> list[str]:
            return await self.downstream.work.remote(items)

        async def get(self, item: str) -> str:
            await self.gate.wait()
            [result] = await self.batcher.submit([item])
            return result

        def open_gate(self) -> None:
            self.gate.set()

    front = Front.remote(Downstream.remote())
    first = front.get.remote("first")  # starts the batch: its context is the one that matters
    time.sleep(0.5)
    others = [front.get.remote(x) for x in ("a", "b")]
    time.sleep(0.5)
    ray.get(front.open_gate.remote())
    time.sleep(DOWNSTREAM_CALL_S / 4)  # the one call carrying all three is in flight
    ray.cancel(first)  # recursive, as Serve cancels a request whose client is gone
    with pytest.raises(TaskCancelledError):
        ray.get(first, timeout=30)
    assert ray.get(others, timeout=30) == ["A", "B"]
