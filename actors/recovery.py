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

    wanted = set(vshards)
    deltas = DeltaSet(vshard_of)

    def after_checkpoint(vshard: int, xid: int) -> bool:
        return vshard in wanted and not rows.checkpoints[vshard].snapshot.sees(xid)

    for r in rows.joins:
        for level, ancestor in enumerate(r["upline"], start=1):
            if after_checkpoint(vshard_of(ancestor), r["xid"]):
                deltas.for_user(ancestor).joins.append((ancestor, level))
    for sign, source in ((1, rows.purchases), (-1, rows.refunds)):
        for r in source:
            for level, ancestor in enumerate(r["upline"], start=1):
                if after_checkpoint(vshard_of(ancestor), r["xid"]):
                    deltas.for_user(ancestor).add_revenue(ancestor, r["currency"].strip(), level, sign * r["amount_micros"])
    for r in rows.entries:
        if after_checkpoint(r["vshard"], r["xid"]):
            deltas.for_user(r["beneficiary_id"]).add_balance(
                r["beneficiary_id"], r["currency"].strip(), BUCKET_OF_STATUS[r["created_status"]], r["amount_micros"])
    for r in rows.transitions:
        if after_checkpoint(r["vshard"], r["xid"]):
            deltas.for_user(r["beneficiary_id"]).move_balance(
                r["beneficiary_id"], r["currency"].strip(), r["from_status"], r["to_status"], r["amount_micros"])
    for v, delta in deltas.by_route.items():
        states[v].apply_unfenced(delta)
    return states


async def recover_shard(pool: asyncpg.Pool, vshards: list[int]) -> ShardState:
    """The state of a shard actor owning `vshards`, fenced at the read snapshot."""
    rows = await read_since_checkpoints(pool, vshards, with_users=True)
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
