"""Commission lifecycle steps that span shards: approval and payout."""

from __future__ import annotations

import msgspec

from dailydoco.protocol import PAYOUT_LINES_PAGE_DEFAULT, PayoutRequest, PayoutResult
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
    """Approve what is due, then pay every positive approved net balance,
    slice by slice; returns the completed payout with its first page of lines.

    The same payout sent again, after a failure cut it short, goes on from
    its last committed slice. Its answer is "created" from the delivery that
    completed it, and "replayed" from every other."""
    await approve_due(ledger, router)
    outcome = "completed_before" if await ledger.open_payout(request) else "more"
    while outcome == "more":
        xid, outcome, deltas = await ledger_write(router, ledger, ledger.pay_payout_slice, request.payout_id)
        await deliver(router, xid, deltas)
    view = await ledger.payout_view(request.payout_id, None, PAYOUT_LINES_PAGE_DEFAULT)
    return PayoutResult(**msgspec.structs.asdict(view), status="created" if outcome == "completed" else "replayed")
