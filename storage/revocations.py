"""The SQL of token revocations (migration 003)."""

from __future__ import annotations

import datetime as dt

import asyncpg

from .pool import connection


async def revoke_tokens(pool: asyncpg.Pool, user_id: str, at: dt.datetime) -> dt.datetime:
    """Refuse the user's tokens issued at or before `at`; returns the instant
    now in force (a concurrent later revocation wins)."""
    async with connection(pool) as conn:
        return await conn.fetchval(
            """INSERT INTO token_revocations (user_id, revoked_before) VALUES ($1, $2)
               ON CONFLICT (user_id) DO UPDATE
                 SET revoked_before = greatest(token_revocations.revoked_before, excluded.revoked_before)
               RETURNING revoked_before""",
            user_id, at)


async def revocations_since(pool: asyncpg.Pool, since: dt.datetime) -> dict[str, dt.datetime]:
    """Revocations that can still matter: those after the oldest unexpired token's issue."""
    async with connection(pool) as conn:
        rows = await conn.fetch(
            "SELECT user_id, revoked_before FROM token_revocations WHERE revoked_before > $1", since)
    return {row["user_id"]: row["revoked_before"] for row in rows}
