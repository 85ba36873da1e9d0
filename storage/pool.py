"""Connection pools with explicit sizes and timeouts."""

from __future__ import annotations

import asyncpg

POOL_CONNECT_TIMEOUT_S = 10
POOL_COMMAND_TIMEOUT_S = 60  # the longest statement we run is a full approval sweep slice


async def open_pool(url: str, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        timeout=POOL_CONNECT_TIMEOUT_S,
        command_timeout=POOL_COMMAND_TIMEOUT_S,
        # JIT compilation costs more than it saves on our short statements.
        server_settings={"jit": "off", "application_name": "dailydoco"},
        reset=_keep_session,
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release a connection without asyncpg's reset round trip (UNLISTEN, RESET
    ALL, advisory unlock, CLOSE ALL): pool connections never hold session
    state here. LISTEN and the migration lock use their own connections, and
    asyncpg still rolls back a transaction left open before this runs."""
