"""Rebuild shard state from the last checkpoint plus the ledger written after it.

The same function serves a restarted shard actor (with user records) and the
supervisor's periodic checkpoint (statistics and balances only), so the state
a checkpoint stores is by construction the state recovery would rebuild.
"""

from __future__ import annotations

import asyncpg
import msgspec

from dailydoco.storage.checkpoints import ShardRows, read_since_checkpoints, write_checkpoints
from dailydoco.storage.deltas import BUCKET_OF_STATUS, DeltaSet, UserRecord
from dailydoco.storage.sharding import vshard_of

from .shard_core import ShardState, UserStats


def rebuild(rows: ShardRows, vshards: list[int]) -> dict[int, ShardState]:
    """One ShardState per vshard, at rows.snapshot."""
    states = {v: ShardState([v], rows.snapshot) for v in vshards}
    for v, checkpoint in rows.checkpoints.items():
        if checkpoint.state is not None:
            wire = msgspec.msgpack.decode(checkpoint.state)
            states[v].stats = {u: UserStats.from_wire(w) for u, w in wire.items()}
    for r in rows.users:
        record = UserRecord(r["user_id"], r["referral_code"], r["referrer_id"], tuple(r["upline"]),
                            r["created_at"], bytes(r["body_hash"]))
        states[vshard_of(record.user_id)].users[record.user_id] = record

    # Already summed, and only what each vshard's checkpoint lacks (see read_since_checkpoints).
    deltas = DeltaSet(vshard_of)
    for ancestor, level, members in rows.joins:
        deltas.for_user(ancestor).joins.append((ancestor, level, members))
    for ancestor, level, currency, micros in rows.revenue:
        deltas.for_user(ancestor).add_revenue(ancestor, currency, level, micros)
    for beneficiary, currency, created_status, micros in rows.entries:
        deltas.for_user(beneficiary).add_balance(beneficiary, currency, BUCKET_OF_STATUS[created_status], micros, summed=True)
    for beneficiary, currency, from_status, to_status, micros in rows.transitions:
        deltas.for_user(beneficiary).move_balance(beneficiary, currency, from_status, to_status, micros, summed=True)
    for v, delta in deltas.by_route.items():
        states[v].apply_unfenced(delta)
    return states


async def recover_shard(pool: asyncpg.Pool, vshards: list[int], balance_of: str | None = None) -> ShardState:
    """The state of a shard actor owning `vshards`, fenced at the read
    snapshot; with `balance_of`, only that user's balance is whole (see
    read_since_checkpoints)."""
    rows = await read_since_checkpoints(pool, vshards, with_users=True, balance_of=balance_of)
    merged = ShardState(vshards, rows.snapshot, rows.stream_epoch)
    for state in rebuild(rows, vshards).values():
        merged.users.update(state.users)
        merged.stats.update(state.stats)
    merged.stream_offsets.update(rows.stream_offsets)
    return merged


async def checkpoint_all(pool: asyncpg.Pool, vshards: list[int]) -> int:
    """Advance the checkpoints of `vshards` to now; returns users checkpointed."""
    rows = await read_since_checkpoints(pool, vshards, with_users=False)
    states = rebuild(rows, vshards)
    encoded = {
        v: msgspec.msgpack.encode({u: s.to_wire() for u, s in state.stats.items()}) for v, state in states.items()
    }
    await write_checkpoints(pool, rows.snapshot, encoded)
    return sum(len(s.stats) for s in states.values())


async def user_state_from_ledger(pool: asyncpg.Pool, user_id: str, network: bool) -> ShardState:
    """The state the user's shard would rebuild after a restart (their
    vshard's checkpoint plus the ledger after it, at one snapshot), for a
    read their shard does not answer: with `network`, the whole vshard's
    (network statistics count every member's joins and purchases), else
    only what the user's record and balance are made of."""
    return await recover_shard(pool, [vshard_of(user_id)], balance_of=None if network else user_id)
