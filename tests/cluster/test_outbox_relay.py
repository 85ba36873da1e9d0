"""Live events under concurrent writes, against the session's Postgres and
NATS, published by the relay alone and as the engine runs (each writer
publishes its own rows, the relay takes what is left): every outbox row goes
on the wire once (relay rounds overlap, and a row must not be read again
while its delete is settling), each user's offsets arrive in order with no
gap, and the outbox ends empty. And the relay leaves a fresh row to its
writer."""

from __future__ import annotations

import asyncio
import contextlib
import os


import pytest

from dailydoco.actors.commission_core import CommissionEngine
from dailydoco.actors.live_publisher import LivePublisher
from dailydoco.actors.outbox_relay import OutboxRelay
from dailydoco.actors.registration import register_user
from dailydoco.cluster import nats_io
from dailydoco.protocol import RegisterUserRequest, TransactionRequest
from dailydoco.protocol.live import EVENT_SUBJECT_ROOT, CommissionEarned, decode_event_batch, user_subject
from dailydoco.storage.ledger import Ledger
from dailydoco.storage.pool import open_pool

from ..conftest import migrated_database
from .test_regions import NoShards, await_event_stream

REGION = "relay-test"
MIDDLE_USERS = 4  # root <- middle users <- buyers: each purchase writes rows for two users
BUYERS_PER_MIDDLE = 5
PURCHASES_PER_BUYER = 15
DELIVERY_TIMEOUT_S = 60.0


async def _under_load(nats_url: str, database_url: str, writer_publishes: bool) -> None:
    pool = await open_pool(database_url, max_size=6)
    live = None
    if writer_publishes:
        live = LivePublisher(pool, nats_url, REGION, "test-writer")
        live.start()
        await asyncio.wait_for(live.ready.wait(), DELIVERY_TIMEOUT_S)
    ledger = Ledger(pool, 3600, live and live.publish)
    router = NoShards()
    chain = CommissionEngine(ledger, router)
    nc = await nats_io.connect(nats_url, "test-relay")
    await await_event_stream(nc)
    wire: list[tuple[str, int, int]] = []  # (subject, first offset, last offset), as published

    commissions: dict[str, int] = {}  # per subject

    async def on_message(msg) -> None:
        batch = decode_event_batch(msg.data)
        wire.append((msg.subject, batch.first_offset, batch.last_offset))
        earned = sum(isinstance(e, CommissionEarned) for e in batch.events)
        commissions[msg.subject] = commissions.get(msg.subject, 0) + earned

    await nc.subscribe(f"{EVENT_SUBJECT_ROOT}.{REGION}.>", cb=on_message)  # this test's region only
    # With a publishing writer, the grace is far past its ack and delete: the
    # relay has nothing to do. Without one it publishes each row at once.
    relay = OutboxRelay(pool, nc, REGION, grace_s=5.0 if writer_publishes else 0.0)
    relay_task = asyncio.create_task(relay.run())
    try:
        root = await register_user(ledger, router, RegisterUserRequest(user_id="relay-root"))
        middles = [await register_user(ledger, router, RegisterUserRequest(
            user_id=f"relay-middle-{i}", referral_code=root.referral_code)) for i in range(MIDDLE_USERS)]
        buyers = [await register_user(ledger, router, RegisterUserRequest(
            user_id=f"relay-buyer-{i}-{j}", referral_code=m.referral_code))
            for i, m in enumerate(middles) for j in range(BUYERS_PER_MIDDLE)]

        async def buy(buyer_id: str) -> None:
            for k in range(PURCHASES_PER_BUYER):
                [outcome] = await chain.submit([TransactionRequest(
                    transaction_id=f"relay-{buyer_id}-{k}", user_id=buyer_id, amount_micros=1_000_000)])
                assert outcome.error is None

        # Concurrent buyers: many small commits, so relay rounds overlap their settling.
        await asyncio.gather(*(buy(b.user_id) for b in buyers))
        deadline = asyncio.get_running_loop().time() + DELIVERY_TIMEOUT_S
        while await pool.fetchval("SELECT count(*) FROM outbox") and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert await pool.fetchval("SELECT count(*) FROM outbox") == 0, "the outbox did not drain"
        await nc.flush()
        await asyncio.sleep(0.2)  # the last messages reach our own subscription

        assert len(wire) == len(set(wire)), "a row went on the wire twice"
        heads = dict(await pool.fetch("SELECT user_id, last_seq FROM event_streams"))
        if writer_publishes:
            assert (live.published_rows, relay.relayed_rows) == (len(wire), 0)
        else:
            assert relay.relayed_rows == len(wire)
        per_subject: dict[str, list[tuple[int, int]]] = {}
        for subject, first, last in wire:
            per_subject.setdefault(subject, []).append((first, last))
        assert len(per_subject) == len(heads)  # every user with events, and no one else
        for ranges in per_subject.values():
            # In order, no gap, no overlap, from offset 1 to the stream's head.
            assert ranges[0][0] == 1
            for (_, last), (first, _) in zip(ranges, ranges[1:]):
                assert first == last + 1
        assert sorted(r[-1][1] for r in per_subject.values()) == sorted(heads.values())
        # Each purchase pays the root and one middle user: one commission event each, once.
        assert commissions[user_subject(REGION, root.user_id)] == len(buyers) * PURCHASES_PER_BUYER
        for m in middles:
            assert commissions[user_subject(REGION, m.user_id)] == BUYERS_PER_MIDDLE * PURCHASES_PER_BUYER
    finally:
        relay_task.cancel()
        with contextlib.suppress(BaseException):
            await relay_task
        if live is not None:
            await live.close()
        await nc.close()
        await pool.close()


@pytest.mark.parametrize("writer_publishes", [False, True], ids=["relay-alone", "writer-and-relay"])
def test_every_outbox_row_goes_on_the_wire_once_in_order(servers, writer_publishes):
    database_url = asyncio.run(migrated_database(servers[0], f"dailydoco_relay_{int(writer_publishes)}_{os.getpid()}"))
    asyncio.run(_under_load(servers[1], database_url, writer_publishes))


async def _fresh_rows_wait(nats_url: str, database_url: str) -> None:
    pool = await open_pool(database_url, max_size=2)
    nc = await nats_io.connect(nats_url, "test-relay-grace")
    await await_event_stream(nc)
    grace_s = 0.5
    relay = OutboxRelay(pool, nc, REGION, grace_s=grace_s)
    try:
        ledger, router = Ledger(pool, 3600), NoShards()  # a writer with no publisher (or a dead one)
        root = await register_user(ledger, router, RegisterUserRequest(user_id="grace-root"))
        await register_user(ledger, router, RegisterUserRequest(user_id="grace-member",
                                                                referral_code=root.referral_code))
        written = asyncio.get_running_loop().time()
        assert await relay.relay_once() == 0, "the relay took a row its writer may be publishing"
        await asyncio.sleep(grace_s - (asyncio.get_running_loop().time() - written) + 0.05)
        assert await relay.relay_once() == 1  # the root's referral event, left by its writer
    finally:
        await nc.close()
        await pool.close()


def test_the_relay_leaves_a_fresh_row_to_its_writer(servers):
    database_url = asyncio.run(migrated_database(servers[0], f"dailydoco_relay_grace_{os.getpid()}"))
    asyncio.run(_fresh_rows_wait(servers[1], database_url))
