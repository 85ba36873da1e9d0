"""What a component does once its NATS connection is back (reload what it
may have missed) must not disturb the connection itself, against a real
nats-server restarted under the client."""

from __future__ import annotations

import asyncio

from dailydoco.cluster import nats_io
from dailydoco.cluster.regions import NatsRegions

REGION = "test-reconnect"
WAIT_S = 10.0


async def _until(condition, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def _exercise(regions: NatsRegions) -> None:
    calls: list[str] = []

    async def reload_after_reconnect() -> None:
        calls.append("reload")
        if len(calls) == 1:
            # Postgres refusing connections at that moment (ConnectionRefusedError).
            raise ConnectionRefusedError("the database is down")

    nc = await nats_io.connect(regions.url(REGION), name="reconnect-test", reconnected_cb=reload_after_reconnect)
    publisher = await nats_io.connect(regions.url(REGION), name="reconnect-publisher")
    try:
        got: list[bytes] = []

        async def take(msg) -> None:
            got.append(msg.data)

        await nc.subscribe("after.restart", cb=take)
        await nc.flush()
        await asyncio.to_thread(regions.restart_region, REGION)
        await _until(lambda: calls and nc.is_connected and publisher.is_connected, "both clients to reconnect")
        await asyncio.sleep(1)  # time for any reconnect that follows
        await publisher.publish("after.restart", b"once")
        await publisher.flush()
        await _until(lambda: got, "the message")
        await asyncio.sleep(0.5)
        # One reconnect. nats-py awaits the callback inside its reconnect
        # loop, and took the callback's OSError for a failed reconnect: it
        # connected a second time (and called the callback again), and the
        # first connection was never closed, as nats-py closes its transport
        # only where a reconnect begins.
        assert (nc.stats["reconnects"], got, calls) == (1, [b"once"], ["reload"])
    finally:
        await nc.close()
        await publisher.close()


def test_a_failing_reconnect_callback_leaves_one_connection(tmp_path):
    with NatsRegions(tmp_path, [REGION]) as regions:
        asyncio.run(_exercise(regions))
