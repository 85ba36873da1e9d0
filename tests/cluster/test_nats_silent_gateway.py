"""The embedded NATS servers find a gateway link between regions that went
silent without closing, and connect again: eu-west's gateway connection to
us-east runs through a proxy that stops passing on what eu-west sends (its
messages and PINGs) while keeping the connection open, as a NAT or firewall
that dropped its state would. New connections pass.

The servers ping each other as the engine's clients ping them
(cluster/embedded.py: NATS_SERVER_PINGS), so the link is given up 10 to
15 s after it went silent.

Messages published in eu-west for a subscriber in us-east go over that
connection, so until the servers give it up nothing published in eu-west
reaches us-east. With nats-server's own settings (gateways pinged every
15 s) that took 30 to 45 s, past this test's bound (32 s measured)."""

from __future__ import annotations

import asyncio
import contextlib
import time

from dailydoco.cluster import nats_io, nats_interest
from dailydoco.cluster.nats_io import SILENT_LINK_FOUND_S
from dailydoco.cluster.regions import NatsRegions, nats_region_configs

from ..tcp_faults import HoldingProxy

# Finding the dead link, then one gateway connect and the subscriber's
# interest sent again: well within this beyond the servers' own bound.
RECONNECT_SLACK_S = 10.0
DELIVERY_WAIT_S = 20.0


async def _until_heard(client, subject: str, data: bytes, got: list[bytes], wait_s: float) -> float:
    """Publish `data` until the listener has it; returns how long that took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while data not in got:
        assert loop.time() - start < wait_s, f"the listener never heard {data!r} within {wait_s} s"
        await client.publish(subject, data)
        await client.flush(timeout=5)
        await asyncio.sleep(0.1)
    return loop.time() - start


async def _exercise(regions: NatsRegions) -> float:
    """Returns how long after the link went silent eu-west's messages reached us-east again."""
    proxy = HoldingProxy(f"nats://127.0.0.1:{regions.ports['us-east']['gateway']}")
    await proxy.start()
    # eu-west's gateway to us-east goes through the proxy; the rest as the
    # engine writes it. us-east advertises the proxy too: eu-west would
    # otherwise learn us-east's own address from it and connect there.
    regions.state_dir.mkdir(parents=True, exist_ok=True)
    us_east_gateway = f"127.0.0.1:{regions.ports['us-east']['gateway']}"
    proxy_address = proxy.url.removeprefix("nats://")
    for region, text in nats_region_configs(regions.regions, regions.ports, regions.state_dir).items():
        if region == "eu-west":
            assert f"nats://{us_east_gateway}" in text
            text = text.replace(f"nats://{us_east_gateway}", proxy.url)
        else:
            listen = f'listen: "{us_east_gateway}"'
            assert listen in text
            text = text.replace(listen, f'{listen}\n    advertise: "{proxy_address}"')
        (regions.state_dir / f"{region}.conf").write_text(text)
    for region in regions.regions:
        await asyncio.to_thread(regions.start_region, region)

    west = await nats_io.connect(regions.url("eu-west"), "silent-gateway-publisher")
    east = await nats_io.connect(regions.url("us-east"), "silent-gateway-listener")
    got: list[bytes] = []
    try:
        await nats_interest.subscribe(east, "silent-gateway-test", lambda msg: got.append(msg.data))
        await _until_heard(west, "silent-gateway-test", b"before", got, DELIVERY_WAIT_S)

        proxy.hold()  # the gateway link goes silent; neither server is told
        silent_since = time.monotonic()
        await _until_heard(west, "silent-gateway-test", b"after the link went silent", got,
                           SILENT_LINK_FOUND_S + RECONNECT_SLACK_S)
        return time.monotonic() - silent_since
    finally:
        await west.close()
        await east.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await proxy.release()  # lets the held connection's handler end
        await proxy.close()


def test_a_silent_gateway_link_is_found_and_the_regions_join_again(tmp_path):
    regions = NatsRegions(tmp_path, ["us-east", "eu-west"])
    try:
        back_after_s = asyncio.run(_exercise(regions))
    finally:
        regions.stop()
    print(f"eu-west's messages reached us-east again {back_after_s:.1f} s after the link went silent")
