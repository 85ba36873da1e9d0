"""StreamPublisher against real nats-servers: a round is stored once
JetStream holds each of its rows (published again, they are kept once);
rows no stream takes are refused at once, not after the timeout; acks that
do not come in time fail the round and free its room, and when they come
late they are ignored and publishing goes on."""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import uuid

import pytest

from dailydoco.actors.live_publisher import StreamPublisher, StreamRefused
from dailydoco.cluster import nats_io
from dailydoco.cluster.embedded import _nats_server_bin, free_port
from dailydoco.protocol.live import EVENT_STREAM_NAME, EVENT_SUBJECT_ROOT, decode_event_batch, encode_events, user_subject
from dailydoco.storage.outbox import OutboxRow

from ..cluster.test_regions import await_event_stream
from ..tcp_faults import HoldingProxy

ROWS = 40
ACK_WAIT_S = 10.0  # a round on the session's server is acknowledged well within this
LATE_ACK_TIMEOUT_S = 1.0


def _rows(users: list[str], first_seq: int = 1) -> list[OutboxRow]:
    at = dt.datetime.now(dt.timezone.utc)
    return [OutboxRow(outbox_id=i, user_id=u, first_seq=first_seq, events=encode_events([]), created_at=at)
            for i, u in enumerate(users)]


async def _stored_once(url: str) -> None:
    nc = await nats_io.connect(url, "publisher-test")
    await await_event_stream(nc)
    region = f"pub-{uuid.uuid4().hex[:8]}"  # this test's own subjects
    publisher = StreamPublisher(nc, region, pending_max=ROWS)
    users = [f"user-{i}" for i in range(ROWS)]
    try:
        for _ in range(2):  # the second round repeats every Nats-Msg-Id
            await publisher.stored(await publisher.publish("epoch-1", _rows(users, first_seq=7)), ACK_WAIT_S)
        js = nc.jetstream()
        info = await js.stream_info(EVENT_STREAM_NAME, subjects_filter=f"{EVENT_SUBJECT_ROOT}.{region}.>")
        assert info.state.subjects == {user_subject(region, u): 1 for u in users}
        last = await js.get_last_msg(EVENT_STREAM_NAME, user_subject(region, users[3]))
        assert decode_event_batch(last.data).first_offset == 7
        assert last.headers["Nats-Msg-Id"].startswith("epoch-1.") and last.headers["Nats-Msg-Id"].endswith(".7")
    finally:
        await nc.close()


def test_a_round_is_stored_once_jetstream_holds_every_row(servers):
    asyncio.run(_stored_once(servers[1]))


async def _refused(url: str) -> None:
    nc = await nats_io.connect(url, "publisher-test")
    publisher = StreamPublisher(nc, "nowhere", pending_max=ROWS)
    try:
        published = await publisher.publish("epoch-1", _rows(["a", "b"]))
        started = asyncio.get_running_loop().time()
        with pytest.raises(StreamRefused):
            await publisher.stored(published, ACK_WAIT_S)
        assert asyncio.get_running_loop().time() - started < ACK_WAIT_S / 2
    finally:
        await nc.close()


def test_rows_no_stream_takes_are_refused_at_once():
    # A server of its own, without JetStream: no stream answers its subjects.
    port = free_port()
    server = subprocess.Popen([_nats_server_bin(), "-a", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        asyncio.run(_refused(f"nats://127.0.0.1:{port}"))
    finally:
        server.terminate()
        server.wait()


async def _late_acks(url: str) -> None:
    proxy = HoldingProxy(url)
    await proxy.start()
    nc = await nats_io.connect(proxy.url, "publisher-test")
    await await_event_stream(nc)
    region = f"pub-{uuid.uuid4().hex[:8]}"
    publisher = StreamPublisher(nc, region, pending_max=ROWS)
    users = [f"user-{i}" for i in range(ROWS)]
    try:
        await publisher.stored(await publisher.publish("epoch-1", _rows(users, 1)), ACK_WAIT_S)
        proxy.hold()
        # A full round (pending_max rows) that is never acknowledged in time.
        held = await publisher.publish("epoch-1", _rows(users, 2))
        with pytest.raises(TimeoutError):
            await publisher.stored(held, LATE_ACK_TIMEOUT_S)
        # Given up, the round leaves room: the next one publishes at once, though no ack came.
        next_round = await asyncio.wait_for(publisher.publish("epoch-1", _rows(users, 3)), LATE_ACK_TIMEOUT_S)
        await proxy.release()  # the given-up round's acks come now, and are ignored
        await publisher.stored(next_round, ACK_WAIT_S)
        last = await nc.jetstream().get_last_msg(EVENT_STREAM_NAME, user_subject(region, users[0]))
        assert decode_event_batch(last.data).first_offset == 3
    finally:
        await nc.close()
        await proxy.close()


def test_acks_that_come_too_late_fail_their_round_and_publishing_goes_on(servers):
    asyncio.run(_late_acks(servers[1]))
