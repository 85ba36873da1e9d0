"""The outbox's backlog as /metrics reports it, against the real Postgres."""

from __future__ import annotations

import asyncio

from dailydoco.storage import outbox
from dailydoco.storage.pool import open_pool
from tests.conftest import migrated_database


def test_the_backlog_counts_waiting_rows_up_to_its_cap_and_ages_the_oldest(servers):
    async def main():
        pool = await open_pool(await migrated_database(servers[0], "dailydoco_outbox_backlog"), max_size=2)
        try:
            assert await outbox.backlog(pool) == (0, 0.0)
            for user, written_s_ago in (("a", 30), ("b", 1), ("c", 0), ("d", 0)):
                await pool.execute(
                    "INSERT INTO outbox (user_id, first_seq, events, created_at, written_at)"
                    " VALUES ($1, 1, '', now(), clock_timestamp() - make_interval(secs => $2))", user, written_s_ago)
            rows, oldest_age_s = await outbox.backlog(pool)
            assert rows == 4 and 30 <= oldest_age_s < 40
            assert (await outbox.backlog(pool, count_max=3))[0] == 3
            await pool.execute("DELETE FROM outbox WHERE user_id = 'a'")  # published
            rows, oldest_age_s = await outbox.backlog(pool)
            assert rows == 3 and 1 <= oldest_age_s < 10
        finally:
            await pool.close()

    asyncio.run(main())
