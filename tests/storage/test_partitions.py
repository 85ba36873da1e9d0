"""The ledger's monthly partitions, made ahead of the clock, against the real Postgres.

Rows written in a month whose partition was not made yet land in the
default partition; making the month moves them in, whole, under purchases
that go on meanwhile, and a month whose lock is not free is left for the
next check rather than hold the ledger's writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from dailydoco.actors.routing import new_delta_set
from dailydoco.storage.ledger import Ledger
from dailydoco.storage.partitions import (
    DEFAULT_PARTITION,
    LEDGER_MONTHS_AHEAD,
    PARTITION_LOCK_WAIT_MS,
    ensure_ledger_partitions,
    partition_backlog,
)
from dailydoco.storage.pool import open_pool
from tests.conftest import MONTHS_KEPT_SQL, migrated_database
from tests.storage.test_ledger_writes import _insert_users, _purchase

DAY_S = 86_400


async def _months_ahead_of_the_clock(pool, ahead_s: int = 0) -> list[str]:
    """The partitions a check makes for the engine's month `ahead_s` from now."""
    return [r[0] for r in await pool.fetch(MONTHS_KEPT_SQL, float(ahead_s), LEDGER_MONTHS_AHEAD)]


@contextlib.asynccontextmanager
async def _ledger_past_its_months(servers, database: str, connections: int):
    """A fresh ledger with a buyer and two ancestors, its clock moved past
    the months made at migration; yields its pool, its Ledger and the
    current month's partition name (not made yet)."""
    pool = await open_pool(await migrated_database(servers[0], database), max_size=connections)
    try:
        await _insert_users(pool)
        ledger = Ledger(pool, hold_period_s=3_600)
        await ledger.advance_clock(200 * DAY_S)
        yield pool, ledger, (await _months_ahead_of_the_clock(pool))[0]
    finally:
        await pool.close()


async def _where(pool, transaction_prefix: str) -> set[str]:
    rows = await pool.fetch("SELECT DISTINCT tableoid::regclass::text AS part FROM commission_ledger"
                            " WHERE transaction_id LIKE $1", f"{transaction_prefix}%")
    return {r["part"] for r in rows}


async def _ledger_rows(pool) -> list[dict]:
    return [dict(r) for r in await pool.fetch("SELECT * FROM commission_ledger ORDER BY entry_id")]


async def _index_names(pool, table: str) -> set[str]:
    """The ledger's indexes a partition has, by the parent index each belongs to."""
    rows = await pool.fetch(
        "SELECT parent.relname FROM pg_inherits i JOIN pg_class child ON child.oid = i.inhrelid"
        " JOIN pg_class parent ON parent.oid = i.inhparent JOIN pg_index x ON x.indexrelid = child.oid"
        " WHERE x.indrelid = $1::regclass", table)
    return {r["relname"] for r in rows}


def test_months_are_made_ahead_and_rows_in_the_default_are_moved_into_theirs_whole(servers):
    async def main():
        pool = await open_pool(await migrated_database(servers[0], "dailydoco_partitions_moved"), max_size=2)
        try:
            await _insert_users(pool)
            ledger = Ledger(pool, hold_period_s=3_600)
            made_at_migration = await _months_ahead_of_the_clock(pool)
            assert await pool.fetchval("SELECT bool_and(to_regclass(name) IS NOT NULL) FROM unnest($1::text[]) AS name",
                                       made_at_migration)

            # Months past those made, as an engine that ran on without its
            # upkeep wrote them: into the default.
            await ledger.advance_clock(200 * DAY_S)
            await ledger.write_purchases([_purchase(f"late-{i}") for i in range(5)], new_delta_set(2))
            late_month = (await _months_ahead_of_the_clock(pool))[0]
            assert late_month not in made_at_migration
            assert await _where(pool, "late-") == {DEFAULT_PARTITION}
            await ledger.advance_clock(400 * DAY_S)
            await ledger.write_purchases([_purchase(f"later-{i}") for i in range(3)], new_delta_set(2))
            before = await _ledger_rows(pool)
            approved_before = await pool.fetchval("SELECT count(*) FROM commission_ledger WHERE status = 'approved'")

            async with pool.acquire() as conn:
                made = await ensure_ledger_partitions(conn)
            # The month the default held rows of, behind the clock now, and
            # the current one with those ahead of it.
            assert made == sorted([late_month, *await _months_ahead_of_the_clock(pool)])
            assert await _ledger_rows(pool) == before
            assert await pool.fetchval(f"SELECT count(*) FROM {DEFAULT_PARTITION}") == 0
            assert await _where(pool, "late-") == {late_month}
            assert await _where(pool, "later-") == {made[1]}
            assert await _index_names(pool, late_month) == await _index_names(pool, made_at_migration[0]) != set()

            # The ledger reads and writes the moved rows as before: a replay
            # finds its purchase by the index by transaction, and the sweep
            # approves what came due.
            _, replayed = await ledger.write_purchases([_purchase("late-0")], new_delta_set(2))
            assert replayed[0].result.status == "replayed"
            _, approved = await ledger.approve_due(new_delta_set(2))
            assert approved and approved_before + approved == await pool.fetchval(
                "SELECT count(*) FROM commission_ledger WHERE status = 'approved'")
            await ledger.write_purchases([_purchase("after-0")], new_delta_set(2))
            assert await _where(pool, "after-") == {made[1]}

            async with pool.acquire() as conn:
                assert await ensure_ledger_partitions(conn) == []
                # A clock about to move: the months it moves to, before it does.
                assert await ensure_ledger_partitions(conn, ahead_s=800 * DAY_S) == \
                    await _months_ahead_of_the_clock(pool, 800 * DAY_S)
        finally:
            await pool.close()

    asyncio.run(main())


def test_purchases_racing_a_month_being_made_are_each_written_once(servers):
    """Purchases of a month not made yet go on while it is made: each waits
    for it, none fails (routed to the default while the month was attached,
    4 of 2,811 did with only the default partition locked), and each
    purchase has its entries once, all in the month's partition."""
    async def main():
        async with _ledger_past_its_months(servers, "dailydoco_partitions_race", connections=6) as (pool, ledger, month):
            written, failed, stop = [], [], asyncio.Event()

            async def purchases(writer: int) -> None:
                for group in range(1_000_000):
                    if stop.is_set():
                        return
                    tids = [f"race-{writer}-{group}-{i}" for i in range(3)]
                    try:
                        await ledger.write_purchases([_purchase(tid) for tid in tids], new_delta_set(2))
                        written.extend(tids)
                    except Exception as exc:  # noqa: BLE001 - what the test counts
                        failed.append(repr(exc))

            writers = [asyncio.create_task(purchases(w)) for w in range(4)]
            await asyncio.sleep(1.0)
            async with pool.acquire() as conn:
                made = await ensure_ledger_partitions(conn)
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*writers)

            assert failed == [] and month in made and len(written) > 100
            assert await _where(pool, "race-") == {month}
            per_purchase = await pool.fetch(
                "SELECT transaction_id, count(*) AS entries FROM commission_ledger GROUP BY 1")
            assert sorted(r["transaction_id"] for r in per_purchase) == sorted(written)
            assert {r["entries"] for r in per_purchase} == {2}  # the buyer's two ancestors

    asyncio.run(main())


def test_a_month_whose_lock_is_not_free_is_left_for_the_next_check(servers):
    """A transaction holds the ledger for writing: the check gives up on the
    month after its lock wait, rather than queue the ledger behind it, and
    moves nothing, and /metrics's gauges say so; once the transaction ends,
    the next check makes it."""
    async def main():
        async with _ledger_past_its_months(servers, "dailydoco_partitions_busy", connections=3) as (pool, ledger, month):
            await ledger.write_purchases([_purchase("busy-0")], new_delta_set(2))
            async with pool.acquire() as holder, pool.acquire() as conn:
                async with holder.transaction():
                    await holder.execute("LOCK TABLE commission_ledger IN ROW EXCLUSIVE MODE")  # as a write does
                    started = time.monotonic()
                    assert await ensure_ledger_partitions(conn) == []
                    waited_s = time.monotonic() - started
                # Once, not once a month.
                assert PARTITION_LOCK_WAIT_MS / 1000 <= waited_s < 2 * PARTITION_LOCK_WAIT_MS / 1000
                assert await pool.fetchval("SELECT to_regclass($1)", month) is None
                assert await _where(pool, "busy-") == {DEFAULT_PARTITION}
                # Every month kept is missing; the purchase's two entries wait in the default.
                assert await partition_backlog(pool, count_max=100) == (LEDGER_MONTHS_AHEAD + 1, 2)
                assert await partition_backlog(pool, count_max=1) == (LEDGER_MONTHS_AHEAD + 1, 1)
                assert month in await ensure_ledger_partitions(conn)
            assert await _where(pool, "busy-") == {month}
            assert await partition_backlog(pool, count_max=100) == (0, 0)

    asyncio.run(main())

