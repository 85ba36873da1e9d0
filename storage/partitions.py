"""The commission ledger's monthly partitions, made ahead of the engine's clock.

`commission_ledger` is range-partitioned by `created_at`, one partition a
UTC month (`commission_ledger_YYYYMM`), with a default partition for a row
that no month takes. The supervisor keeps the engine's current month and
the LEDGER_MONTHS_AHEAD after it made: at start, every few seconds as time
passes, and before a clock move for the month it moves to. So the default
stays empty, and a ledger of years stays in months that Postgres vacuums
and indexes one by one, and that reads bounded by `created_at` prune.

A row that did land in the default (written in a month whose partition was
not made yet: until session 41 partitions were made only at start and at a
clock move, so an engine that ran more than three months without a restart
wrote into the default from then on) is moved into its month's partition
when that is made. Postgres refuses a partition for a range the default
holds rows of, so without the move such a month would stay in the default
for good.
"""

from __future__ import annotations

import datetime as dt
import logging

import asyncpg

log = logging.getLogger("dailydoco.partitions")

# The months made ahead of the engine's current one: a month's partition
# exists long before its first write, even with the supervisor down for weeks.
LEDGER_MONTHS_AHEAD = 3
# A partition is made holding the whole ledger (see _make_partition), and
# while it waits for that lock every query of the ledger queues behind it.
# Behind a long transaction (a payout slice) it would hold them all for as
# long; it gives up after this instead, and the next check tries again.
PARTITION_LOCK_WAIT_MS = 2_000

DEFAULT_PARTITION = "commission_ledger_default"


def partition_name(month: dt.date) -> str:
    return f"commission_ledger_{month:%Y%m}"


def _next_month(month: dt.date) -> dt.date:
    return dt.date(month.year + month.month // 12, month.month % 12 + 1, 1)


def _utc_midnight(day: dt.date) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


async def ensure_ledger_partitions(conn: asyncpg.Connection, ahead_s: int = 0) -> list[str]:
    """Make the missing partitions of the engine's current month and the
    LEDGER_MONTHS_AHEAD after it, the same from `ahead_s` seconds later (a
    clock about to move that far), and those of any month the default
    partition holds rows of, moving those rows in; returns the names made.

    Where the ledger's lock is not free in time, that month and those after
    it are left for the next call (logged)."""
    months = await _months_kept(conn, ahead_s)
    # Normally empty, so this reads nothing.
    months.update(
        r["month"]
        for r in await conn.fetch(
            "SELECT DISTINCT date_trunc('month', created_at AT TIME ZONE 'UTC')::date AS month"
            f" FROM {DEFAULT_PARTITION}"
        )
    )
    missing = await _missing(conn, months)
    made = []
    for month in sorted(m for m in months if partition_name(m) in missing):
        try:
            moved = await _make_partition(conn, month)
        except asyncpg.LockNotAvailableError:
            # The months after it would wait on the same transaction.
            log.warning("ledger partitions from %s not made: the ledger's lock was not free within %d ms; trying"
                        " again at the next check", partition_name(month), PARTITION_LOCK_WAIT_MS)
            break
        if moved is not None:
            made.append(partition_name(month))
            if moved:
                log.warning("ledger partition %s made, with %d rows moved into it from the default partition",
                            partition_name(month), moved)
    return made


async def partition_backlog(pool: asyncpg.Pool, count_max: int) -> tuple[int, int]:
    """The months the upkeep keeps (the current one and LEDGER_MONTHS_AHEAD
    after it) that have no partition, and the rows in the default partition
    (counted up to `count_max`): both 0 while the upkeep keeps up."""
    async with pool.acquire() as conn:
        missing = await _missing(conn, await _months_kept(conn))
        default_rows = await conn.fetchval(
            f"SELECT count(*) FROM (SELECT FROM {DEFAULT_PARTITION} LIMIT $1) AS counted", count_max)
    return len(missing), default_rows


async def _months_kept(conn: asyncpg.Connection, ahead_s: int = 0) -> set[dt.date]:
    """The engine's current month and the LEDGER_MONTHS_AHEAD after it, and
    the same from `ahead_s` seconds later."""
    months = set()
    for start in await conn.fetchrow(
        "SELECT date_trunc('month', t AT TIME ZONE 'UTC')::date,"
        " date_trunc('month', (t + make_interval(secs => $1)) AT TIME ZONE 'UTC')::date"
        " FROM (SELECT now() + make_interval(secs => offset_us / 1e6) AS t FROM engine_clock) AS engine",
        float(ahead_s),
    ):
        months.add(month := start)
        for _ in range(LEDGER_MONTHS_AHEAD):
            months.add(month := _next_month(month))
    return months


async def _missing(conn: asyncpg.Connection, months: set[dt.date]) -> set[str]:
    """The names of `months`' partitions that are not made."""
    return set(await conn.fetchval(
        "SELECT coalesce(array_agg(name), '{}') FROM unnest($1::text[]) AS name WHERE to_regclass(name) IS NULL",
        [partition_name(m) for m in months],
    ))


async def _make_partition(conn: asyncpg.Connection, month: dt.date) -> int | None:
    """Make `month`'s partition with the default's rows of that month moved
    into it; returns how many rows moved, or None when another call made it first."""
    name = partition_name(month)
    lower, upper = _utc_midnight(month), _utc_midnight(_next_month(month))
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = {PARTITION_LOCK_WAIT_MS}")
        # From here to the commit the whole ledger waits, reads too: once a
        # month, as a rule, for a few milliseconds. Every query of the ledger
        # locks it before its partitions, so whatever holds the default is
        # done before this is granted, and the attach's lock on the default
        # deadlocks with no one (a lock that let reads or row locks through
        # did, in the simulation: a FOR UPDATE waiting on a moved row). A write
        # routed to the default while its month was moved and attached would
        # fail the default's partition check (4 of 2,811 racing writes in a
        # probe that locked the default alone); after this lock, writes route
        # by the new partitions. A concurrent call waits, then finds the month made.
        await conn.execute("LOCK TABLE ONLY commission_ledger IN ACCESS EXCLUSIVE MODE")
        if await conn.fetchval("SELECT to_regclass($1)", name) is not None:
            return None
        # A table of its own, the month's rows moved in, then attached: the
        # attach builds the ledger's indexes on it and checks its rows.
        await conn.execute(f"CREATE TABLE {name} (LIKE commission_ledger INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
        status = await conn.execute(
            f"WITH moved AS (DELETE FROM {DEFAULT_PARTITION} WHERE created_at >= $1 AND created_at < $2 RETURNING *)"
            f" INSERT INTO {name} SELECT * FROM moved",
            lower, upper,
        )
        await conn.execute(
            f"ALTER TABLE commission_ledger ATTACH PARTITION {name}"
            f" FOR VALUES FROM ('{lower.isoformat()}') TO ('{upper.isoformat()}')"
        )
    return int(status.split()[-1])  # "INSERT 0 n"
