"""Our NATS connections find a link that went silent without closing, and
reconnect: against the session's real nats-server, through a proxy that
stops passing on what the client sends (its PINGs and publishes) while
keeping the connection open, as a NAT or firewall that dropped its state
would. New connections pass, as they would through a fresh NAT entry.

With nats-py's own settings (a ping every 120 s) this took up to 6 minutes,
and everything the client published meanwhile was lost on the dead link."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

from dailydoco.cluster import nats_interest, nats_io

from ..tcp_faults import HoldingProxy

# Reconnecting takes one connect through the proxy: well within this.
RECONNECT_SLACK_S = 10.0
DELIVERY_WAIT_S = 10.0


async def _until_heard(client, subject: str, data: bytes, got: list[bytes]) -> None:
    """Publish `data` until the listener has it. A flush alone proves
    nothing here: nats-py writes its PING straight to the socket, ahead of
    a SUB or PUB still in its buffer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DELIVERY_WAIT_S
    while data not in got:
        assert loop.time() < deadline, f"the listener never heard {data!r}"
        await client.publish(subject, data)
        await client.flush(timeout=DELIVERY_WAIT_S)
        await asyncio.sleep(0.05)


async def _exercise(url: str) -> None:
    proxy = HoldingProxy(url)
    await proxy.start()
    lost, back = asyncio.Event(), asyncio.Event()

    async def on_lost() -> None:
        lost.set()

    async def on_back() -> None:
        back.set()

    client = await nats_io.connect(proxy.url, name="silent-link-test", disconnected_cb=on_lost,
                                   reconnected_cb=on_back)
    listener = await nats_io.connect(url, name="silent-link-listener")
    subject = f"silent-link-test.{uuid.uuid4().hex}"
    got: list[bytes] = []
    try:
        await nats_interest.subscribe(listener, subject, lambda msg: got.append(msg.data))
        await _until_heard(client, subject, b"before", got)

        proxy.hold()  # the link goes silent; the client is not told
        await client.publish(subject, b"into the silent link")
        await asyncio.wait_for(back.wait(), nats_io.SILENT_LINK_FOUND_S + RECONNECT_SLACK_S)
        assert lost.is_set()

        await _until_heard(client, subject, b"after reconnecting", got)
        # What went into the dead link is gone: NATS core publishing is at
        # most once, which is why events go through JetStream with acks and
        # an outbox (see README, Live updates).
        assert b"into the silent link" not in got
    finally:
        await client.close()
        await listener.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await proxy.release()  # lets the held connection's handler end
        await proxy.close()


def test_a_silent_link_is_found_and_the_client_reconnects(servers):
    asyncio.run(_exercise(servers[1]))
