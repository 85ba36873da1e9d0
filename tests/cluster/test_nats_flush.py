"""`nats_io.flush` against the session's real nats-server: a flush that times
out leaves the connection delivering (nats-py's own flush stops its reader)."""

from __future__ import annotations

import asyncio
import uuid

import nats
import pytest

from dailydoco.cluster import nats_interest, nats_io

WAIT_S = 10.0


async def _exercise(url: str) -> None:
    nc = await nats_io.connect(url, name="flush-test")
    publisher = await nats_io.connect(url, name="flush-publisher")
    subject = f"flush-test.{uuid.uuid4().hex}"
    try:
        got: list[bytes] = []
        await nats_interest.subscribe(nc, subject, lambda msg: got.append(msg.data))
        with pytest.raises(nats.errors.FlushTimeoutError):
            await nats_io.flush(nc, 0)  # gives up before the PONG can come
        await nats_io.flush(nc, WAIT_S)  # the late PONG was taken in stride, and so is this one
        await nats_io.flush(publisher, WAIT_S)

        await publisher.publish(subject, b"after a timed-out flush")
        await nats_io.flush(publisher, WAIT_S)
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
