"""Natural micro-batching: whatever arrives while a batch is in flight goes next.

No batching window: at low load a request goes alone and at once; under
load requests share one call (one Postgres commit, one Ray message), so the
cost per request falls as the load rises. Used for group commit and for the
replica's calls to the commission chains.

Calls overlap (up to `in_flight_max`) so that one can compute while another
waits on I/O. With `overlap_items_min`, a call starts beside one in flight
only once that many items wait: small requests then gather behind the one
call in flight (fewer, larger calls: less CPU per item, and on a busy
machine lower latency too), while bulk loads still overlap. With
`overlap_after_s` too, they gather no longer than that: a call in flight so
long is stuck, and what waits behind it goes in a call of its own.

A batch serves many callers, so it runs as a shared task (below).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Awaitable, Callable, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")
log = logging.getLogger("dailydoco.batching")


def start_shared_task(coro) -> asyncio.Task:
    """Start work done for many callers outside the context of the one that
    happens to start it. Ray keeps an async actor's current task in a context
    variable, so Ray calls made from a task started in one request's context
    are that request's children, and Ray cancels them with it (a client that
    hangs up): everyone else's share of the work would fail with it."""
    return asyncio.get_running_loop().create_task(coro, context=contextvars.Context())


F = TypeVar("F", bound=asyncio.Future)


def outcome_unread(future: F) -> F:
    """`future`, its outcome marked as read: for work whose callers may all
    give up on it (a lookup, a probe, a call given up for another), which
    then finishes or fails alone, not logged as an error no one retrieved.
    Those that await it still get its result or exception."""
    future.add_done_callback(lambda done: done.cancelled() or done.exception())
    return future


async def wait_until_set(event: asyncio.Event, timeout_s: float) -> None:
    """Until `event` is set or `timeout_s` has passed, for a loop that waits
    to be woken or polls. Not asyncio.wait_for: on Python 3.11 a cancel
    that lands as the event is set is swallowed (CPython gh-86296, fixed in
    3.12), and the loop around it runs on, its task cancelled in vain: the
    likely cause of a CI run in session 46 whose test_regions teardown,
    cancelling the outbox relay while its rounds woke it, waited until the
    test's 10 minutes ran out."""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        pass


class MicroBatcher(Generic[Item, Result]):
    def __init__(self, process: Callable[[list[Item]], Awaitable[list[Result]]], items_max: int, in_flight_max: int,
                 overlap_items_min: int = 1, overlap_after_s: float | None = None):
        self._process = process
        self._items_max = items_max
        self._in_flight_max = in_flight_max
        self._overlap_items_min = overlap_items_min
        self._overlap_after_s = overlap_after_s
        self._queue: list[tuple[list[Item], asyncio.Future, float]] = []  # (items, their future, queued at: loop time)
        self._queued_items = 0
        self._in_flight = 0
        self._overlap_check: asyncio.TimerHandle | None = None

    async def submit(self, items: list[Item]) -> list[Result]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((items, future, loop.time()))
        self._queued_items += len(items)
        if self._in_flight == 0 or self._queued_items >= self._overlap_items_min:
            self._start_call()
        elif self._overlap_after_s is not None and self._overlap_check is None:
            self._overlap_check = loop.call_later(self._overlap_after_s, self._overlap_if_stuck)
        return await future

    def _start_call(self) -> None:
        if self._in_flight < self._in_flight_max:
            self._in_flight += 1
            start_shared_task(self._drain())

    def _overlap_if_stuck(self) -> None:
        """Start a call for what has gathered overlap_after_s behind the
        calls in flight; else check again when the oldest waiting will have."""
        self._overlap_check = None
        if not self._queue:
            return  # a call that finished took what had gathered
        loop = asyncio.get_running_loop()
        due_at = self._queue[0][2] + self._overlap_after_s
        if loop.time() >= due_at:
            self._start_call()
        else:
            self._overlap_check = loop.call_at(due_at, self._overlap_if_stuck)

    async def _drain(self) -> None:
        try:
            while self._queue:
                group, size = [], 0
                while self._queue and (not group or size + len(self._queue[0][0]) <= self._items_max):
                    items, future, _ = self._queue.pop(0)
                    group.append((items, future))
                    size += len(items)
                self._queued_items -= size
                flat = [item for items, _ in group for item in items]
                try:
                    results = await self._process(flat)
                except Exception as exc:  # noqa: BLE001 - every waiter hears of it
                    for _, future in group:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                start = 0
                for items, future in group:
                    if not future.done():
                        future.set_result(results[start : start + len(items)])
                    start += len(items)
        finally:
            self._in_flight -= 1
