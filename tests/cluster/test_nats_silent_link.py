"""NATS links that go silent without closing are found, and joined again:
through a proxy that stops passing on what one side sends (its messages and
PINGs) while keeping the connection open, as a NAT or firewall that dropped
its state would, or a frozen peer. New connections pass, as they would
through a fresh NAT entry. Whatever went into the dead link is lost: core
NATS publishing is at most once, which is why events go through JetStream
with acks and an outbox (see README, Live updates).

- The engine's client connections ping their server every 5 s
  (cluster/nats_io.py). With nats-py's own settings (a ping every 120 s)
  finding the dead link took up to 6 minutes.
- The embedded servers ping their peers the same way (cluster/embedded.py:
  NATS_SERVER_PINGS), the gateways between regions among them. With
  nats-server's own settings (gateways pinged every 15 s) one region's
  messages stopped reaching another for 30 to 45 s (32 s measured), past
  the bound here.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from dailydoco.cluster import nats_interest, nats_io
from dailydoco.cluster.nats_io import SILENT_LINK_FOUND_S
from dailydoco.cluster.regions import NatsRegions, nats_region_configs

from ..tcp_faults import HoldingProxy

# Beyond finding the dead link: one connect through the proxy, and for a
# gateway the subscriber's interest sent again. Well within this.
RECONNECT_SLACK_S = 10.0
DELIVERY_WAIT_S = 20.0


async def _until_heard(client, subject: str, data: bytes, got: list[bytes], wait_s: float = DELIVERY_WAIT_S) -> float:
    """Publish `data` until the listener has it; returns how long that took.
    A flush alone proves nothing here: nats-py writes its PING straight to
    the socket, ahead of a SUB or PUB still in its buffer."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while data not in got:
        assert loop.time() - start < wait_s, f"the listener never heard {data!r} within {wait_s:g} s"
        await client.publish(subject, data)
        await client.flush(timeout=DELIVERY_WAIT_S)
        await asyncio.sleep(0.05)
    return loop.time() - start


async def _client_link(url: str) -> None:
    lost, back = asyncio.Event(), asyncio.Event()

    async def on_lost() -> None:
        lost.set()

    async def on_back() -> None:
        back.set()

    async with HoldingProxy(url) as proxy:
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
            await asyncio.wait_for(back.wait(), SILENT_LINK_FOUND_S + RECONNECT_SLACK_S)
            assert lost.is_set()

            await _until_heard(client, subject, b"after reconnecting", got)
            assert b"into the silent link" not in got
        finally:
            await client.close()
            await listener.close()


def test_a_silent_link_is_found_and_the_client_reconnects(servers):
    asyncio.run(_client_link(servers[1]))


async def _gateway_link(regions: NatsRegions) -> float:
    """eu-west's gateway connection to us-east goes through the proxy.
    Returns how long after it went silent eu-west's messages reached
    us-east again: they go over that connection."""
    async with HoldingProxy(f"nats://127.0.0.1:{regions.ports['us-east']['gateway']}") as proxy:
        # The configuration as the engine writes it, but for the proxy; us-east
        # advertises it too, or eu-west would learn us-east's own address and
        # connect there instead.
        regions.state_dir.mkdir(parents=True, exist_ok=True)
        us_east_gateway = f"127.0.0.1:{regions.ports['us-east']['gateway']}"
        for region, text in nats_region_configs(regions.regions, regions.ports, regions.state_dir).items():
            if region == "eu-west":
                assert f"nats://{us_east_gateway}" in text
                text = text.replace(f"nats://{us_east_gateway}", proxy.url)
            else:
                listen = f'listen: "{us_east_gateway}"'
                assert listen in text
                text = text.replace(listen, f'{listen}\n    advertise: "{proxy.url.removeprefix("nats://")}"')
            (regions.state_dir / f"{region}.conf").write_text(text)
        for region in regions.regions:
            await asyncio.to_thread(regions.start_region, region)

        west = await nats_io.connect(regions.url("eu-west"), "silent-gateway-publisher")
        east = await nats_io.connect(regions.url("us-east"), "silent-gateway-listener")
        got: list[bytes] = []
        try:
            await nats_interest.subscribe(east, "silent-gateway-test", lambda msg: got.append(msg.data))
            await _until_heard(west, "silent-gateway-test", b"before", got)

            proxy.hold()  # the gateway link goes silent; neither server is told
            silent_since = time.monotonic()
            await _until_heard(west, "silent-gateway-test", b"after the link went silent", got,
                               SILENT_LINK_FOUND_S + RECONNECT_SLACK_S)
            return time.monotonic() - silent_since
        finally:
            await west.close()
            await east.close()


def test_a_silent_gateway_link_between_regions_is_found_and_joined_again(tmp_path):
    regions = NatsRegions(tmp_path, ["us-east", "eu-west"])
    try:
        back_after_s = asyncio.run(_gateway_link(regions))
    finally:
        regions.stop()
    print(f"eu-west's messages reached us-east again {back_after_s:.1f} s after the link went silent")
