"""A payout pays in slices, against the real Postgres.

Each slice is one transaction over whole beneficiaries, up to
PAYOUT_SLICE_ENTRIES approved entries, in (beneficiary, currency) order; a
beneficiary with more entries than that is paid in parts, a slice each. The
payout remembers the last key paid (and the part), so a payout cut short goes
on from there, and its lines page through by the same key.
"""

from __future__ import annotations

import asyncio
import base64
import itertools

import msgspec
import pytest

from dailydoco.actors.routing import new_delta_set
from dailydoco.protocol import IdempotencyConflict, InvalidRequest, PayoutRequest
from dailydoco.protocol.live import CommissionPaid, decode_events
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
        await _approved(pool, "c", "USD", 1_000_000, 1_000_000, 1_000_000)  # more than a slice: in parts
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
            ("more", {("a", "USD")}),  # b may have more entries past a window of 2
            ("more", {("b", "USD")}),  # and so may c
            ("more", {("c", "USD")}),  # more entries than a slice: paid in parts
            ("more", {("c", "USD")}),
            ("more", set()),  # d, whose net is below zero
            ("completed", {("e", "USD"), ("f", "USD")}),
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


async def _in_parts(url: str) -> None:
    pool = await open_pool(url, max_size=2)
    try:
        ledger = Ledger(pool, hold_period_s=3_600)
        await _approved(pool, "g", "GBP", 5_000_000, 5_000_000, 5_000_000, -3_000_000)
        await _approved(pool, "h", "GBP", 4_000_000, 4_000_000, 4_000_000)
        await _approved(pool, "k", "GBP", 1_000_000, 1_000_000, 1_000_000, -9_000_000)  # nets below zero

        async def clawback_more_than_paid(slices_done: int) -> None:
            if slices_done == 3:  # h's first part is paid: its line is 8
                await _approved(pool, "h", "GBP", -13_000_000)

        assert await ledger.open_payout(PayoutRequest(payout_id="parts", currency="GBP")) is False
        assert await _pay_in_slices(pool, ledger, "parts", clawback_more_than_paid) == [
            ("more", {("g", "GBP")}),  # two commissions
            ("more", {("g", "GBP")}),  # the third, then the clawback: the line stays above zero
            ("more", {("h", "GBP")}),
            ("more", {("h", "GBP")}),  # the third; the clawback would take the line to -1
            ("more", set()),  # k, netted first: below zero
            ("completed", set()),
        ]
        assert await _status_of(pool, "g") == ["paid", "paid", "paid", "reversed"]  # a clawback paid is reversed
        assert await _status_of(pool, "h") == ["paid", "paid", "paid", "approved"]  # for the next payout
        assert await _status_of(pool, "k") == ["approved"] * 4
        view = await ledger.payout_view("parts", None, 10)
        assert [(x.beneficiary_id, x.amount_micros) for x in view.lines] == [("g", 12_000_000), ("h", 12_000_000)]
        assert [(t.currency, t.beneficiaries, t.amount_micros) for t in view.totals] == [("GBP", 2, 24_000_000)]
        # Each line is told once, whole, when its key is done.
        told = [(row["user_id"], event.amount_micros)
                for row in await pool.fetch("SELECT user_id, events FROM outbox WHERE user_id IN ('g', 'h')")
                for event in decode_events(row["events"])
                if isinstance(event, CommissionPaid) and event.payout_id == "parts"]
        assert sorted(told) == [("g", 12_000_000), ("h", 12_000_000)], told
    finally:
        await pool.close()


def test_a_beneficiary_with_more_entries_than_a_slice_is_paid_in_parts(database_url, monkeypatch):
    """Its commissions in entry order, then its clawbacks while its line
    stays above zero; netted first, and passed by if that is not above zero."""
    monkeypatch.setattr(ledger_module, "PAYOUT_SLICE_ENTRIES", 2)
    asyncio.run(_in_parts(database_url))
