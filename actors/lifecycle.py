"""Commission lifecycle steps that span shards: approval and payout."""

from __future__ import annotations

import logging
from collections.abc import Container

import msgspec

from dailydoco.protocol import PAYOUT_LINES_PAGE_DEFAULT, PayoutRequest, PayoutResult, ServiceUnavailable
from dailydoco.storage.ledger import Ledger

from .routing import ShardRouter, deliver, ledger_write

log = logging.getLogger("dailydoco.lifecycle")


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
    its last committed slice (and so does the supervisor, unasked: see
    finish_cut_short_payouts). Its answer is "created" from the delivery
    that completed it, and "replayed" from every other."""
    await approve_due(ledger, router)
    completed_before = await ledger.open_payout(request)
    if not completed_before:
        try:
            completed_before = not await finish_payout(ledger, router, request.payout_id)
        except ServiceUnavailable as exc:
            # The slice's own detail says it wrote nothing; the payout's
            # earlier slices did, and stand.
            raise type(exc)(
                f"payout {request.payout_id!r} was cut short, and the supervisor finishes it (its"
                f" completed_at says when); its last slice failed: {exc.detail}",
                retry_after_s=exc.retry_after_s,
            ) from exc
    view = await ledger.payout_view(request.payout_id, None, PAYOUT_LINES_PAGE_DEFAULT)
    return PayoutResult(**msgspec.structs.asdict(view), status="replayed" if completed_before else "created")


async def finish_payout(ledger: Ledger, router: ShardRouter, payout_id: str) -> bool:
    """Pay an opened payout's remaining slices; returns whether this call
    completed it (False: another delivery had)."""
    outcome = "more"
    while outcome == "more":
        xid, outcome, deltas = await ledger_write(router, ledger, ledger.pay_payout_slice, payout_id)
        await deliver(router, xid, deltas)
    return outcome == "completed"


async def finish_cut_short_payouts(ledger: Ledger, router: ShardRouter, in_hand: Container[str]) -> list[str]:
    """Finish every payout left incomplete but those `in_hand` (a delivery
    runs them now); returns the ids this call completed.

    A payout whose POST failed part-way has paid some beneficiaries and not
    the rest; nothing can undo a payout, so the only consistent end is the
    one its sender asked for, whether or not the sender sends it again. A
    delivery that runs alongside takes turns with this on the payout's row.
    One that fails again is logged and tried next time; the rest go on."""
    finished = []
    for payout_id in await ledger.unfinished_payout_ids():
        if payout_id in in_hand:
            continue
        try:
            if await finish_payout(ledger, router, payout_id):
                finished.append(payout_id)
        except Exception:  # noqa: BLE001 - an operating error of one payout; its slices are kept
            log.exception("finishing payout %r failed; trying again next sweep", payout_id)
    return finished
