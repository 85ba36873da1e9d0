"""A live socket opened while its replica has no NATS connection yet (just
started, or reconnecting) waits for one instead of being sent away; only
after NATS_WAIT_S does it close, with a reason. Real Postgres and NATS."""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute

from dailydoco.cluster import nats_io
from dailydoco.cluster.embedded import free_port
from dailydoco.cluster.live_client import ConnectionClosed, WebSocketConnection
from dailydoco.protocol.live import CloseCode
from dailydoco.serve import live
from dailydoco.serve.auth import TokenAuthority, load_or_create_secrets
from dailydoco.storage.pool import open_pool

from ..conftest import migrated_database

NATS_ARRIVES_AFTER_S = 0.5


async def _exercise(database_url: str, nats_url: str, state_dir: str) -> None:
    pool = await open_pool(database_url, max_size=2)
    auth = TokenAuthority(load_or_create_secrets(state_dir))
    nats_box: list = []  # empty: this replica has not connected yet
    gateway = live.LiveGateway(auth, (), lambda: nats_box[0] if nats_box else None, lambda: pool)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[WebSocketRoute("/v1/live", gateway.handle)]),
                                           host="127.0.0.1", port=port, lifespan="off", log_level="warning"))
    serving = asyncio.create_task(server.serve())
    url = f"ws://127.0.0.1:{port}/v1/live"
    token, _ = auth.issue("nats-wait-user", 3600)
    hello = '{"type":"connect","token":"%s"}' % token
    try:
        while not server.started:
            await asyncio.sleep(0.05)

        # NATS never comes: the socket is closed with a reason once the wait is over.
        ws = await WebSocketConnection.open(url)
        await ws.send(hello)
        started = asyncio.get_running_loop().time()
        with pytest.raises(ConnectionClosed) as closed:
            await ws.receive()
        assert closed.value.code == CloseCode.INTERNAL_ERROR and "NATS down" in closed.value.reason
        assert asyncio.get_running_loop().time() - started >= live.NATS_WAIT_S * 0.9

        # NATS comes while the socket waits: it is served.
        ws = await WebSocketConnection.open(url)
        await ws.send(hello)
        await asyncio.sleep(NATS_ARRIVES_AFTER_S)
        nats_box.append(await nats_io.connect(nats_url, "nats-wait-test"))
        connected = await asyncio.wait_for(ws.receive(), live.NATS_WAIT_S)
        assert '"connected"' in (connected if isinstance(connected, str) else connected.decode())
        await ws.close()
    finally:
        server.should_exit = True
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(serving, 5)
        for nc in nats_box:
            await nc.close()
        await pool.close()


def test_a_socket_waits_for_the_replicas_nats_connection(servers, tmp_path):
    database_url = asyncio.run(migrated_database(servers[0], f"dailydoco_nats_wait_{os.getpid()}"))
    asyncio.run(_exercise(database_url, servers[1], str(tmp_path)))
