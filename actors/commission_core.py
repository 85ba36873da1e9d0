"""Purchases in, durable commission entries out, shards credited.

`CommissionEngine` is plain asyncio: the CommissionChain actor wraps it, and the
seeded simulation drives it directly.
"""

from __future__ import annotations

from dailydoco.protocol import (
    RefundRequest,
    RefundResult,
    TransactionRequest,
    UnknownUser,
)
from dailydoco.storage.ledger import Ledger, PreparedPurchase, PurchaseOutcome, purchase_hash

from .batching import MicroBatcher
from .routing import ShardRouter, deliver, deliver_soon, ledger_write

# One Postgres transaction carries at most this many purchases: big enough to
# amortise the commit, small enough that one group's latency stays in the
# low milliseconds.
GROUP_COMMIT_TRANSACTIONS_MAX = 4_000
# Groups written at once: one commits while the next is computed.
GROUP_COMMITS_IN_FLIGHT_MAX = 4
UPLINE_CACHE_USERS_MAX = 2_000_000  # uplines never change, so any cached one stays true


class CommissionEngine:
    """Guarantees: a purchase is acknowledged only after its commit; each
    transaction id yields one set of entries, however often it is delivered.
    Shards are credited right after the commit, in the background and
    coalesced (see refs.py): reads of shard memory trail the ledger by tens
    of milliseconds, never by a lost or doubled write."""

    def __init__(self, ledger: Ledger, router: ShardRouter):
        self.ledger = ledger
        self.router = router
        self._uplines: dict[str, tuple[str, ...]] = {}
        self._group_commit = MicroBatcher(self.process, GROUP_COMMIT_TRANSACTIONS_MAX, GROUP_COMMITS_IN_FLIGHT_MAX)

    async def submit(self, requests: list[TransactionRequest]) -> list[PurchaseOutcome]:
        """Queue purchases for the next group commit and wait for their outcome."""
        return await self._group_commit.submit(requests)

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
            xid, written, deltas = await ledger_write(
                self.router, self.ledger, self.ledger.write_purchases, prepared)
            deliver_soon(self.router, xid, deltas)
            for i, outcome in zip(positions, written, strict=True):
                outcomes[i] = outcome
        return outcomes  # type: ignore[return-value]

    async def refund(self, transaction_id: str, request: RefundRequest) -> RefundResult:
        xid, result, deltas = await ledger_write(
            self.router, self.ledger, self.ledger.refund, transaction_id, request)
        await deliver(self.router, xid, deltas)
        return result

