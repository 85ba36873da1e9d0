"""The supervisor's sweep of payouts cut short, against the real Postgres:
one that keeps failing on something other than an outage is tried less and
less often; one that fails for an outage is tried every sweep."""

from __future__ import annotations

import asyncio
import random

import pytest

from dailydoco.actors import lifecycle
from dailydoco.actors.commission_core import CommissionEngine
from dailydoco.actors.registration import register_user
from dailydoco.protocol import PayoutRequest, RegisterUserRequest, TransactionRequest
from dailydoco.storage.ledger import Ledger
from dailydoco.storage.pool import open_pool
from tests.conftest import migrated_database

from ..postgres_faults import disk_full
from .test_ledger_simulation import FaultyRouter

SHARDS = 2
HOLD_PERIOD_S = 3_600


class FakeClock:
    def __init__(self):
        self.now_s = 1_000.0

    def __call__(self) -> float:
        return self.now_s


def test_a_payout_that_keeps_failing_waits_twice_as_long_after_each_failure_up_to_the_most():
    clock = FakeClock()
    retries = lifecycle.PayoutRetries(clock)
    assert retries.due("p")
    waits = []
    for _ in range(8):
        failures, wait_s = retries.failed("p")
        waits.append(wait_s)
        clock.now_s += wait_s - 0.5
        assert not retries.due("p"), failures
        clock.now_s += 0.5
        assert retries.due("p"), failures
    assert waits == [10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 320.0, 320.0]
    assert lifecycle.PAYOUT_RETRY_MAX_S == 320.0
    retries.failed("q")
    retries.keep_only({"p"})
    assert retries.failed("q") == (1, 10.0), "a payout forgotten starts again from the first wait"


@pytest.fixture(scope="module")
def database_url(servers):
    return asyncio.run(migrated_database(servers[0], "dailydoco_lifecycle"))


# Counts every try at a payout's lines (a sequence: its nextval outlives the
# rollback), and fails it as a bug in the engine or its data would: a plain
# RAISE, SQLSTATE P0001, not an outage.
_BROKEN_PAYOUT = """
CREATE SEQUENCE test_payout_tries;
CREATE FUNCTION test_broken_payout() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.payout_id = TG_ARGV[0] THEN
        PERFORM nextval('test_payout_tries');
        RAISE EXCEPTION 'payout % broken', NEW.payout_id;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_broken_payout BEFORE INSERT ON payout_lines
    FOR EACH ROW EXECUTE FUNCTION test_broken_payout('broken')"""
_MENDED = "DROP FUNCTION test_broken_payout() CASCADE; DROP SEQUENCE test_payout_tries"


async def _cut_short_payouts(url: str) -> None:
    pool = await open_pool(url, max_size=3)
    try:
        ledger = Ledger(pool, HOLD_PERIOD_S)
        router = FaultyRouter([None] * SHARDS, random.Random(0), pool)
        for i in range(SHARDS):
            await router.reload(i)
        engine = CommissionEngine(ledger, router)
        # Two payouts opened and cut short, each of a currency and so a
        # beneficiary of its own: "broken" fails on its lines, "outage"
        # (opened after it) for want of disk.
        for payout_id, currency in (("broken", "EUR"), ("outage", "USD")):
            root, buyer = f"{payout_id}-root", f"{payout_id}-buyer"
            root_code = (await register_user(ledger, router, RegisterUserRequest(user_id=root))).referral_code
            await register_user(ledger, router, RegisterUserRequest(user_id=buyer, referral_code=root_code))
            await engine.process([TransactionRequest(
                transaction_id=f"{payout_id}-t", user_id=buyer, amount_micros=10_000_000, currency=currency)])
            await router.flush_posted()
            await ledger.advance_clock(HOLD_PERIOD_S + 1)
            await lifecycle.approve_due(ledger, router)
            assert await ledger.open_payout(PayoutRequest(payout_id=payout_id, currency=currency)) is False

        make_disk_full, make_room = disk_full(on_insert="outage", table="payout_lines", key="payout_id")
        await pool.execute(make_disk_full)
        await pool.execute(_BROKEN_PAYOUT)
        clock = FakeClock()
        retries = lifecycle.PayoutRetries(clock)

        async def sweep(after_s: float) -> tuple[list[str], int, int]:
            """A sweep `after_s` after the last; what it finished, and the
            tries at each payout's lines so far."""
            clock.now_s += after_s
            finished = await lifecycle.finish_cut_short_payouts(ledger, router, (), retries)
            broken_tries = await pool.fetchval("SELECT last_value - 1 + is_called::int FROM test_payout_tries")
            outage_lines = await pool.fetchval("SELECT count(*) FROM payout_lines WHERE payout_id = 'outage'")
            return finished, broken_tries, outage_lines

        assert await sweep(0) == ([], 1, 0)
        assert await sweep(5) == ([], 1, 0), "tried again before its first wait"
        assert await sweep(5) == ([], 2, 0)
        assert await sweep(10) == ([], 2, 0), "tried again before its second wait, twice the first"
        assert await sweep(10) == ([], 3, 0)
        # The outage ends: the payout it held goes through at the next sweep,
        # however often it failed; the broken one waits out its 40 s.
        await pool.execute(make_room)
        assert await sweep(10) == (["outage"], 3, 1)
        assert await sweep(29) == ([], 3, 1)
        assert await sweep(1) == ([], 4, 1)
        # Mended: it goes through at its next try, and is forgotten.
        await pool.execute(_MENDED)
        clock.now_s += 80
        assert await lifecycle.finish_cut_short_payouts(ledger, router, (), retries) == ["broken"]
        assert await ledger.unfinished_payout_ids() == []
        assert await lifecycle.finish_cut_short_payouts(ledger, router, (), retries) == []
        assert retries.failed("broken") == (1, 10.0), "a payout completed is forgotten at the next sweep"
        paid = await pool.fetch(
            "SELECT payout_id, beneficiary_id, currency, amount_micros FROM payout_lines ORDER BY payout_id")
        assert [tuple(r) for r in paid] == [
            ("broken", "broken-root", "EUR", 2_000_000), ("outage", "outage-root", "USD", 2_000_000)]
    finally:
        await pool.close()


def test_a_payout_failing_on_a_bug_backs_off_and_one_failing_for_an_outage_does_not(database_url):
    asyncio.run(_cut_short_payouts(database_url))
