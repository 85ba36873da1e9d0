"""The supervisor keeps the ledger's months made as time passes, with no
restart and no clock move (see storage/partitions.py)."""

from __future__ import annotations

import time

from dailydoco.actors.supervisor import PARTITION_CHECK_INTERVAL_S
from dailydoco.storage.partitions import DEFAULT_PARTITION, LEDGER_MONTHS_AHEAD
from tests.conftest import MONTHS_KEPT_SQL

from .conftest import query, unique

DAY_S = 86_400


def test_the_supervisor_makes_the_ledgers_months_as_time_passes(api, engine):
    """Months pass as a long uptime passes them: the engine's clock is moved
    in Postgres, past every month made so far, by no API call (a clock move
    makes them itself). Within a check the supervisor makes the new month and
    those ahead of it; a purchase lands in its month's partition, and the
    default partition holds nothing, as /metrics says. Until session 41 months were made only
    at start and at a clock move, and from the fourth month of an uptime the
    ledger wrote into the default, for good."""
    root, buyer = api.chain(2, prefix="months")
    query(engine, "execute", "UPDATE engine_clock SET offset_us = offset_us + $1",
          (LEDGER_MONTHS_AHEAD + 2) * 31 * DAY_S * 1_000_000)
    wanted = [r[0] for r in query(engine, "fetch", MONTHS_KEPT_SQL, 0.0, LEDGER_MONTHS_AHEAD)]
    deadline = time.monotonic() + 3 * PARTITION_CHECK_INTERVAL_S
    while missing := [name for name in wanted if query(engine, "fetchval", "SELECT to_regclass($1)", name) is None]:
        assert time.monotonic() < deadline, f"the supervisor did not make {missing}"
        time.sleep(0.5)
    tid = unique("months")
    assert api.purchase(buyer, 5_000_000, tid).status_code == 201
    assert query(engine, "fetchval", "SELECT array_agg(DISTINCT tableoid::regclass::text) FROM commission_ledger"
                 " WHERE transaction_id = $1", tid) == [wanted[0]]
    assert query(engine, "fetchval", f"SELECT count(*) FROM {DEFAULT_PARTITION}") == 0
    api.backlog_until(lambda backlog: backlog.get("dailydoco_ledger_partitions_missing") == 0
                      and backlog.get("dailydoco_ledger_default_partition_rows") == 0)
    assert api.balance(root)["pending_micros"] == 1_000_000
