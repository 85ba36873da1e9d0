"""Consistent reads of everything a shard's memory is made of, and checkpoints.

A checkpoint stores one virtual shard's statistics and balances as of a
Postgres snapshot. `read_since_checkpoints` returns, in one REPEATABLE READ
snapshot, the checkpoints plus what was written after them, so that
checkpoint + changes = the state at that snapshot, exactly.

The changes come summed by Postgres (per user, level, currency, status), not
row by row: a checkpoint after a busy half minute folds millions of ledger
rows, and summing them where they lie costs a fraction of shipping each one
to Python and adding it there. What a row was written after is decided by
`pg_visible_in_snapshot`, the rule `Snapshot.sees` mirrors.
"""

from __future__ import annotations

from typing import NamedTuple

import asyncpg

from .pool import connection
from .sharding import vshard_of
from .snapshots import Snapshot


class Checkpoint(NamedTuple):
    vshard: int
    snapshot: Snapshot
    state: bytes | None  # msgpack of {user_id: UserStats wire}; None: nothing yet


class ShardRows(NamedTuple):
    """What changed in the requested vshards after each one's checkpoint, summed."""

    snapshot: Snapshot  # the snapshot every other field was read at
    checkpoints: dict[int, Checkpoint]
    users: list[asyncpg.Record]  # full records of the requested vshards' users
    joins: list[tuple[str, int, int]]  # (ancestor, level, members who joined there)
    revenue: list[tuple[str, int, str, int]]  # (ancestor, level, currency, purchases less refunds)
    entries: list[tuple[str, str, str, int]]  # (beneficiary, currency, created_status, micros)
    transitions: list[tuple[str, str, str, str, int]]  # (beneficiary, currency, from, to, micros)
    stream_epoch: str
    stream_offsets: dict[str, int]  # the requested vshards' users' last live-event offsets (with_users only)


# Rows of `alias` written after the checkpoint at snapshot $2 (xmin $1): the
# xid bound lets the xid indexes narrow the scan, the function decides.
def _after(alias: str) -> str:
    return f"{alias}.xid >= $1::bigint AND NOT pg_visible_in_snapshot({alias}.xid::text::xid8, $2::text::pg_snapshot)"


# Summed by ancestor, whose vshard only Python computes (vshard_of): filtered after.
_JOINS_SQL = (
    "SELECT a.ancestor, a.level::int, count(*) FROM users u, unnest(u.upline) WITH ORDINALITY AS a(ancestor, level)"
    f" WHERE {_after('u')} GROUP BY 1, 2"
)
_REVENUE_SQL = (
    "SELECT a.ancestor, a.level::int, p.currency, sum(p.micros) FROM ("
    f" SELECT t.user_id, t.currency, t.amount_micros AS micros FROM transactions t WHERE {_after('t')}"
    " UNION ALL"
    " SELECT t.user_id, t.currency, -r.amount_micros FROM refunds r JOIN transactions t USING (transaction_id)"
    f" WHERE {_after('r')}"
    ") p JOIN users u USING (user_id), unnest(u.upline) WITH ORDINALITY AS a(ancestor, level) GROUP BY 1, 2, 3"
)
_ENTRIES_SQL = (
    "SELECT l.beneficiary_id, l.currency, l.created_status, sum(l.amount_micros) FROM commission_ledger l"
    f" WHERE {_after('l')} AND l.vshard = ANY($3::smallint[]) GROUP BY 1, 2, 3"
)
_TRANSITIONS_SQL = (
    "SELECT t.beneficiary_id, t.currency, t.from_status, t.to_status, sum(t.amount_micros) FROM ledger_transitions t"
    f" WHERE {_after('t')} AND t.vshard = ANY($3::smallint[]) GROUP BY 1, 2, 3, 4"
)
# The same, of one beneficiary: what one user's balance is made of.
_ENTRIES_OF_ONE_SQL = _ENTRIES_SQL.replace(" GROUP BY", " AND l.beneficiary_id = $4 GROUP BY")
_TRANSITIONS_OF_ONE_SQL = _TRANSITIONS_SQL.replace(" GROUP BY", " AND t.beneficiary_id = $4 GROUP BY")


async def read_since_checkpoints(pool: asyncpg.Pool, vshards: list[int], with_users: bool,
                                 balance_of: str | None = None) -> ShardRows:
    """`balance_of`: only what that one user's balance is made of (their
    record and live-event offset, their entries and transitions), no
    network statistics: what a read answers from when it cannot ask the
    user's shard (recovery.user_state_from_ledger). `vshards` is then theirs.

    A shard's recovery may wait for its one connection, and so waits as long
    as it takes; a failed connection is closed (storage.pool.connection)."""
    async with connection(pool, acquire_timeout_s=None) as conn, \
            conn.transaction(isolation="repeatable_read", readonly=True):
        snapshot = Snapshot.parse(await conn.fetchval("SELECT pg_current_snapshot()::text"))
        checkpoints = {v: Checkpoint(v, Snapshot.empty(), None) for v in vshards}
        for r in await conn.fetch(
            "SELECT vshard, snapshot, state FROM shard_checkpoints WHERE vshard = ANY($1::smallint[])", vshards
        ):
            checkpoints[r["vshard"]] = Checkpoint(r["vshard"], Snapshot.parse(r["snapshot"]), bytes(r["state"]))
        users, stream_offsets = [], {}
        if with_users:
            where, arg = (("user_id = $1", balance_of) if balance_of is not None
                          else ("vshard = ANY($1::smallint[])", vshards))
            users = await conn.fetch("SELECT user_id, referral_code, referrer_id, upline, created_at, body_hash"
                                     f" FROM users WHERE {where}", arg)
            # Same snapshot as the ledger rows: these offsets cover exactly their events.
            stream_offsets = dict(await conn.fetch(f"SELECT user_id, last_seq FROM event_streams WHERE {where}", arg))
        stream_epoch = await conn.fetchval("SELECT epoch FROM event_epoch")
        # Vshards checkpointed together share a snapshot: one set of reads each
        # (one in steady state, since the supervisor checkpoints all at once).
        by_snapshot: dict[Snapshot, list[int]] = {}
        for v, checkpoint in checkpoints.items():
            by_snapshot.setdefault(checkpoint.snapshot, []).append(v)
        joins, revenue, entries, transitions = [], [], [], []
        for since, group in by_snapshot.items():
            bound, owned = (since.xmin, since.text()), set(group)
            if balance_of is None:
                joins += [(a, level, n) for a, level, n in await conn.fetch(_JOINS_SQL, *bound)
                          if vshard_of(a) in owned]
                revenue += [(a, level, currency.strip(), int(micros)) for a, level, currency, micros
                            in await conn.fetch(_REVENUE_SQL, *bound) if vshard_of(a) in owned]
                entries_sql, transitions_sql, args = _ENTRIES_SQL, _TRANSITIONS_SQL, (*bound, group)
            else:
                entries_sql, transitions_sql = _ENTRIES_OF_ONE_SQL, _TRANSITIONS_OF_ONE_SQL
                args = (*bound, group, balance_of)
            entries += [(b, currency.strip(), status, int(micros)) for b, currency, status, micros
                        in await conn.fetch(entries_sql, *args)]
            transitions += [(b, currency.strip(), from_, to, int(micros)) for b, currency, from_, to, micros
                            in await conn.fetch(transitions_sql, *args)]
    return ShardRows(snapshot, checkpoints, users, joins, revenue, entries, transitions, stream_epoch, stream_offsets)


async def write_checkpoints(pool: asyncpg.Pool, snapshot: Snapshot, states: dict[int, bytes]) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.executemany(
            "INSERT INTO shard_checkpoints (vshard, snapshot, state) VALUES ($1, $2, $3)"
            " ON CONFLICT (vshard) DO UPDATE SET snapshot = excluded.snapshot, state = excluded.state,"
            " created_at = now()",
            [(v, snapshot.text(), s) for v, s in states.items()],
        )
