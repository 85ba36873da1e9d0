"""Lanes between actors on the real Ray cluster (actors/lane.py): a call
goes over the lane once it is up, by Ray before that, for an actor on
another node, and for a call whose lane is lost with its actor."""

from __future__ import annotations

import asyncio
import time

import ray

from dailydoco.actors.lane import LANE_LOOKUP_AFTER_LOSS_S, LanedActorRef, LaneServer

from .conftest import Api, counted, unique

WAYS_WAIT_S = 20.0


@ray.remote(num_cpus=0, max_concurrency=100)
class Shouting:
    """`shout` over a lane; `hold` keeps its calls waiting until the actor dies."""

    def __init__(self, node_id: str | None = None):
        self.lane_server = LaneServer(self.shout, node_id or ray.get_runtime_context().get_node_id())
        self.open = asyncio.Event()
        self.open.set()

    async def shout(self, body: bytes) -> bytes:
        await self.open.wait()
        return body.upper()

    async def lane(self):
        return await self.lane_server.address()

    def hold(self) -> None:
        self.open.clear()


@ray.remote(num_cpus=0, max_concurrency=100)
class Caller:
    def __init__(self, name: str, namespace: str):
        self.ways: list[str] = []
        self.ref = LanedActorRef(name, namespace, "shout", self.ways.append)

    async def shout(self, body: bytes) -> bytes:
        return await self.ref.call("shout", body)

    def ways_taken(self) -> list[str]:
        return self.ways


def _shouting(name: str, namespace: str, node_id: str | None = None):
    """A Shouting actor under `name`, once a killed one has let go of it."""
    deadline = time.monotonic() + WAYS_WAIT_S
    while True:
        try:
            return Shouting.options(name=name, namespace=namespace).remote(node_id)
        except ValueError:  # the name is still the dead one's
            assert time.monotonic() < deadline, f"{name} is still taken"
            time.sleep(0.1)


def _until_the_lane_is_taken(caller) -> None:
    deadline = time.monotonic() + WAYS_WAIT_S
    while ray.get(caller.ways_taken.remote())[-1:] != ["lane"]:
        assert time.monotonic() < deadline, ray.get(caller.ways_taken.remote())
        assert ray.get(caller.shout.remote(b"again")) == b"AGAIN"
        time.sleep(0.05)


def test_calls_go_by_ray_until_the_lane_is_up_then_over_it(engine):
    name, namespace = unique("lane-up"), engine.config.namespace
    shouting = _shouting(name, namespace)  # noqa: F841 - held: a named actor lives while its handles do
    caller = Caller.remote(name, namespace)
    assert ray.get(caller.shout.remote(b"first")) == b"FIRST"
    assert ray.get(caller.ways_taken.remote()) == ["ray"]  # the lane is looked up beside the first call
    _until_the_lane_is_taken(caller)
    answers = ray.get([caller.shout.remote(f"call {i}".encode()) for i in range(20)])
    assert answers == [f"CALL {i}".encode() for i in range(20)]
    assert ray.get(caller.ways_taken.remote())[-20:] == ["lane"] * 20


def test_an_actor_on_another_node_is_called_by_ray(engine):
    name, namespace = unique("lane-elsewhere"), engine.config.namespace
    shouting = _shouting(name, namespace, node_id="another-node")  # noqa: F841 - held: it lives while its handles do
    caller = Caller.remote(name, namespace)
    for i in range(10):
        assert ray.get(caller.shout.remote(b"x")) == b"X"
        time.sleep(0.05)
    assert ray.get(caller.ways_taken.remote()) == ["ray"] * 10


def test_a_call_whose_lane_is_lost_with_its_actor_goes_by_ray_to_the_one_made_again(engine):
    name, namespace = unique("lane-lost"), engine.config.namespace
    first = _shouting(name, namespace)
    caller = Caller.remote(name, namespace)
    _until_the_lane_is_taken(caller)
    ray.get(first.hold.remote())
    in_flight = caller.shout.remote(b"in flight")
    time.sleep(0.5)  # on its way over the lane, and held there
    ray.kill(first, no_restart=True)
    second = _shouting(name, namespace)  # noqa: F841 - held, as above
    assert ray.get(in_flight, timeout=WAYS_WAIT_S) == b"IN FLIGHT"
    ways = ray.get(caller.ways_taken.remote())
    assert ways[-1] == "ray", ways  # the lost call, by Ray to the actor made again
    time.sleep(LANE_LOOKUP_AFTER_LOSS_S)
    _until_the_lane_is_taken(caller)  # the new actor's lane


def test_the_api_sends_purchases_to_the_chains_over_their_lanes(api: Api):
    buyer = unique("lane-buyer")
    api.register(buyer)
    before = counted(api, "dailydoco_chain_submit_calls_total", way="lane")
    deadline = time.monotonic() + WAYS_WAIT_S
    while counted(api, "dailydoco_chain_submit_calls_total", way="lane") < before + 10:
        assert time.monotonic() < deadline, "no purchases went over a chain's lane"
        response = api.purchase(buyer, 1_000_000)
        assert response.status_code == 201, response.text
