"""Pings on the real Ray cluster (actors/watch.py): an actor answers them on
a thread of its own, so that its callers wait for it while its own loop is
busy, and take it for silent only once that loop has stopped running."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray
from ray.exceptions import GetTimeoutError

from dailydoco.actors.refs import ANSWER_WAIT_S, PING_WAIT_S, ActorRef, SilenceWatch
from dailydoco.actors.watch import LIVENESS_GROUPS, Pinged

from .conftest import unique

# A ping's answer while the loop is held: on its own thread, milliseconds;
# on the held loop, once the hold ends, 2 s later.
PROMPT_ANSWER_S = 1.0
# Past a caller's wait and its ping's (2 s), within the actor's
# LOOP_STALLED_AFTER_S (5 s): busy, not stalled.
BUSY_FOR_S = ANSWER_WAIT_S + PING_WAIT_S + 1.0
STALLED_AFTER_S = 1.0  # the stalled actor's, shorter than the default to keep the test short


@ray.remote(num_cpus=0, max_concurrency=10, concurrency_groups=LIVENESS_GROUPS)
class LoopHolder(Pinged):
    def __init__(self, stalled_after_s: float | None = None):
        self.keep_loop_ticking()
        if stalled_after_s is not None:
            self.loop_stalled_after_s = stalled_after_s

    async def hold_loop(self, seconds: float) -> bool:
        time.sleep(seconds)  # the actor's loop runs nothing else meanwhile, as in a long computation
        return True

    async def ready(self) -> bool:
        return True


def test_a_busy_actor_answers_its_pings_and_its_callers_wait_for_it(engine):
    name, namespace = unique("busy"), engine.config.namespace
    actor = LoopHolder.options(name=name, namespace=namespace).remote()
    ray.get(actor.ready.remote())

    held = actor.hold_loop.remote(BUSY_FOR_S)
    time.sleep(1.0)
    assert ray.get(actor.ping.remote(), timeout=PROMPT_ANSWER_S) is True
    ray.get(held)

    async def waited_for() -> tuple[bool, bool]:
        watch = SilenceWatch(ActorRef(name, namespace), "nowhere")
        call = asyncio.ensure_future(watch.call("hold_loop", BUSY_FOR_S))
        # Before session 56 the ping waited behind the held loop: the
        # actor was silent after 2 s, and its callers went elsewhere.
        return await watch.answered(call), watch.silent

    assert asyncio.run(waited_for()) == (True, False)
    ray.kill(actor)


def test_an_actor_whose_loop_has_stopped_running_does_not_answer_its_pings(engine):
    actor = LoopHolder.options(name=unique("stalled"), namespace=engine.config.namespace).remote(STALLED_AFTER_S)
    ray.get(actor.ready.remote())

    # Held 5 s past its stall limit, and pinged from 2 s past it: a hold
    # that starts late still leaves the ping within the stall.
    held = actor.hold_loop.remote(STALLED_AFTER_S + 5.0)
    time.sleep(STALLED_AFTER_S + 2.0)
    with pytest.raises(GetTimeoutError):
        ray.get(actor.ping.remote(), timeout=1.0)
    ray.get(held)
    assert ray.get(actor.ping.remote(), timeout=5.0) is True  # its loop runs again
    ray.kill(actor)
