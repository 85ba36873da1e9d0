"""Commission lifecycle steps that span shards: approval and payout."""

from __future__ import annotations

from dailydoco.protocol import PayoutRequest, PayoutResult
from dailydoco.storage.ledger import Ledger

from .routing import ShardRouter, deliver, ledger_write


async def approve_due(ledger: Ledger, router: ShardRouter) -> int:
    """Approve every commission whose holding period has ended; returns how many."""
    total = 0
    while True:
        xid, moved, deltas = await ledger_write(router, ledger, ledger.approve_due)
        await deliver(router, xid, deltas)
        total += moved
        if moved == 0:
            return total


async def payout(ledger: Ledger, router: ShardRouter, request: PayoutRequest) -> PayoutResult:
    """Approve what is due, then pay every positive approved net balance."""
    await approve_due(ledger, router)
    xid, result, deltas = await ledger_write(router, ledger, ledger.payout, request)
    await deliver(router, xid, deltas)
    return result
