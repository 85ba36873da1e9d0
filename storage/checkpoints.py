"""Consistent reads of everything a shard's memory is made of, and checkpoints.

A checkpoint stores one virtual shard's statistics and balances as of a
Postgres snapshot. `read_since_checkpoints` returns, in one REPEATABLE READ
snapshot, the checkpoints plus every row written after them, so that
checkpoint + rows = the state at that snapshot, exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import asyncpg

from .snapshots import Snapshot


class Checkpoint(NamedTuple):
    vshard: int
    snapshot: Snapshot
    state: bytes | None  # msgpack of {user_id: UserStats wire}; None: nothing yet


class ShardRows(NamedTuple):
    snapshot: Snapshot  # the snapshot every other field was read at
    checkpoints: dict[int, Checkpoint]
    users: list[asyncpg.Record]  # full records of the requested vshards' users
    joins: list[asyncpg.Record]  # users written after the oldest checkpoint: (upline, xid)
    purchases: list[asyncpg.Record]  # (upline, currency, amount_micros, xid)
    refunds: list[asyncpg.Record]  # (upline, currency, amount_micros, xid)
    entries: list[asyncpg.Record]  # (beneficiary_id, vshard, currency, created_status, amount_micros, xid)
    transitions: list[asyncpg.Record]  # (beneficiary_id, vshard, currency, from_status, to_status, amount_micros, xid)
    stream_epoch: str
    stream_offsets: dict[str, int]  # the requested vshards' users' last live-event offsets (with_users only)


async def read_since_checkpoints(pool: asyncpg.Pool, vshards: list[int], with_users: bool) -> ShardRows:
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        snapshot = Snapshot.parse(await conn.fetchval("SELECT pg_current_snapshot()::text"))
        checkpoints = {v: Checkpoint(v, Snapshot.empty(), None) for v in vshards}
        for r in await conn.fetch(
            "SELECT vshard, snapshot, state FROM shard_checkpoints WHERE vshard = ANY($1::smallint[])", vshards
        ):
            checkpoints[r["vshard"]] = Checkpoint(r["vshard"], Snapshot.parse(r["snapshot"]), bytes(r["state"]))
        xmin = min(c.snapshot.xmin for c in checkpoints.values())
        users, stream_offsets = [], {}
        if with_users:
            users = await conn.fetch(
                "SELECT user_id, referral_code, referrer_id, upline, created_at, body_hash FROM users"
                " WHERE vshard = ANY($1::smallint[])",
                vshards,
            )
            # Same snapshot as the ledger rows: these offsets cover exactly their events.
            stream_offsets = dict(await conn.fetch(
                "SELECT user_id, last_seq FROM event_streams WHERE vshard = ANY($1::smallint[])", vshards))
        stream_epoch = await conn.fetchval("SELECT epoch FROM event_epoch")
        # xid >= xmin bounds the scan by index; visibility against each
        # vshard's own checkpoint is decided row by row by the caller.
        joins = await conn.fetch(
            "SELECT upline, xid FROM users WHERE xid >= $1::bigint AND cardinality(upline) > 0",
            xmin,
        )
        purchases = await conn.fetch(
            "SELECT u.upline, t.currency, t.amount_micros, t.xid FROM transactions t"
            " JOIN users u USING (user_id) WHERE t.xid >= $1::bigint AND cardinality(u.upline) > 0",
            xmin,
        )
        refunds = await conn.fetch(
            "SELECT u.upline, t.currency, r.amount_micros, r.xid FROM refunds r"
            " JOIN transactions t USING (transaction_id) JOIN users u ON u.user_id = t.user_id"
            " WHERE r.xid >= $1::bigint AND cardinality(u.upline) > 0",
            xmin,
        )
        entries = await conn.fetch(
            "SELECT beneficiary_id, vshard, currency, created_status, amount_micros, xid"
            " FROM commission_ledger WHERE xid >= $1::bigint AND vshard = ANY($2::smallint[])",
            xmin, vshards,
        )
        transitions = await conn.fetch(
            "SELECT beneficiary_id, vshard, currency, from_status, to_status, amount_micros, xid"
            " FROM ledger_transitions WHERE xid >= $1::bigint AND vshard = ANY($2::smallint[])",
            xmin, vshards,
        )
    return ShardRows(snapshot, checkpoints, users, joins, purchases, refunds, entries, transitions, stream_epoch,
                     stream_offsets)


async def write_checkpoints(pool: asyncpg.Pool, snapshot: Snapshot, states: dict[int, bytes]) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.executemany(
            "INSERT INTO shard_checkpoints (vshard, snapshot, state) VALUES ($1, $2, $3)"
            " ON CONFLICT (vshard) DO UPDATE SET snapshot = excluded.snapshot, state = excluded.state,"
            " created_at = now()",
            [(v, snapshot.text(), s) for v, s in states.items()],
        )
