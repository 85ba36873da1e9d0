"""The transactional outbox: live events written with the rows that cause them.

`OutboxWriter` collects one write's events per user and, inside that write's
transaction, takes each user's next offsets and appends one outbox row per
user. The relay reads committed rows (`pending_batches`) and deletes them once
NATS has them (`delete_relayed`). Balance events come from the write's own
deltas, so what a user's stream says and what their shard applies are the
same numbers.
"""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple

import asyncpg

from dailydoco.protocol.live import NETWORK_MILESTONES, BalanceChanged, LiveEvent, NetworkMilestone, encode_events

from .deltas import APPROVED, PAID, PENDING, DeltaSet
from .sharding import vshard_of

OUTBOX_NOTIFY_CHANNEL = "dd_outbox"  # NOTIFY at commit wakes the relay at once


class OutboxWriter:
    """Events of one ledger write, keyed by the user whose stream they join."""

    __slots__ = ("_events",)

    def __init__(self):
        self._events: dict[str, list[LiveEvent]] = {}

    def add(self, user_id: str, event: LiveEvent) -> None:
        events = self._events.get(user_id)
        if events is None:
            events = self._events[user_id] = []
        events.append(event)

    async def count_joins(self, conn: asyncpg.Connection, upline: tuple[str, ...]) -> None:
        """A new member in each ancestor's network: a milestone event when a size is reached."""
        rows = await conn.fetch(
            "INSERT INTO event_streams (user_id, vshard, last_seq, network_size)"
            " SELECT u, v, 0, 1 FROM unnest($1::text[], $2::smallint[]) AS t(u, v) ORDER BY u"
            " ON CONFLICT (user_id) DO UPDATE SET network_size = event_streams.network_size + 1"
            " RETURNING user_id, network_size",
            list(upline), [vshard_of(a) for a in upline],
        )
        for r in rows:
            if r["network_size"] in NETWORK_MILESTONES:
                self.add(r["user_id"], NetworkMilestone(network_size=r["network_size"]))

    async def flush(self, conn: asyncpg.Connection, now: dt.datetime, deltas: DeltaSet) -> None:
        """Append the events, and balance changes from `deltas`, to the outbox.

        Must run last in the write's transaction: it locks each user's stream
        row until commit, in user id order like every writer.
        """
        for delta in deltas.by_route.values():
            for (user_id, currency), buckets in delta.balances.items():
                if any(buckets):
                    self.add(user_id, BalanceChanged(
                        currency=currency, pending_delta_micros=buckets[PENDING],
                        approved_delta_micros=buckets[APPROVED], paid_delta_micros=buckets[PAID]))
        if not self._events:
            return
        users = sorted(self._events)
        counts = [len(self._events[u]) for u in users]
        # Offsets, outbox rows and the relay's wake-up in one statement: one
        # round trip where three were (the write holds its locks meanwhile).
        written_users, first_seqs = await conn.fetchrow(
            "WITH streams AS (INSERT INTO event_streams (user_id, vshard, last_seq)"
            " SELECT * FROM unnest($1::text[], $2::smallint[], $3::bigint[])"
            " ON CONFLICT (user_id) DO UPDATE SET last_seq = event_streams.last_seq + excluded.last_seq"
            " RETURNING user_id, last_seq),"
            " rows AS (INSERT INTO outbox (user_id, first_seq, events, created_at)"
            " SELECT s.user_id, s.last_seq - b.n + 1, b.events, $5::timestamptz"
            " FROM streams s JOIN unnest($1::text[], $3::bigint[], $4::bytea[]) AS b(user_id, n, events) USING (user_id)"
            " ORDER BY s.user_id RETURNING user_id, first_seq)"
            # An aggregate: one row, so one NOTIFY, whatever the number of users.
            f" SELECT array_agg(user_id), array_agg(first_seq) FROM rows, pg_notify('{OUTBOX_NOTIFY_CHANNEL}', '')",
            users, [vshard_of(u) for u in users], counts, [encode_events(self._events[u]) for u in users], now,
        )
        first_by_user = dict(zip(written_users, first_seqs, strict=True))
        for user_id, count in zip(users, counts, strict=True):
            first = first_by_user[user_id]
            deltas.for_user(user_id).event_seqs[user_id] = (first, first + count - 1)


# --- the relay's side -------------------------------------------------------------


class OutboxRow(NamedTuple):
    outbox_id: int
    user_id: str
    first_seq: int
    events: bytes
    created_at: dt.datetime


async def stream_epoch(pool: asyncpg.Pool) -> str:
    return await pool.fetchval("SELECT epoch FROM event_epoch")


async def pending_batches(pool: asyncpg.Pool, limit: int) -> list[OutboxRow]:
    """Committed outbox rows, oldest first. A user's rows are in offset order:
    a later offset's writer waited for the earlier one's commit."""
    rows = await pool.fetch(
        "SELECT outbox_id, user_id, first_seq, events, created_at FROM outbox ORDER BY outbox_id LIMIT $1", limit)
    return [OutboxRow(r[0], r[1], r[2], bytes(r[3]), r[4]) for r in rows]


async def delete_relayed(pool: asyncpg.Pool, outbox_ids: list[int]) -> None:
    await pool.execute("DELETE FROM outbox WHERE outbox_id = ANY($1::bigint[])", outbox_ids)


async def stream_positions(pool: asyncpg.Pool, user_ids: list[str]) -> dict[str, int]:
    """The last offset given out per user (0: no event yet)."""
    rows = await pool.fetch("SELECT user_id, last_seq FROM event_streams WHERE user_id = ANY($1::text[])", user_ids)
    found = dict(rows)
    return {u: found.get(u, 0) for u in user_ids}
