import asyncio

import pytest

from dailydoco.actors.batching import MicroBatcher, wait_until_set


class Recorder:
    """A process step that holds each call until released, and records it."""

    def __init__(self):
        self.calls: list[list[int]] = []
        self.release = asyncio.Event()

    async def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(items)
        await self.release.wait()
        return [i * 10 for i in items]


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_small_requests_gather_behind_the_call_in_flight():
    async def run():
        step = Recorder()
        batcher = MicroBatcher(step, items_max=100, in_flight_max=4, overlap_items_min=10)
        first = asyncio.create_task(batcher.submit([1]))
        await _settle()
        later = [asyncio.create_task(batcher.submit([i])) for i in range(2, 6)]
        await _settle()
        assert step.calls == [[1]]  # 4 waiting items are below the overlap threshold
        step.release.set()
        assert await first == [10]
        assert [await t for t in later] == [[20], [30], [40], [50]]
        assert step.calls == [[1], [2, 3, 4, 5]]

    asyncio.run(run())


def test_requests_gathered_behind_a_stuck_call_go_in_a_call_of_their_own():
    async def run():
        calls: list[list[int]] = []
        never = asyncio.Event()

        async def step(items: list[int]) -> list[int]:
            calls.append(items)
            if items == [1]:
                await never.wait()  # stuck, as a call to a stalled Postgres is
            return [i * 10 for i in items]

        batcher = MicroBatcher(step, items_max=100, in_flight_max=4, overlap_items_min=10, overlap_after_s=0.2)
        stuck = asyncio.create_task(batcher.submit([1]))
        await _settle()
        gathered = asyncio.create_task(batcher.submit([2]))
        await asyncio.sleep(0.1)
        later = asyncio.create_task(batcher.submit([3]))
        await asyncio.sleep(0.05)
        assert calls == [[1]]  # gathering, as at any load, for up to 0.2 s
        assert await asyncio.wait_for(asyncio.gather(gathered, later), 1.0) == [[20], [30]]
        assert calls == [[1], [2, 3]]  # one call for both, once the older had waited 0.2 s
        late = asyncio.create_task(batcher.submit([4]))
        await _settle()
        assert calls == [[1], [2, 3]]  # behind the stuck call again: each request waits up to 0.2 s
        assert await asyncio.wait_for(late, 1.0) == [40]
        assert not stuck.done()
        stuck.cancel()

    asyncio.run(run())


def test_bulk_requests_overlap_up_to_the_limit():
    async def run():
        step = Recorder()
        batcher = MicroBatcher(step, items_max=10, in_flight_max=2, overlap_items_min=10)
        tasks = [asyncio.create_task(batcher.submit(list(range(k * 10, k * 10 + 10)))) for k in range(3)]
        await _settle()
        assert len(step.calls) == 2  # a full call's worth waited: a second call overlaps; the third waits
        step.release.set()
        results = [await t for t in tasks]
        assert results == [[i * 10 for i in range(k * 10, k * 10 + 10)] for k in range(3)]
        assert len(step.calls) == 3

    asyncio.run(run())


def test_a_failed_call_fails_its_waiters_only():
    async def run():
        calls = []

        async def step(items):
            calls.append(items)
            if 0 in items:
                raise RuntimeError("boom")
            return items

        batcher = MicroBatcher(step, items_max=1, in_flight_max=1)
        failing = asyncio.create_task(batcher.submit([0]))
        fine = asyncio.create_task(batcher.submit([1]))
        with pytest.raises(RuntimeError, match="boom"):
            await failing
        assert await fine == [1]
        assert calls == [[0], [1]]

    asyncio.run(run())


def test_a_loop_woken_by_an_event_stops_when_cancelled_as_the_event_is_set():
    """The outbox relay's and the video queue's loop: woken by an event, or
    polling. A cancel that lands in the same turn as the event is set must
    end it (asyncio.wait_for on Python 3.11 swallowed it, and the loop ran
    on; this test fails with it)."""
    async def woken_loop(event: asyncio.Event) -> None:
        while True:
            event.clear()
            await wait_until_set(event, 10.0)

    async def run():
        event = asyncio.Event()
        loop = asyncio.create_task(woken_loop(event))
        await asyncio.sleep(0.01)  # waiting on the event
        event.set()
        loop.cancel()
        done, _ = await asyncio.wait({loop}, timeout=1.0)
        assert loop in done and loop.cancelled()
        # And it still waits out its timeout, then returns.
        started = asyncio.get_running_loop().time()
        await wait_until_set(asyncio.Event(), 0.05)
        assert asyncio.get_running_loop().time() - started >= 0.05

    asyncio.run(run())
