"""Delivery of durable deltas to the shards that hold them in memory.

`ShardRouter` is the one seam between the engine's logic and Ray: the actors
use `RayShardRouter`, the seeded simulation a router over plain ShardStates.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Protocol, TypeVar

from dailydoco.protocol import CommitOutcomeUnknown
from dailydoco.storage.deltas import DeltaSet, ShardDelta
from dailydoco.storage.ledger import Ledger
from dailydoco.storage.sharding import actor_of_vshard, vshard_of

from .batching import start_shared_task

R = TypeVar("R")
# A write of unknown outcome answers its caller (503) once the shards it
# touched have reread the ledger, or after this long (the database is down):
# the reread goes on in the background until it is done.
RECONCILE_WAIT_S = 10.0
RECONCILE_RETRY_S = 1.0
log = logging.getLogger("dailydoco.routing")
_reconciling: set[asyncio.Task] = set()  # held here: the loop keeps only weak references to tasks


class ShardRouter(Protocol):
    shard_count: int

    async def deliver_one(self, shard_index: int, xid: int, delta: ShardDelta) -> None:
        """Apply now; return once the shard holds it, or, where the shard
        does not answer, once it is posted instead (RayShardRouter)."""

    def post_one(self, shard_index: int, xid: int, delta: ShardDelta) -> None:
        """Apply soon, coalesced with other posts to that shard; retried until done."""

    async def reload(self, shard_index: int) -> None:
        """Rebuild that shard from the ledger (checkpoint + rows after it)."""


def new_delta_set(shard_count: int) -> DeltaSet:
    """Deltas keyed by shard actor index."""
    return DeltaSet(lambda user_id: actor_of_vshard(vshard_of(user_id), shard_count))


async def ledger_write(router: ShardRouter, ledger: Ledger,
                       method: Callable[..., Awaitable[tuple[int | None, R]]], *args) -> tuple[int | None, R, DeltaSet]:
    """Run one ledger write, `method(*args, deltas)`; returns its xid, its
    result and the deltas to deliver.

    If its commit's outcome is unknown (CommitOutcomeUnknown), it may have
    committed with no one to deliver its deltas: a shard would then miss it
    for good, as a retry replays and delivers nothing. So before that error
    goes back, the write is settled and every shard it touched rereads the
    ledger."""
    deltas = new_delta_set(router.shard_count)
    try:
        xid, result = await method(*args, deltas)
    except CommitOutcomeUnknown as exc:
        shard_indexes = sorted(deltas.by_route)
        task = start_shared_task(_reconcile(router, ledger, exc.backend_pid, shard_indexes))
        _reconciling.add(task)
        task.add_done_callback(_reconciled)
        done, _ = await asyncio.wait({task}, timeout=RECONCILE_WAIT_S)
        if not done:
            log.warning("shards %s still rereading the ledger after a commit of unknown outcome", shard_indexes)
        raise
    return xid, result, deltas


async def _reconcile(router: ShardRouter, ledger: Ledger, backend_pid: int, shard_indexes: list[int]) -> None:
    """Settle the write, then have each shard reread the ledger; retried
    until every one has (a shard left behind would stay wrong)."""
    await ledger.settle(backend_pid)
    while shard_indexes:
        results = await asyncio.gather(*(router.reload(i) for i in shard_indexes), return_exceptions=True)
        for index, result in zip(shard_indexes, results):
            if isinstance(result, Exception):
                log.warning("shard %d could not reread the ledger (%r); retrying", index, result)
        shard_indexes = [i for i, result in zip(shard_indexes, results) if isinstance(result, Exception)]
        if shard_indexes:
            await asyncio.sleep(RECONCILE_RETRY_S)


def _reconciled(task: asyncio.Task) -> None:
    _reconciling.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("a write of unknown outcome could not be reconciled", exc_info=task.exception())


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
