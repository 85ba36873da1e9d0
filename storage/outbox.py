"""The transactional outbox: live events written with the rows that cause them.

`OutboxWriter` collects one write's events per user and, inside that write's
transaction, takes each user's next offsets and appends one outbox row per
user; it keeps the rows it appended (`appended`), which the writer's process
publishes once the write commits (actors/live_publisher.py). Rows that are
still here a while later, their publisher gone or NATS down, the relay
publishes (`pending_batches`); either deletes a row once NATS holds it
(`delete_relayed`). Balance events come from the write's own deltas, so what
a user's stream says and what their shard applies are the same numbers.
"""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple

import asyncpg

from dailydoco.protocol.live import NETWORK_MILESTONES, BalanceChanged, LiveEvent, NetworkMilestone, encode_events

from .deltas import APPROVED, PAID, PENDING, DeltaSet
from .sharding import vshard_of


class OutboxRow(NamedTuple):
    outbox_id: int
    user_id: str
    first_seq: int
    events: bytes  # msgpack, as encode_events wrote them
    created_at: dt.datetime


class OutboxRows(NamedTuple):
    users: list[str]
    vshards: list[int]
    counts: list[int]
    events: list[bytes]  # msgpack, one list of events per user

    def params(self) -> tuple:
        return self.users, self.vshards, self.counts, self.events


class OutboxWriter:
    """Events of one ledger write, keyed by the user whose stream they join."""

    __slots__ = ("_events", "appended")

    def __init__(self):
        self._events: dict[str, list[LiveEvent]] = {}
        # The rows this write appended (by `record_appended`): live once it commits.
        self.appended: list[OutboxRow] = []

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

    def rows(self, deltas: DeltaSet) -> OutboxRows:
        """This write's outbox rows, one per user in user id order, with the
        balance changes in `deltas` added: call once, after the last change."""
        for delta in deltas.by_route.values():
            for (user_id, currency), buckets in delta.balances.items():
                if any(buckets):
                    self.add(user_id, BalanceChanged(
                        currency=currency, pending_delta_micros=buckets[PENDING],
                        approved_delta_micros=buckets[APPROVED], paid_delta_micros=buckets[PAID]))
        users = sorted(self._events)
        return OutboxRows(users, [vshard_of(u) for u in users], [len(self._events[u]) for u in users],
                          [encode_events(self._events[u]) for u in users])

    def record_appended(self, deltas: DeltaSet, rows: OutboxRows, created_at: dt.datetime,
                        appended: tuple[list[str] | None, list[int] | None, list[int] | None]) -> None:
        """Take what `APPENDED_SELECT` returned: tell the shards each user's new
        last offset, and keep the rows for publishing."""
        written_users, first_seqs, outbox_ids = appended
        first_by_user = dict(zip(written_users or (), first_seqs or (), strict=True))
        id_by_user = dict(zip(written_users or (), outbox_ids or (), strict=True))
        for user_id, count, events in zip(rows.users, rows.counts, rows.events, strict=True):
            first = first_by_user[user_id]
            deltas.for_user(user_id).event_seqs[user_id] = (first, first + count - 1)
            self.appended.append(OutboxRow(id_by_user[user_id], user_id, first, events, created_at))
        self.appended.sort()  # outbox order, as the relay reads it

    async def flush(self, conn: asyncpg.Connection, now: dt.datetime, deltas: DeltaSet) -> None:
        """Append the events, and balance changes from `deltas`, to the outbox.

        Must run last in the write's transaction: it locks each user's stream
        row until commit, in user id order like every writer.
        """
        rows = self.rows(deltas)
        if not rows.users:
            return
        appended = await conn.fetchrow(
            "WITH " + append_ctes(1, "$5::timestamptz") + " " + APPENDED_SELECT, *rows.params(), now)
        self.record_appended(deltas, rows, now, tuple(appended))


def append_ctes(first_param: int, created_at: str, only_if: str = "true") -> str:
    """CTEs `streams` and `outbox_rows`: take each user's next offsets and
    append their rows, from OutboxRows.params() bound at $first_param on.
    Offsets and rows go in one statement: one round trip, while the write
    holds its locks.

    `only_if` is evaluated before the first stream row is locked: a condition
    on the statement's other CTEs makes them run first, so the hot stream
    rows (the top of a referral tree is in every purchase's upline) stay
    locked only from here to commit."""
    users, vshards, counts, events = (f"${first_param + k}" for k in range(4))
    return (
        f"streams AS (INSERT INTO event_streams (user_id, vshard, last_seq)"
        f" SELECT * FROM unnest({users}::text[], {vshards}::smallint[], {counts}::bigint[]) WHERE {only_if}"
        " ON CONFLICT (user_id) DO UPDATE SET last_seq = event_streams.last_seq + excluded.last_seq"
        " RETURNING user_id, last_seq),"
        " outbox_rows AS (INSERT INTO outbox (user_id, first_seq, events, created_at)"
        f" SELECT s.user_id, s.last_seq - b.n + 1, b.events, {created_at}"
        f" FROM streams s JOIN unnest({users}::text[], {counts}::bigint[], {events}::bytea[]) AS b(user_id, n, events)"
        " USING (user_id) ORDER BY s.user_id RETURNING user_id, first_seq, outbox_id)"
    )


# The appended users, their first offsets and their rows' ids, as one row
# (NULLs when nothing was appended), for OutboxWriter.record_appended.
APPENDED_SELECT = "SELECT array_agg(user_id), array_agg(first_seq), array_agg(outbox_id) FROM outbox_rows"


# --- the relay's side -------------------------------------------------------------


async def stream_epoch(pool: asyncpg.Pool) -> str:
    return await pool.fetchval("SELECT epoch FROM event_epoch")


async def pending_batches(pool: asyncpg.Pool, limit: int, waited_s: float = 0.0) -> list[OutboxRow]:
    """Committed outbox rows written at least `waited_s` ago (by the database's
    clock), oldest first. A user's rows are in offset order: a later offset's
    writer waited for the earlier one's commit."""
    rows = await pool.fetch(
        "SELECT outbox_id, user_id, first_seq, events, created_at FROM outbox"
        " WHERE written_at <= clock_timestamp() - make_interval(secs => $2) ORDER BY outbox_id LIMIT $1",
        limit, waited_s)
    return [OutboxRow(r[0], r[1], r[2], bytes(r[3]), r[4]) for r in rows]


# A backlog is counted up to this many rows: enough to alert on, and a scrape
# costs Postgres no more than a scan of these however far NATS has fallen behind.
BACKLOG_COUNT_MAX = 100_000


async def backlog(pool: asyncpg.Pool, count_max: int = BACKLOG_COUNT_MAX) -> tuple[int, float]:
    """Rows written and not yet published (up to `count_max`), and how
    long ago (by the database's clock) the first of them was written: 0.0
    with none. The first by id, found by the primary key: ids are given out
    at insert, as `written_at` is."""
    rows, oldest_age_s = await pool.fetchrow(
        "SELECT (SELECT count(*) FROM (SELECT FROM outbox LIMIT $1) AS counted),"
        " coalesce(extract(epoch FROM clock_timestamp()"
        " - (SELECT written_at FROM outbox ORDER BY outbox_id LIMIT 1)), 0)::float8", count_max)
    return rows, oldest_age_s


async def delete_relayed(pool: asyncpg.Pool, outbox_ids: list[int]) -> None:
    await pool.execute("DELETE FROM outbox WHERE outbox_id = ANY($1::bigint[])", outbox_ids)


async def stream_positions(pool: asyncpg.Pool, user_ids: list[str]) -> dict[str, int]:
    """The last offset given out per user (0: no event yet)."""
    rows = await pool.fetch("SELECT user_id, last_seq FROM event_streams WHERE user_id = ANY($1::text[])", user_ids)
    found = dict(rows)
    return {u: found.get(u, 0) for u in user_ids}
