"""A user's commissions pages against the same entries sorted in Python, in
the real Postgres: every status filter, several page sizes, entries spread
over monthly partitions and the default one, and group commits' shared
created_at (ties broken by entry id)."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import re

import pytest

from dailydoco.protocol import COMMISSION_STATUSES
from dailydoco.storage.ledger import Ledger
from dailydoco.storage.pool import open_pool
from tests.conftest import migrated_database

SEED = 52
USER, NEIGHBOUR = "pages-top", "pages-neighbour"
# Most entries paid or pending, a few refunded or reversed: the rare ones are
# what a status filter down an index by time alone had to read past.
STATUS_WEIGHTS = {"pending": 30, "approved": 10, "paid": 55, "refunded": 3, "reversed": 2}
PAGE_SIZES = (3, 100, 500)


@pytest.fixture(scope="module")
def pages_database_url(servers):
    return asyncio.run(migrated_database(servers[0], "dailydoco_commission_pages"))


def _entries(rng: random.Random, now: dt.datetime) -> list[tuple]:
    """(beneficiary, status, created_at) rows: the users' entries, in groups
    that share a created_at, from two months back (the default partition)
    to two months ahead (the months the upkeep made)."""
    rows = []
    for _ in range(240):
        created_at = now + dt.timedelta(seconds=rng.randrange(-60 * 86_400, 60 * 86_400), microseconds=rng.randrange(10**6))
        for _ in range(rng.randrange(1, 6)):
            beneficiary = USER if rng.random() < 0.8 else NEIGHBOUR
            status = rng.choices(list(STATUS_WEIGHTS), weights=list(STATUS_WEIGHTS.values()))[0]
            rows.append((beneficiary, status, created_at))
    return rows


async def _pages(ledger: Ledger, user: str, status: str | None, limit: int) -> list[int]:
    seen, cursor = [], None
    while True:
        page = await ledger.commissions_page(user, status, cursor, limit)
        assert len(page.items) <= limit
        seen += [item.entry_id for item in page.items]
        assert all(status in (None, item.status) for item in page.items)
        if page.next_cursor is None:
            return seen
        cursor = page.next_cursor


async def _scenario(url: str) -> None:
    rng = random.Random(SEED)
    pool = await open_pool(url, max_size=2)
    try:
        now = await pool.fetchval("SELECT now()")
        rows = await pool.fetch(
            "INSERT INTO commission_ledger (transaction_id, beneficiary_id, vshard, level, rate_bp, amount_micros,"
            " currency, kind, status, created_status, created_at, hold_until)"
            " SELECT 'pages-t' || i, b, 0, 1, 2000, 1000, 'USD', 'commission', s, 'pending', c, c"
            " FROM unnest($1::text[], $2::text[], $3::timestamptz[]) WITH ORDINALITY AS e(b, s, c, i)"
            " RETURNING entry_id, beneficiary_id, status, created_at",
            *map(list, zip(*_entries(rng, now), strict=True)))
        assert await pool.fetchval("SELECT count(*) FROM commission_ledger_default") > 0  # the months before the upkeep's
        newest_first = sorted(rows, key=lambda r: (r["created_at"], r["entry_id"]), reverse=True)
        ledger = Ledger(pool, hold_period_s=3_600)
        for status in (None, *COMMISSION_STATUSES):
            expected = [r["entry_id"] for r in newest_first
                        if r["beneficiary_id"] == USER and status in (None, r["status"])]
            assert expected, status
            for limit in PAGE_SIZES:
                assert await _pages(ledger, USER, status, limit) == expected, (status, limit)
        assert await _pages(ledger, "pages-nobody", None, 100) == []
    finally:
        await pool.close()


def test_every_status_pages_through_exactly_the_users_entries_newest_first(pages_database_url):
    asyncio.run(_scenario(pages_database_url))


async def _statuses_the_ledger_allows(url: str) -> set[str]:
    pool = await open_pool(url, max_size=1)
    try:
        check = await pool.fetchval(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE conrelid = 'commission_ledger'::regclass AND contype = 'c'"
            " AND pg_get_constraintdef(oid) LIKE '%(status = %'")
    finally:
        await pool.close()
    return set(re.findall(r"'(\w+)'::text", check))


def test_a_page_of_every_status_asks_for_each_status_the_ledger_allows(pages_database_url):
    """A page without a filter merges one scan a status of the protocol's
    list: a status the ledger's CHECK allowed and the list lacked would
    never be shown."""
    assert set(STATUS_WEIGHTS) == set(COMMISSION_STATUSES)
    assert asyncio.run(_statuses_the_ledger_allows(pages_database_url)) == set(COMMISSION_STATUSES)
