"""ActorRef on the real Ray cluster (actors/refs.py): it keeps the handle of
whichever actor holds its name, looked up while Ray's control store
answers, so that a call reaches an actor made again under that name even
once the store does not (lost with the Ray head; test_head_node_loss.py
is the whole case)."""

from __future__ import annotations

import threading
import time

import ray

from dailydoco.actors.refs import HANDLE_REFRESH_S, ActorRef

from .conftest import unique

NAME_FREED_WITHIN_S = 20.0
CALL_DEADLINE_S = 5.0


@ray.remote(num_cpus=0)
class Named:
    def __init__(self, incarnation: int):
        self.incarnation = incarnation

    def which(self) -> int:
        return self.incarnation


@ray.remote(num_cpus=0, max_concurrency=10)
class Holder:
    """An ActorRef in a process of its own, as the API replicas and the actors hold theirs."""

    def __init__(self, name: str, namespace: str):
        self.ref = ActorRef(name, namespace)

    async def which(self) -> int:
        return await self.ref.call("which", deadline_s=CALL_DEADLINE_S)

    def lose_lookups(self) -> None:
        """Every lookup from now on waits, for good, as one does for the control store of a lost head."""
        def waiting(*args, **kwargs):
            threading.Event().wait()

        ray.get_actor = waiting  # this process's alone: an actor has its own


def _named(name: str, namespace: str, incarnation: int):
    """A Named actor under `name`, once a killed one has let go of it."""
    deadline = time.monotonic() + NAME_FREED_WITHIN_S
    while True:
        try:
            actor = Named.options(name=name, namespace=namespace).remote(incarnation)
            assert ray.get(actor.which.remote()) == incarnation
            return actor
        except ValueError:  # the name is still the dead one's
            assert time.monotonic() < deadline, f"{name} is still taken"
            time.sleep(0.1)


def test_a_call_reaches_the_actor_made_again_under_the_name_once_lookups_wait(engine):
    name, namespace = unique("refreshed"), engine.config.namespace
    first = _named(name, namespace, 1)
    holder = Holder.remote(name, namespace)
    assert ray.get(holder.which.remote()) == 1
    ray.kill(first, no_restart=True)
    second = _named(name, namespace, 2)  # noqa: F841 - held: a named actor lives while its handles do
    # No call meanwhile: the ref finds the new actor on its own.
    time.sleep(2 * HANDLE_REFRESH_S + 1)
    ray.get(holder.lose_lookups.remote())
    # Had the ref kept the dead actor's handle, the call would fail on it,
    # look the name up, and wait for the lookup until its deadline (503).
    assert ray.get(holder.which.remote()) == 2
    ray.kill(holder)
