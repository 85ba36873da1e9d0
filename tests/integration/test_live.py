"""Live updates end to end: HTTP write -> outbox -> relay -> NATS -> gateway -> client."""

from __future__ import annotations

import os
import signal

import anyio
import httpx
import pytest

from dailydoco.cluster.live_client import LiveClient, LiveStreamEnded, WebSocketConnection, ConnectionClosed
from dailydoco.protocol.live import (
    BalanceChanged,
    CloseCode,
    CommissionEarned,
    Publication,
    ReferralJoined,
    StreamReset,
)

from .conftest import two_regions, unique

EVENT_WAIT_S = 15.0


def live_url(api, api_url: str | None = None) -> str:
    return (api_url or api.engine.url).replace("http://", "ws://") + "/v1/live"


def token_for(api, user_id: str, ttl_s: int = 3600) -> str:
    r = api.service.post(f"/v1/users/{user_id}/tokens", json={"ttl_s": ttl_s})
    assert r.status_code == 201, r.text
    return r.json()["token"]


async def take(events, n: int) -> list:
    out = []
    with anyio.fail_after(EVENT_WAIT_S):
        async for item in events:
            out.append(item)
            if len(out) == n:
                return out
    return out


async def _watch_purchase(api) -> None:
    root, mid, buyer = api.chain(3, "live")
    token = token_for(api, root)

    async def tokens() -> str:
        return token

    client = LiveClient(live_url(api), tokens)
    events = client.events()
    first = await take(events, 1)
    assert first == [StreamReset(first[0].epoch, 2)]  # two referral events so far: mid (level 1), buyer (level 2)
    async with httpx.AsyncClient(base_url=api.engine.url, headers=api.service.headers) as http:
        r = await http.post("/v1/transactions", json={
            "transaction_id": unique("tx"), "user_id": buyer, "amount_micros": 1_000_000})
        assert r.status_code == 201, r.text
    got = await take(events, 2)
    assert [p.offset for p in got] == [3, 4]
    kinds = {type(p.event) for p in got}
    assert kinds == {CommissionEarned, BalanceChanged}
    earned = next(p.event for p in got if isinstance(p.event, CommissionEarned))
    assert (earned.level, earned.amount_micros) == (2, 100_000)
    await events.aclose()


def test_purchase_reaches_the_referrers_socket(api):
    anyio.run(_watch_purchase, api)


@pytest.mark.trio
async def test_the_client_works_under_trio(api):
    await _watch_purchase(api)


# --- regions ----------------------------------------------------------------------

async def _cross_region(api, regions: list[tuple[str, str]]) -> None:
    async with httpx.AsyncClient(headers=api.service.headers) as http:
        root, buyer = api.chain(2, "region")
        token = token_for(api, root)

        async def tokens() -> str:
            return token

        # The sockets first: each region's replica connects to its region's
        # NATS as it starts, and a socket arriving before that waits for it.
        clients = {region: LiveClient(live_url(api, url), tokens) for region, url in regions}
        streams = {region: client.events() for region, client in clients.items()}
        for events in streams.values():
            assert [type(item) for item in await take(events, 1)] == [StreamReset]
        assert {region: client.connections for region, client in clients.items()} == {r: 1 for r in clients}
        for region, url in regions:
            r = await http.get(f"{url}/readyz")
            assert r.status_code == 200 and r.json()["region"] == region, r.text
        # A purchase through each region's API: the relay publishes it in the
        # home region, and both regions' sockets get it, in order.
        for n, (_, url) in enumerate(regions):
            r = await http.post(f"{url}/v1/transactions", json={
                "transaction_id": unique("tx"), "user_id": buyer, "amount_micros": 1_000_000})
            assert r.status_code == 201, r.text
            for region, events in streams.items():
                got = await take(events, 2)
                assert [p.offset for p in got] == [2 + 2 * n, 3 + 2 * n], region
                assert {type(p.event) for p in got} == {CommissionEarned, BalanceChanged}, region
        for events in streams.values():
            await events.aclose()


def test_events_reach_sockets_in_every_region(api):
    anyio.run(_cross_region, api, two_regions(api))


# --- isolation ------------------------------------------------------------------

async def _collect(client: LiveClient, into: list, stop: anyio.Event) -> None:
    async for item in client.events():
        into.append(item)
        if stop.is_set():
            return


async def _isolation(api) -> None:
    # Ids that share a prefix, differ only in case, or in a separator: each
    # user's subject token must keep them apart.
    base = unique("Iso")
    watched = api.register(base)
    lookalikes = [base.lower(), base.upper(), base + "0", base + ".x", base[:-1]]
    buyers = []
    for i, lookalike in enumerate(lookalikes):
        api.register(lookalike)
        referred = api.register(unique("isobuyer"), api.service.get(f"/v1/users/{lookalike}").json()["referral_code"])
        buyers.append(referred["user_id"])
    token = token_for(api, base)

    async def tokens() -> str:
        return token

    seen: list = []
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_collect, LiveClient(live_url(api), tokens), seen, stop)
        # The collector connected first: a socket starts at its stream's
        # head, and the blocking API calls below would hold its connect back
        # until after the fence, which it would then never see.
        with anyio.fail_after(EVENT_WAIT_S):
            while not any(isinstance(x, StreamReset) for x in seen):
                await anyio.sleep(0.01)
        # A forged second frame asking for someone else's stream closes that socket.
        ws = await WebSocketConnection.open(live_url(api))
        await ws.send('{"type":"connect","token":"%s"}' % token)
        await ws.receive()  # connected
        await ws.send('{"type":"connect","token":"%s"}' % token_for(api, lookalikes[0]))
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.receive()
        assert closed.value.code == CloseCode.BAD_FRAME
        for buyer in buyers:
            assert api.purchase(buyer, 1_000_000).status_code == 201
        # The watched user's own event comes after all of those: a fence.
        api.register(unique("isokid"), watched["referral_code"])
        with anyio.fail_after(EVENT_WAIT_S):
            while not any(isinstance(x, Publication) for x in seen):
                await anyio.sleep(0.05)
        stop.set()
        tg.cancel_scope.cancel()
    publications = [x for x in seen if isinstance(x, Publication)]
    assert len(publications) == 1 and isinstance(publications[0].event, ReferralJoined)


def test_a_user_never_gets_another_users_events(api):
    anyio.run(_isolation, api)


# --- resume -----------------------------------------------------------------------

async def _resume(api) -> None:
    root, buyer = api.chain(2, "resume")
    token = token_for(api, root)

    async def tokens() -> str:
        return token

    api.settle()
    balance = api.service.get(f"/v1/users/{root}/balance").json()
    assert balance["stream"]["offset"] == 1  # the referral of `buyer`
    for _ in range(3):  # while no client is connected
        assert api.purchase(buyer, 2_000_000).status_code == 201
    api.settle()
    client = LiveClient(live_url(api), tokens, offset=balance["stream"]["offset"], epoch=balance["stream"]["epoch"])
    events = client.events()
    got = await take(events, 6)
    assert [p.offset for p in got] == [2, 3, 4, 5, 6, 7]  # recovered: no StreamReset, no gap, no duplicate
    await events.aclose()
    # A stale epoch (another database) cannot be resumed: the client is told to reload.
    stale = LiveClient(live_url(api), tokens, offset=3, epoch="not-this-epoch")
    events = stale.events()
    assert await take(events, 1) == [StreamReset(balance["stream"]["epoch"], 7)]
    await events.aclose()
    # msgpack frames on request carry the same stream.
    packed = LiveClient(live_url(api), tokens, encoding="msgpack", offset=5, epoch=balance["stream"]["epoch"])
    events = packed.events()
    assert [p.offset for p in await take(events, 2)] == [6, 7]
    await events.aclose()


def test_reconnect_resumes_without_gap_or_duplicate(api):
    anyio.run(_resume, api)


# --- bad input ----------------------------------------------------------------------

async def _closed_with(api, first_frame: str | bytes | None, origin: str | None = None) -> ConnectionClosed:
    ws = await WebSocketConnection.open(live_url(api), origin=origin)
    with anyio.fail_after(EVENT_WAIT_S):
        with pytest.raises(ConnectionClosed) as closed:
            # The server may close before the first frame (a refused Origin): then the
            # send itself reports the close.
            if first_frame is not None:
                await ws.send(first_frame)
            while True:
                await ws.receive()
    return closed.value


def test_bad_connect_frames_close_with_a_reason(api):
    root = api.register(unique("bad"))["user_id"]
    good = token_for(api, root)
    cases = [
        ("not json", CloseCode.BAD_FRAME, "bad connect frame"),
        ('{"type":"connect","token":"%s","admin":true}' % good, CloseCode.BAD_FRAME, "unknown field"),
        ('{"type":"pong"}', CloseCode.BAD_FRAME, "first frame must be a connect frame"),
        ('{"type":"connect","token":"v4.public.AAAA"}', CloseCode.UNAUTHORIZED, "too short"),
        ('{"type":"connect","token":"%s"}' % (good[:-4] + "AAAA"), CloseCode.UNAUTHORIZED, "signature"),
        ("x" * 10_000, CloseCode.BAD_FRAME, "over"),
    ]
    for frame, code, reason in cases:
        closed = anyio.run(_closed_with, api, frame)
        assert (closed.code, reason in closed.reason) == (code, True), (frame[:40], closed.code, closed.reason)
    closed = anyio.run(_closed_with, api, '{"type":"connect","token":"%s"}' % good, "https://evil.example")
    assert closed.code == CloseCode.FORBIDDEN_ORIGIN
    # The server stays healthy: a good connection still works.
    assert api.anonymous.get("/healthz").status_code == 200


def test_only_the_live_path_is_a_socket(api):
    """The live gateway is an application of its own under /v1/live: a socket
    at any other path there closes with a reason, and HTTP there is a 404."""

    async def closed_at(path: str) -> ConnectionClosed:
        ws = await WebSocketConnection.open(live_url(api) + path)
        with anyio.fail_after(EVENT_WAIT_S), pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.receive()
        return closed.value

    closed = anyio.run(closed_at, "/elsewhere")
    assert (closed.code, closed.reason) == (CloseCode.NO_ROUTE, "no live endpoint at /v1/live/elsewhere")
    for path in ("/v1/live", "/v1/live/elsewhere"):
        r = api.anonymous.get(path)
        assert (r.status_code, r.headers["content-type"]) == (404, "application/problem+json"), path
        assert r.json()["detail"] == f"no route for {path}"
    # The socket itself still opens there.
    anyio.run(_watch_purchase, api)


def test_no_connect_frame_in_time_closes(api):
    closed = anyio.run(_closed_with, api, None)
    assert closed.code == CloseCode.AUTH_TIMEOUT


def test_expired_token_closes_the_socket(api):
    root = api.register(unique("exp"))["user_id"]
    token = token_for(api, root, ttl_s=2)

    async def run() -> None:
        ws = await WebSocketConnection.open(live_url(api))
        await ws.send('{"type":"connect","token":"%s"}' % token)
        assert '"connected"' in await ws.receive()
        with anyio.fail_after(EVENT_WAIT_S), pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.receive()
        assert closed.value.code == CloseCode.TOKEN_EXPIRED
        # And a new connection with it is refused as expired.
        again = await _closed_with(api, '{"type":"connect","token":"%s"}' % token)
        assert again.code == CloseCode.TOKEN_EXPIRED

    anyio.run(run)


def test_revoking_tokens_closes_sockets_and_refuses_the_old_tokens(api):
    root = api.register(unique("revoke"))["user_id"]
    other = api.register(unique("revoke"))["user_id"]
    old = token_for(api, root)
    bearer = lambda token: {"Authorization": f"Bearer {token}"}  # noqa: E731

    async def run() -> None:
        ws = await WebSocketConnection.open(live_url(api))
        await ws.send('{"type":"connect","token":"%s"}' % old)
        assert '"connected"' in await ws.receive()
        # Someone else cannot sign this user out; an unknown user is a 404.
        assert api.anonymous.post(f"/v1/users/{root}/tokens:revoke",
                                  headers=bearer(token_for(api, other))).status_code == 403
        assert api.service.post(f"/v1/users/{unique('nobody')}/tokens:revoke").status_code == 404
        r = api.service.post(f"/v1/users/{root}/tokens:revoke")
        assert r.status_code == 200, r.text
        assert r.json()["user_id"] == root
        with anyio.fail_after(EVENT_WAIT_S), pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.receive()
        assert (closed.value.code, "revoked" in closed.value.reason) == (CloseCode.TOKEN_EXPIRED, True)
        again = await _closed_with(api, '{"type":"connect","token":"%s"}' % old)
        assert (again.code, "revoked" in again.reason) == (CloseCode.TOKEN_EXPIRED, True)

    anyio.run(run)
    refused = api.anonymous.get(f"/v1/users/{root}/balance", headers=bearer(old))
    assert refused.status_code == 401 and "revoked" in refused.json()["detail"]
    assert refused.headers["content-type"] == "application/problem+json"
    # A token issued after the revocation works, and a user can sign themself out.
    new = token_for(api, root)
    assert api.anonymous.get(f"/v1/users/{root}/balance", headers=bearer(new)).status_code == 200
    assert api.anonymous.post(f"/v1/users/{root}/tokens:revoke", headers=bearer(new)).status_code == 200
    assert api.anonymous.get(f"/v1/users/{root}/balance", headers=bearer(new)).status_code == 401
    # The other user's tokens were never touched.
    assert api.anonymous.get(f"/v1/users/{other}/balance", headers=bearer(token_for(api, other))).status_code == 200


def test_a_client_refused_for_good_stops_reconnecting(api):
    async def bad_token() -> str:
        return "v4.public.nope"

    async def run() -> None:
        with pytest.raises(LiveStreamEnded) as ended:
            async for _ in LiveClient(live_url(api), bad_token).events():
                pass
        assert ended.value.code == CloseCode.UNAUTHORIZED

    anyio.run(run)


# --- duplicates and slow consumers ----------------------------------------------------

def _forged_batch(epoch: str, first_offset: int, events: int, pad: str = "") -> bytes:
    """A batch as the relay would publish it, for offsets no real write has used yet."""
    import datetime as dt

    from dailydoco.protocol.live import encode_event_batch, encode_events

    body = encode_events([ReferralJoined(member_id=f"forged-{i}{pad}", level=1) for i in range(events)])
    return encode_event_batch(epoch, first_offset, dt.datetime.now(dt.timezone.utc), body)


def test_the_same_event_ten_times_is_one_frame(api, servers):
    import nats

    from dailydoco.protocol.live import user_subject

    user = api.register(unique("dup"))["user_id"]
    token = token_for(api, user)

    async def tokens() -> str:
        return token

    async def run() -> None:
        events = LiveClient(live_url(api), tokens).events()
        reset = (await take(events, 1))[0]
        nc = await nats.connect(servers[1])
        for _ in range(10):
            await nc.publish(user_subject("us-east", user), _forged_batch(reset.epoch, reset.offset + 1, 1))
        await nc.publish(user_subject("us-east", user), _forged_batch(reset.epoch, reset.offset + 2, 1))
        await nc.close()
        got = await take(events, 2)
        assert [p.offset for p in got] == [reset.offset + 1, reset.offset + 2]
        with anyio.move_on_after(0.5):
            extra = await take(events, 1)
            pytest.fail(f"a duplicate came through: {extra}")
        await events.aclose()

    anyio.run(run)


def test_a_stalled_nats_delays_events_and_loses_none(api, embedded_servers):
    """The home region's NATS stalls for three seconds and more (SIGSTOP:
    connections stay open, nothing answers) while a referrer's downline
    buys. Purchases are answered 201 meanwhile (their events wait in the
    outbox, which /metrics shows), and the referrer's socket gets every
    event, in order, once NATS answers again."""
    if os.environ.get("DD_NATS_URL"):
        pytest.skip("NATS is external (DD_NATS_URL): this test stops the embedded one")
    nats_pid = embedded_servers[0].nats_pid(api.engine.config.region)
    root, _, buyer = api.chain(3, "natsstall")
    token = token_for(api, root)

    async def tokens() -> str:
        return token

    async def run() -> None:
        seen: list = []
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_collect, LiveClient(live_url(api), tokens), seen, stop)
            with anyio.fail_after(EVENT_WAIT_S):
                while not seen:
                    await anyio.sleep(0.01)
            async with httpx.AsyncClient(base_url=api.engine.url, headers=api.service.headers, timeout=60) as http:
                async def buy(seconds: float) -> None:
                    until = anyio.current_time() + seconds
                    while anyio.current_time() < until:
                        r = await http.post("/v1/transactions", json={
                            "transaction_id": unique("tx"), "user_id": buyer, "amount_micros": 1_000_000})
                        assert r.status_code == 201, r.text
                        await anyio.sleep(0.02)

                await buy(1)
                os.kill(nats_pid, signal.SIGSTOP)
                try:
                    await buy(3)
                    # What waits shows in /metrics, for an operator's alert.
                    backlog = await anyio.to_thread.run_sync(
                        api.backlog_until, lambda backlog: backlog.get("dailydoco_outbox_rows", 0) >= 1)
                    assert backlog["dailydoco_outbox_oldest_row_age_seconds"] > 0, backlog
                finally:
                    os.kill(nats_pid, signal.SIGCONT)
                await buy(1)
                # The balance's stream offset trails the ledger until the shards are credited.
                await anyio.to_thread.run_sync(api.settle)
                head = (await http.get(f"/v1/users/{root}/balance")).json()["stream"]["offset"]
            with anyio.fail_after(EVENT_WAIT_S * 2):
                while not seen or getattr(seen[-1], "offset", 0) < head:
                    await anyio.sleep(0.05)
            stop.set()
            tg.cancel_scope.cancel()
        assert isinstance(seen[0], StreamReset)
        offsets = [x.offset for x in seen[1:]]
        assert all(isinstance(x, Publication) for x in seen[1:])
        assert offsets == list(range(seen[0].offset + 1, head + 1))

    anyio.run(run)


def test_a_slow_consumer_is_closed_and_others_keep_going(api, servers):
    import socket

    import nats
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

    from dailydoco.protocol.live import LIVE_OUTBOUND_BYTES_MAX, user_subject

    slow_user = api.register(unique("slow"))["user_id"]
    root, buyer = api.chain(2, "fast")
    slow_token, fast_token = token_for(api, slow_user), token_for(api, root)

    # The slow client: a tiny receive buffer, and it does not read.
    host, port = api.engine.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    ws = WSConnection(ConnectionType.CLIENT)
    sock.sendall(ws.send(Request(host=f"{host}:{port}", target="/v1/live")))
    events: list = []
    while not any(isinstance(e, AcceptConnection) for e in events):
        ws.receive_data(sock.recv(65536))
        events.extend(ws.events())
    sock.sendall(ws.send(TextMessage(data='{"type":"connect","token":"%s"}' % slow_token)))
    while not any(isinstance(e, TextMessage) for e in events):
        ws.receive_data(sock.recv(65536))
        events.extend(ws.events())
    epoch = api.service.get(f"/v1/users/{slow_user}/balance").json()["stream"]["epoch"]

    async def flood_and_watch() -> None:
        async def tokens() -> str:
            return fast_token

        fast = LiveClient(live_url(api), tokens).events()
        await take(fast, 1)
        nc = await nats.connect(servers[1])
        offset = 1
        pad = "x" * 100
        for _ in range(120):  # ~6 MB: past the cap and the kernel's socket buffers
            await nc.publish(user_subject("us-east", slow_user), _forged_batch(epoch, offset, 400, pad))
            offset += 400
        await nc.flush()
        await nc.close()
        # Meanwhile the fast client's events still arrive.
        assert api.purchase(buyer, 1_000_000).status_code == 201
        assert len(await take(fast, 2)) == 2
        await fast.aclose()

    anyio.run(flood_and_watch)
    # Now drain the slow socket: its data ends in a close frame with the slow-consumer code.
    sock.settimeout(EVENT_WAIT_S)
    received = 0
    close = None
    while close is None:
        data = sock.recv(1 << 20)
        if not data:
            break
        received += len(data)
        ws.receive_data(data)
        close = next((e for e in ws.events() if isinstance(e, CloseConnection)), None)
    sock.close()
    assert close is not None and close.code == CloseCode.SLOW_CONSUMER, (received, close)
    assert received < 6_000_000  # it was cut off, not sent everything
    assert LIVE_OUTBOUND_BYTES_MAX < 6_000_000


def test_watch_command_prints_balance_then_events(api, state_dir):
    import io

    from dailydoco.cluster.watch import watch

    root, buyer = api.chain(2, "watch")
    out = io.StringIO()

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            async def buy_when_watching() -> None:
                while "balance" not in out.getvalue():
                    await anyio.sleep(0.05)
                await anyio.sleep(0.3)
                assert api.purchase(buyer, 3_000_000).status_code == 201

            tg.start_soon(buy_when_watching)
            assert await watch(api.engine.url, root, None, state_dir, "json", out, max_events=2) == 0

    anyio.run(run)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("balance []") and "(stream offset 1)" in lines[0]
    assert "commission.earned" in lines[1] and '"amount_micros": 600000' in lines[1]
    assert "balance.changed" in lines[2]
