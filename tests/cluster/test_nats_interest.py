"""The gateway's light per-user interest, against a real nats-server: it gets
exactly its subject's messages, stops at unsubscribe, comes back after the
server restarts, and a failing callback leaves the connection working. The
connections log losing and regaining the server, and not a deliberate close;
a reconnect callback that fails leaves one connection."""

from __future__ import annotations

import asyncio
import logging

from dailydoco.cluster import nats_interest, nats_io
from dailydoco.cluster.regions import NatsRegions

REGION = "test-interest"
WAIT_S = 10.0


async def _until(condition, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def _until_registered(nc, publisher) -> None:
    """Wait until the server holds every interest `nc` has sent. nc.flush()
    does not: nats-py writes its PING straight to the socket, ahead of SUBs
    still in the client's buffer. SUBs reach the server in order, so once a
    probe subscribed last hears the publisher, the earlier ones are in."""
    heard: list = []
    probe = await nats_interest.subscribe(nc, "probe", heard.append)
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not heard:
        assert asyncio.get_running_loop().time() < deadline, "the server never took the interests"
        await publisher.publish("probe", b"")
        await publisher.flush()
        await asyncio.sleep(0.02)
    await probe.unsubscribe()


async def _exercise(regions: NatsRegions) -> None:
    nc = await nats_io.connect(regions.url(REGION), name="interest-test")
    publisher = await nats_io.connect(regions.url(REGION), name="interest-publisher")
    try:
        got_a: list[bytes] = []
        got_b: list[bytes] = []
        a = await nats_interest.subscribe(nc, "ev.*.a", lambda msg: got_a.append(msg.data))
        b = await nats_interest.subscribe(nc, "ev.*.ab", lambda msg: got_b.append(msg.data))

        def explode(msg) -> None:
            raise RuntimeError("a callback's bug")

        await nats_interest.subscribe(nc, "ev.*.boom", explode)
        await _until_registered(nc, publisher)
        for i in range(5):
            await publisher.publish("ev.east.a", b"a%d" % i)
            await publisher.publish("ev.west.ab", b"ab%d" % i)
            await publisher.publish("ev.east.boom", b"x")
        await publisher.flush()
        await _until(lambda: len(got_a) == 5 and len(got_b) == 5, "the first messages")
        assert got_a == [b"a%d" % i for i in range(5)]  # in order, and never the other subject's
        assert got_b == [b"ab%d" % i for i in range(5)]
        assert nc.is_connected  # the exploding callback did not end the client's reader

        await a.unsubscribe()
        await _until_registered(nc, publisher)
        await publisher.publish("ev.east.a", b"after")
        await publisher.publish("ev.east.ab", b"ab-after")
        await publisher.flush()
        await _until(lambda: len(got_b) == 6, "the remaining interest's message")
        assert got_a == [b"a%d" % i for i in range(5)]

        await asyncio.to_thread(regions.restart_region, REGION)  # the clients notice while it is down
        await _until(lambda: nc.is_connected and publisher.is_connected, "both clients to reconnect")
        await _until_registered(nc, publisher)  # the client resends its interests on reconnecting
        await publisher.publish("ev.east.ab", b"ab-restarted")
        await publisher.publish("ev.east.a", b"a-restarted")
        await publisher.flush()
        await _until(lambda: got_b[-1:] == [b"ab-restarted"], "a message after the restart")
        assert got_a == [b"a%d" % i for i in range(5)]  # the dropped interest stayed dropped
        await b.unsubscribe()
    finally:
        await nc.close()
        await publisher.close()


def test_interest_delivers_unsubscribes_and_survives_a_restart(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=nats_io.log.name)
    with NatsRegions(tmp_path, [REGION]) as regions:
        asyncio.run(_exercise(regions))
    said = [r.getMessage() for r in caplog.records if r.name == nats_io.log.name]
    for client in ("interest-test", "interest-publisher"):
        assert [m.split(" NATS", 1)[0] for m in said if m.startswith(client + ":")] == [
            f"{client}: lost its", f"{client}: reconnected to"]  # the restart, and nothing for the close


async def _exercise_failing_reconnect_callback(regions: NatsRegions) -> None:
    calls: list[str] = []

    # What a component does once its connection is back (reload what it may
    # have missed) must not disturb the connection itself.
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
        asyncio.run(_exercise_failing_reconnect_callback(regions))
