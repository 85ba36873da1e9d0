"""Watched.watched: the supervisor's standing call on each actor (actors/watch.py)."""

import asyncio

from dailydoco.actors.watch import Watched


async def _pending_after_a_moment(call: asyncio.Task) -> bool:
    await asyncio.sleep(0.05)
    return not call.done()


def test_the_call_stays_pending_while_the_actor_lives_and_a_newer_one_ends_it():
    async def scenario():
        actor = Watched()
        first = asyncio.create_task(actor.watched())
        assert await _pending_after_a_moment(first)
        second = asyncio.create_task(actor.watched())
        await asyncio.wait_for(first, 1)  # ended, normally: a newer watcher took over
        assert await _pending_after_a_moment(second)
        second.cancel()

    asyncio.run(scenario())


def test_instances_are_watched_apart():
    async def scenario():
        a, b = Watched(), Watched()
        watching_a = asyncio.create_task(a.watched())
        await asyncio.sleep(0)
        watching_b = asyncio.create_task(b.watched())
        assert await _pending_after_a_moment(watching_a) and await _pending_after_a_moment(watching_b)
        watching_a.cancel()
        watching_b.cancel()

    asyncio.run(scenario())
