"""Commission lifecycle steps that span shards: approval and payout."""

from __future__ import annotations

from dailydoco.protocol import PayoutRequest, PayoutResult
from dailydoco.storage.ledger import Ledger

from .routing import ShardRouter, deliver, new_delta_set


async def approve_due(ledger: Ledger, router: ShardRouter) -> int:
    """Approve every commission whose holding period has ended; returns how many."""
    total = 0
    while True:
        deltas = new_delta_set(router.shard_count)
        xid, moved = await ledger.approve_due(deltas)
        await deliver(router, xid, deltas)
        total += moved
        if moved == 0:
            return total


async def payout(ledger: Ledger, router: ShardRouter, request: PayoutRequest) -> PayoutResult:
    """Approve what is due, then pay every positive approved net balance."""
    await approve_due(ledger, router)
    deltas = new_delta_set(router.shard_count)
    xid, result = await ledger.payout(request, deltas)
    await deliver(router, xid, deltas)
    return result
