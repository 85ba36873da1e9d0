"""Versioned SQL migrations, applied in order at start, each exactly once."""

from __future__ import annotations

from importlib import resources

import asyncpg

# Any fixed key: serialises concurrent starters so two never migrate at once.
MIGRATION_LOCK_KEY = 0x6464_6D69_6772


def _migrations() -> list[tuple[int, str, str]]:
    folder = resources.files(__package__) / "migrations"
    found = []
    for item in folder.iterdir():
        if item.name.endswith(".sql"):
            version = int(item.name.split("_", 1)[0])
            found.append((version, item.name, item.read_text()))
    found.sort()
    assert len({v for v, _, _ in found}) == len(found), "duplicate migration version"
    return found


async def apply_migrations(conn: asyncpg.Connection) -> list[str]:
    """Apply what is missing; return the names applied now."""
    applied_now = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in _migrations():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
            applied_now.append(name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied_now

