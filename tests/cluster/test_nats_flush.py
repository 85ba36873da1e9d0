"""Our NATS connections against the session's real nats-server: a flush that
times out leaves the connection delivering (nats-py's own client stops
reading for good when that flush's PONG comes)."""

from __future__ import annotations

import asyncio
import uuid

from dailydoco.cluster import nats_interest, nats_io

WAIT_S = 10.0


async def _exercise(url: str) -> None:
    nc = await nats_io.connect(url, name="flush-test")
    publisher = await nats_io.connect(url, name="flush-publisher")
    subject = f"flush-test.{uuid.uuid4().hex}"
    try:
        got: list[bytes] = []
        await nats_interest.subscribe(nc, subject, lambda msg: got.append(msg.data))
        # What a flush that timed out leaves behind, made deterministic: its
        # PING sent, the future its PONG would resolve cancelled. (A real
        # flush with a tiny timeout gets its PONG in time now and then.)
        pong = asyncio.get_running_loop().create_future()
        await nc._send_ping(pong)
        pong.cancel()
        await nc.flush(timeout=WAIT_S)  # the late PONG was taken in stride, and so is this one
        await publisher.flush(timeout=WAIT_S)

        await publisher.publish(subject, b"after a timed-out flush")
        await publisher.flush(timeout=WAIT_S)
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while not got and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        assert got == [b"after a timed-out flush"]
        assert nc.is_connected and not nc._reading_task.done()
    finally:
        await nc.close()
        await publisher.close()


def test_a_timed_out_flush_leaves_the_connection_delivering(servers):
    asyncio.run(_exercise(servers[1]))
