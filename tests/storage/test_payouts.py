"""A payout pays in slices, against the real Postgres.

Each slice is one transaction over whole beneficiaries, up to
PAYOUT_SLICE_ENTRIES approved entries, in (beneficiary, currency) order; a
beneficiary with more entries than that is a slice of its own. The
payout remembers the last key paid, so a payout cut short goes on from there,
and its lines page through by the same key.
"""

from __future__ import annotations

import asyncio
import base64
import itertools

import msgspec
import pytest

from dailydoco.actors.routing import new_delta_set
from dailydoco.protocol import IdempotencyConflict, InvalidRequest, PayoutRequest
from dailydoco.storage import ledger as ledger_module
from dailydoco.storage.ledger import Ledger
from dailydoco.storage.pool import open_pool
from tests.conftest import migrated_database

SHARDS = 2
_transaction_ids = itertools.count()


@pytest.fixture(scope="module")
def database_url(servers):
    return asyncio.run(migrated_database(servers[0], "dailydoco_payouts"))


async def _approved(pool, beneficiary: str, currency: str, *amounts_micros: int) -> None:
    """Approved entries, as the sweep leaves them; a negative amount is a clawback."""
    for amount in amounts_micros:
        n = next(_transaction_ids)
        await pool.execute(
            "INSERT INTO commission_ledger (transaction_id, refund_id, beneficiary_id, vshard, level, rate_bp,"
            " amount_micros, currency, kind, status, created_status, created_at, hold_until)"
            " VALUES ($1, $2, $3, 0, 1, 2000, $4, $5, $6, 'approved', 'pending', now(), now())",
            f"t{n}", None if amount > 0 else f"r{n}", beneficiary, amount, currency,
            "commission" if amount > 0 else "clawback",
        )


async def _pay_in_slices(pool, ledger: Ledger, payout_id: str, between=None) -> list[tuple[str, set]]:
    """Run a payout's slices to the end; each slice's outcome and the keys it paid."""
    slices = []
    outcome = "more"
    while outcome == "more":
        xid, outcome = await ledger.pay_payout_slice(payout_id, new_delta_set(SHARDS))
        paid = await pool.fetch(
            "SELECT DISTINCT beneficiary_id, currency FROM ledger_transitions WHERE xid = $1", xid)
        slices.append((outcome, {(r["beneficiary_id"], r["currency"]) for r in paid}))
        if between is not None:
            await between(len(slices))
    return slices


async def _status_of(pool, beneficiary: str) -> list[str]:
    return [r["status"] for r in await pool.fetch(
        "SELECT status FROM commission_ledger WHERE beneficiary_id = $1 ORDER BY entry_id", beneficiary)]


async def _scenario(url: str) -> None:
    pool = await open_pool(url, max_size=2)
    try:
        ledger = Ledger(pool, hold_period_s=3_600)
        await _approved(pool, "a", "USD", 5_000_000)
        await _approved(pool, "b", "USD", 3_000_000, 4_000_000)
        await _approved(pool, "c", "USD", 1_000_000, 1_000_000, 1_000_000)  # more than a slice: one alone
        await _approved(pool, "d", "USD", 2_000_000, -5_000_000)  # nets below zero: no line
        await _approved(pool, "e", "EUR", 6_000_000)
        await _approved(pool, "e", "USD", 7_000_000)

        # One currency: its keys only.
        assert await ledger.open_payout(PayoutRequest(payout_id="eur", currency="EUR")) is False
        assert await _pay_in_slices(pool, ledger, "eur") == [("completed", {("e", "EUR")})]

        async def approve_more(slices_done: int) -> None:
            if slices_done == 2:  # a is behind the payout now, f ahead of it
                await _approved(pool, "a", "USD", 8_000_000)
                await _approved(pool, "f", "USD", 9_000_000)

        assert await ledger.open_payout(PayoutRequest(payout_id="all")) is False
        assert await _pay_in_slices(pool, ledger, "all", approve_more) == [
            ("more", {("a", "USD")}),  # a and b are 3 entries
            ("more", {("b", "USD")}),
            ("more", {("c", "USD")}),
            ("more", set()),  # d, whose net is below zero
            ("more", {("e", "USD")}),  # f may have had more entries past the window of 2
            ("completed", {("f", "USD")}),
        ]
        assert await _status_of(pool, "a") == ["paid", "approved"]  # left for the next payout
        assert await _status_of(pool, "d") == ["approved", "approved"]
        assert await _status_of(pool, "c") == ["paid"] * 3

        # Delivered again: complete, and nothing more paid.
        assert await ledger.open_payout(PayoutRequest(payout_id="all")) is True
        assert await ledger.pay_payout_slice("all", new_delta_set(SHARDS)) == (None, "completed_before")
        with pytest.raises(IdempotencyConflict):
            await ledger.open_payout(PayoutRequest(payout_id="all", currency="USD"))

        # Its lines, page by page, in key order; totals over all of them.
        pages, cursor = [], None
        while True:
            view = await ledger.payout_view("all", cursor, 2)
            pages.append([(x.beneficiary_id, x.currency, x.amount_micros) for x in view.lines])
            cursor = view.next_cursor
            if cursor is None:
                break
        assert pages == [[("a", "USD", 5_000_000), ("b", "USD", 7_000_000)],
                         [("c", "USD", 3_000_000), ("e", "USD", 7_000_000)],
                         [("f", "USD", 9_000_000)]]
        assert view.completed_at is not None and view.currency is None
        assert [(t.currency, t.beneficiaries, t.amount_micros) for t in view.totals] == [("USD", 5, 31_000_000)]
        assert await ledger.payout_view("nobody", None, 10) is None

        # A cursor is one this server issued, or a 422 (not a 500 from Postgres).
        forged = [base64.urlsafe_b64encode(msgspec.msgpack.encode(position)).decode().rstrip("=")
                  for position in (("a\0", "USD"), ("a", "usd"), ("a", 1), (1, 2))]
        for cursor in ["%%%", "AAAA", *forged]:
            with pytest.raises(InvalidRequest):
                await ledger.payout_view("all", cursor, 2)
    finally:
        await pool.close()


def test_a_payout_pays_whole_beneficiaries_slice_by_slice_and_pages_its_lines(database_url, monkeypatch):
    monkeypatch.setattr(ledger_module, "PAYOUT_SLICE_ENTRIES", 2)
    asyncio.run(_scenario(database_url))
