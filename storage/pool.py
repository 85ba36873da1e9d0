"""Connection pools with explicit sizes and timeouts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import asyncpg

from dailydoco.protocol import ServiceUnavailable

T = TypeVar("T")
POOL_CONNECT_TIMEOUT_S = 10
POOL_COMMAND_TIMEOUT_S = 60  # the longest statement we run is a full approval sweep slice
# The pools whose statements a request waits on: the commission chains',
# the shards' registrations', the supervisor's payouts and purchases, and
# the API replicas' reads. Their statements are purchases, refunds,
# registrations, payout slices and pages of reads, the longest of which (a
# payout slice of 20,000 entries) took 0.67 to 1.62 s here. A Postgres that
# stops answering then fails such a request within this, as a lost
# connection does (nothing written, or a write's outcome unknown once its
# commit was sent), rather than after 60 s: clients commonly give up at
# 30 s, having heard nothing. A request waits as long again, at most, for
# a connection of its pool: one held this long is held by a stall.
REQUEST_COMMAND_TIMEOUT_S = 10
# SQLSTATE classes of a lost connection or a server going away: connection
# exception, operator intervention (an administrator's or a crash's
# shutdown), system and internal error. Reported during a commit, they leave
# it unknown whether the commit happened (see Ledger._commit).
CONNECTION_LOST_SQLSTATE_CLASSES = ("08", "57", "58", "XX")


async def open_pool(url: str, min_size: int = 1, max_size: int = 4,
                    command_timeout_s: float = POOL_COMMAND_TIMEOUT_S) -> asyncpg.Pool:
    """A pool whose statements give up after `command_timeout_s`: an
    unanswered statement then raises TimeoutError, which connection_lost
    counts as a lost connection (an unanswered commit's outcome is unknown)."""
    return await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        timeout=POOL_CONNECT_TIMEOUT_S,
        command_timeout=command_timeout_s,
        # JIT compilation costs more than it saves on our short statements.
        server_settings={"jit": "off", "application_name": "dailydoco"},
        reset=_keep_session,
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release a connection without asyncpg's reset round trip (UNLISTEN, RESET
    ALL, advisory unlock, CLOSE ALL): pool connections never hold session
    state here. LISTEN and the migration lock use their own connections, and
    asyncpg still rolls back a transaction left open before this runs."""
# What a statement raises when its connection fails on the client's side:
# refused, reset, timed out, closed under it (InterfaceError), or terminated
# by the server while idle in the pool, which asyncpg reports as
# InternalClientError "cannot switch to state ..." (MagicStack/asyncpg#1069).
CLIENT_CONNECTION_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.InterfaceError, asyncpg.InternalClientError)
# Everything a statement can raise because the database failed: what loops
# that retry until it is back catch.
DATABASE_ERRORS = (*CLIENT_CONNECTION_ERRORS, asyncpg.PostgresError)


def connection_lost(exc: BaseException) -> bool:
    """Whether `exc` says the database connection failed, rather than the
    statement: on the client's side, or the server going away."""
    if isinstance(exc, asyncpg.PostgresError):
        return (exc.sqlstate or "")[:2] in CONNECTION_LOST_SQLSTATE_CLASSES
    return isinstance(exc, CLIENT_CONNECTION_ERRORS)


@contextlib.asynccontextmanager
async def connection(pool: asyncpg.Pool, acquire_timeout_s: float | None = REQUEST_COMMAND_TIMEOUT_S,
                     ) -> AsyncIterator[asyncpg.Connection]:
    """A connection of `pool`, waited for up to `acquire_timeout_s` (then
    TimeoutError, a lost connection's error: with the database answering, a
    request's connection comes free within a statement or two), and closed
    rather than handed back should it fail (its error, or that error's
    cause, a lost connection's).

    asyncpg can leave a connection that the server terminated in a state
    where every later use fails (MagicStack/asyncpg#1069). And the pool
    holds back a connection whose statement timed out until asyncpg's cancel
    request for it is answered: on a server that does not answer, up to the
    connect timeout more (a registration in a stalled Postgres was 503
    after 20.0 s so, not 10.0)."""
    async with pool.acquire(timeout=acquire_timeout_s) as conn:
        try:
            yield conn
        except Exception as exc:
            if connection_lost(exc) or (exc.__cause__ is not None and connection_lost(exc.__cause__)):
                with contextlib.suppress(asyncpg.InterfaceError):  # closed already, and out of the pool
                    conn.terminate()
            raise


# SQLSTATE class 53, insufficient resources: the disk full, memory out, every
# connection slot taken. The statement failed and wrote nothing (a commit
# record that cannot be written is a PANIC, which loses the connection), and
# the database may have room again soon: the caller should retry, later.
OUT_OF_RESOURCES_SQLSTATE_CLASS = "53"
OUT_OF_RESOURCES_RETRY_AFTER_S = 5  # room is made by an operator or a finishing job, not in a second


def out_of_resources(exc: BaseException) -> bool:
    """Whether `exc` is the database refusing a statement for want of disk,
    memory or connections: it wrote nothing, and retrying later may succeed."""
    return isinstance(exc, asyncpg.PostgresError) and (exc.sqlstate or "")[:2] == OUT_OF_RESOURCES_SQLSTATE_CLASS


_abandoned: set[asyncio.Task] = set()  # held here: the loop keeps only weak references to tasks


def _forget(task: asyncio.Task) -> None:
    _abandoned.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: what a wait given up on raised is of no interest


async def answered_within(query: Awaitable[T], timeout_s: float) -> T:
    """`await query` for up to `timeout_s`, then raise TimeoutError at once,
    leaving the query cancelled to end in the background.

    `asyncio.wait_for` also waits for the cancelled query to end, and asyncpg
    ends a query cancelled on a server that does not answer (stalled, or cut
    off without a reset) only once its command timeout is up: with Postgres
    stopped (SIGSTOP), a readiness check bounded at 2 s by `wait_for`
    answered after 62 s. A query's own `timeout=` is no better: asyncpg then
    sends a cancel request on a new connection, and waits out the connect
    timeout (10 s) on a server that does not accept it.
    """
    task = asyncio.ensure_future(query)
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        task.cancel()
        _abandoned.add(task)
        task.add_done_callback(_forget)
        raise TimeoutError(f"no answer within {timeout_s:g} s")
    return task.result()


def unavailable_for(exc: BaseException) -> ServiceUnavailable | None:
    """The 503 for `exc` where it says a service the request needed failed
    (a lost connection, the database out of room): nothing was written
    (writes that may have been say so themselves, see Ledger._commit), so
    the client retries. None for any other error. The API classes an
    actor's error that Ray carried to it (serve/app.py); a lane carries
    only EngineErrors, so its actor classes its own (actors/lane.py)."""
    if connection_lost(exc):
        return ServiceUnavailable(
            f"a service this request needs did not answer ({type(exc).__name__}); retry", retry_after_s=1)
    if out_of_resources(exc):
        return ServiceUnavailable(f"the database is out of room ({type(exc).__name__}); retry later",
                                  retry_after_s=OUT_OF_RESOURCES_RETRY_AFTER_S)
    return None
