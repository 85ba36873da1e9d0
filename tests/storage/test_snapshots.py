"""Snapshot.sees agrees with Postgres's own pg_visible_in_snapshot."""

import asyncio

import asyncpg

from dailydoco.storage.snapshots import Snapshot


def test_visibility_matches_postgres(simulation_database_url):
    async def run():
        conn = await asyncpg.connect(simulation_database_url)
        other = await asyncpg.connect(simulation_database_url)
        try:
            open_tx = other.transaction()
            await open_tx.start()
            in_flight = int(await other.fetchval("SELECT pg_current_xact_id()::text"))
            text = await conn.fetchval("SELECT pg_current_snapshot()::text")
            snap = Snapshot.parse(text)
            assert snap.text() == text and not snap.sees(in_flight)
            for xid in range(max(3, snap.xmin - 5), snap.xmax + 5):
                pg = await conn.fetchval("SELECT pg_visible_in_snapshot($1::text::xid8, $2::text::pg_snapshot)",
                                         str(xid), text)
                assert snap.sees(xid) == pg, xid
            await open_tx.rollback()
        finally:
            await conn.close()
            await other.close()
        assert not Snapshot.empty().sees(1)

    asyncio.run(run())
