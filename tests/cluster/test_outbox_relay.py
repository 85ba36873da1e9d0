"""The relay under concurrent writes, against the session's Postgres and NATS:
every outbox row goes on the wire once (rounds overlap, and a row must not be
read again while its delete is settling), each user's offsets arrive in order
with no gap, and the outbox ends empty."""

from __future__ import annotations

import asyncio
import contextlib
import os

import asyncpg

from dailydoco.actors.commission_core import CommissionEngine
from dailydoco.actors.outbox_relay import OutboxRelay
from dailydoco.actors.registration import register_user
from dailydoco.cluster import nats_io
from dailydoco.protocol import RegisterUserRequest, TransactionRequest
from dailydoco.protocol.live import EVENT_SUBJECT_ROOT, CommissionEarned, decode_event_batch, user_subject
from dailydoco.storage.ledger import Ledger
from dailydoco.storage.outbox import OUTBOX_NOTIFY_CHANNEL
from dailydoco.storage.pool import open_pool

from ..conftest import migrated_database
from .test_regions import NoShards, await_event_stream

REGION = "relay-test"
MIDDLE_USERS = 4  # root <- middle users <- buyers: each purchase writes rows for two users
BUYERS_PER_MIDDLE = 5
PURCHASES_PER_BUYER = 15
DELIVERY_TIMEOUT_S = 60.0


async def _relay_under_load(nats_url: str, database_url: str) -> None:
    pool = await open_pool(database_url, max_size=6)
    ledger = Ledger(pool, 3600)
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
    relay = OutboxRelay(pool, nc, REGION)
    listener = await asyncpg.connect(database_url)
    await listener.add_listener(OUTBOX_NOTIFY_CHANNEL, relay.wake)
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
        await listener.close()
        await nc.close()
        await pool.close()


def test_every_outbox_row_goes_on_the_wire_once_in_order(servers):
    database_url = asyncio.run(migrated_database(servers[0], f"dailydoco_relay_{os.getpid()}"))
    asyncio.run(_relay_under_load(servers[1], database_url))
