"""Delivery of durable deltas to the shards that hold them in memory.

`ShardRouter` is the one seam between the engine's logic and Ray: the actors
use `RayShardRouter`, the seeded simulation a router over plain ShardStates.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from dailydoco.storage.deltas import DeltaSet, ShardDelta
from dailydoco.storage.sharding import actor_of_vshard, vshard_of


class ShardRouter(Protocol):
    shard_count: int

    async def deliver_one(self, shard_index: int, xid: int, delta: ShardDelta) -> None:
        """Apply now; return once the shard holds it."""

    def post_one(self, shard_index: int, xid: int, delta: ShardDelta) -> None:
        """Apply soon, coalesced with other posts to that shard; retried until done."""


def new_delta_set(shard_count: int) -> DeltaSet:
    """Deltas keyed by shard actor index."""
    return DeltaSet(lambda user_id: actor_of_vshard(vshard_of(user_id), shard_count))


async def deliver(router: ShardRouter, xid: int | None, deltas: DeltaSet) -> None:
    """Send every shard its part of one write, concurrently; one call per shard.

    One call per (xid, shard) is what lets a shard drop a retried delivery by
    its xid alone.
    """
    if xid is None or not deltas.by_route:
        return
    await asyncio.gather(
        *(router.deliver_one(index, xid, delta) for index, delta in deltas.by_route.items() if not delta.is_empty())
    )


def deliver_soon(router: ShardRouter, xid: int | None, deltas: DeltaSet) -> None:
    """`deliver` without waiting: for the purchase path, where the commit is the
    acknowledgement and a shard tens of milliseconds behind is acceptable."""
    if xid is None:
        return
    for index, delta in deltas.by_route.items():
        if not delta.is_empty():
            router.post_one(index, xid, delta)
