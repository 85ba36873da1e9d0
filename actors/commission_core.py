"""Purchases in, durable commission entries out, shards credited.

`CommissionEngine` is plain asyncio: the CommissionChain actor wraps it, and the
seeded simulation drives it directly.
"""

from __future__ import annotations

import asyncio

from dailydoco.protocol import (
    RefundRequest,
    RefundResult,
    TransactionRequest,
    UnknownUser,
)
from dailydoco.storage.ledger import Ledger, PreparedPurchase, PurchaseOutcome, purchase_hash

from .routing import ShardRouter, deliver, new_delta_set

# One Postgres transaction carries at most this many purchases: big enough to
# amortise the commit, small enough that one group's latency stays in the
# low milliseconds.
GROUP_COMMIT_TRANSACTIONS_MAX = 4_000
# Groups written at once: one commits while the next is computed.
GROUP_COMMITS_IN_FLIGHT_MAX = 2
UPLINE_CACHE_USERS_MAX = 2_000_000  # uplines never change, so any cached one stays true


class CommissionEngine:
    """Guarantees: a purchase is acknowledged only after its commit; each
    transaction id yields one set of entries, however often it is delivered;
    shards are credited before the acknowledgement, so reads see the write."""

    def __init__(self, ledger: Ledger, router: ShardRouter):
        self.ledger = ledger
        self.router = router
        self._uplines: dict[str, tuple[str, ...]] = {}
        self._queue: list[tuple[list[TransactionRequest], asyncio.Future]] = []
        self._queued = 0
        self._wakeup = asyncio.Event()
        self._flushers: list[asyncio.Task] = []

    # --- group commit --------------------------------------------------------

    async def submit(self, requests: list[TransactionRequest]) -> list[PurchaseOutcome]:
        """Queue purchases for the next group commit and wait for their outcome."""
        if not self._flushers:
            self._flushers = [asyncio.create_task(self._flush_loop()) for _ in range(GROUP_COMMITS_IN_FLIGHT_MAX)]
        future = asyncio.get_running_loop().create_future()
        self._queue.append((requests, future))
        self._queued += len(requests)
        self._wakeup.set()
        return await future

    async def _flush_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            group: list[tuple[list[TransactionRequest], asyncio.Future]] = []
            size = 0
            while self._queue and (not group or size + len(self._queue[0][0]) <= GROUP_COMMIT_TRANSACTIONS_MAX):
                item = self._queue.pop(0)
                group.append(item)
                size += len(item[0])
            self._queued -= size
            if not self._queue:
                self._wakeup.clear()
            if not group:
                continue
            flat = [r for requests, _ in group for r in requests]
            try:
                outcomes = await self.process(flat)
            except Exception as exc:  # noqa: BLE001 - every waiter must hear of it
                for _, future in group:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for requests, future in group:
                if not future.done():
                    future.set_result(outcomes[start : start + len(requests)])
                start += len(requests)

    async def close(self) -> None:
        for task in self._flushers:
            task.cancel()

    # --- the work --------------------------------------------------------------

    async def process(self, requests: list[TransactionRequest]) -> list[PurchaseOutcome]:
        """Write one group in one transaction, credit the shards, return outcomes."""
        missing = list({r.user_id for r in requests if r.user_id not in self._uplines})
        if missing:
            found = await self.ledger.uplines(missing)
            if len(self._uplines) + len(found) > UPLINE_CACHE_USERS_MAX:
                self._uplines.clear()
            self._uplines.update(found)
        outcomes: list[PurchaseOutcome | None] = [None] * len(requests)
        prepared, positions = [], []
        for i, r in enumerate(requests):
            upline = self._uplines.get(r.user_id)
            if upline is None:
                outcomes[i] = PurchaseOutcome(None, UnknownUser(f"user {r.user_id!r} is not registered"))
                continue
            prepared.append(PreparedPurchase(r, purchase_hash(r), upline))
            positions.append(i)
        if prepared:
            deltas = new_delta_set(self.router.shard_count)
            xid, written = await self.ledger.write_purchases(prepared, deltas)
            await deliver(self.router, xid, deltas)
            for i, outcome in zip(positions, written):
                outcomes[i] = outcome
        return outcomes  # type: ignore[return-value]

    async def refund(self, transaction_id: str, request: RefundRequest) -> RefundResult:
        deltas = new_delta_set(self.router.shard_count)
        xid, result = await self.ledger.refund(transaction_id, request, deltas)
        await deliver(self.router, xid, deltas)
        return result

