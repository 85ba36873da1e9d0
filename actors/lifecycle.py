"""Commission lifecycle steps that span shards: approval and payout."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Container

import msgspec

from dailydoco.protocol import PAYOUT_LINES_PAGE_DEFAULT, PayoutRequest, PayoutResult, ServiceUnavailable
from dailydoco.storage.ledger import Ledger

from .routing import ShardRouter, deliver, ledger_write

log = logging.getLogger("dailydoco.lifecycle")

# A payout that fails the supervisor's sweep for a reason other than an
# outage fails on something in the engine or its data, and will likely fail
# the same way next time: tried every sweep, it wrote its traceback 8,640
# times a day. After its first such failure it is tried at the next sweep
# (one lost to a deadlock goes through then); after each one more it waits
# twice as long, up to this. An outage (ServiceUnavailable: Postgres or a
# shard unreachable, Postgres out of room) does not count: a payout failed
# by outages alone goes on at the first sweep after the outage ends.
PAYOUT_RETRY_FIRST_S = 10.0
PAYOUT_RETRY_MAX_S = 320.0


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


class PayoutRetries:
    """When the sweep may next try each payout that failed it, by the
    failures in a row that were not outages (see PAYOUT_RETRY_FIRST_S).
    Kept in memory: a supervisor that restarts tries every payout at once."""

    def __init__(self, now_s: Callable[[], float] = time.monotonic):
        self.now_s = now_s
        self._failed: dict[str, tuple[int, float]] = {}  # payout id -> (failures in a row, next try at)

    def due(self, payout_id: str) -> bool:
        failures, next_try_at = self._failed.get(payout_id, (0, 0.0))
        return not failures or self.now_s() >= next_try_at

    def failed(self, payout_id: str) -> tuple[int, float]:
        """Count a failure; returns the failures in a row and the wait before the next try."""
        failures = self._failed.get(payout_id, (0, 0.0))[0] + 1
        wait_s = min(PAYOUT_RETRY_FIRST_S * 2 ** (failures - 1), PAYOUT_RETRY_MAX_S)
        self._failed[payout_id] = (failures, self.now_s() + wait_s)
        return failures, wait_s

    def keep_only(self, payout_ids: Container[str]) -> None:
        """Forget the payouts not in `payout_ids`: completed, by a sweep or a delivery."""
        self._failed = {k: v for k, v in self._failed.items() if k in payout_ids}


async def finish_cut_short_payouts(ledger: Ledger, router: ShardRouter, in_hand: Container[str],
                                   retries: PayoutRetries) -> list[str]:
    """Finish every payout left incomplete but those `in_hand` (a delivery
    runs them now) and those `retries` holds back; returns the ids this
    call completed.

    A payout whose POST failed part-way has paid some beneficiaries and not
    the rest; nothing can undo a payout, so the only consistent end is the
    one its sender asked for, whether or not the sender sends it again. A
    delivery that runs alongside takes turns with this on the payout's row.
    One that fails again is logged and tried later; the rest go on."""
    unfinished = await ledger.unfinished_payout_ids()
    retries.keep_only(set(unfinished))
    finished = []
    for payout_id in unfinished:
        if payout_id in in_hand or not retries.due(payout_id):
            continue
        try:
            if await finish_payout(ledger, router, payout_id):
                finished.append(payout_id)
        except ServiceUnavailable as exc:
            log.warning("finishing payout %r failed; trying again next sweep: %s", payout_id, exc.detail)
        except Exception:  # noqa: BLE001 - an operating error of one payout; its slices are kept
            failures, wait_s = retries.failed(payout_id)
            log.exception("finishing payout %r failed (%d in a row); trying again in %.0f s",
                          payout_id, failures, wait_s)
    return finished
