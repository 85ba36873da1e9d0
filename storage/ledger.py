"""The durable ledger: every write the API acknowledges commits here first.

One class owns all SQL against the ledger tables. Each write method runs in one
Postgres transaction, returns the xid of that transaction, and fills a
`DeltaSet` with exactly what the write changes in the shards' memory.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import functools
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from itertools import count, repeat
from typing import Annotated, NamedTuple, TypeVar

import asyncpg
import msgspec

from dailydoco.protocol import (
    COMMISSION_STATUSES,
    LEVEL_RATES_BP,
    LEVELS_MAX,
    CommissionEntryView,
    CommissionLine,
    CommissionPage,
    CommitOutcomeUnknown,
    Currency,
    IdempotencyConflict,
    InvalidRequest,
    NotFound,
    PayoutLine,
    PayoutRequest,
    PayoutTotal,
    PayoutView,
    RefundExceedsPurchase,
    RefundRequest,
    RefundResult,
    ReversalLine,
    ServiceUnavailable,
    TransactionRequest,
    TransactionResult,
    UserId,
    proportional_reversal,
    split_commission,
)

from dailydoco.protocol.live import (
    CommissionApproved,
    CommissionEarned,
    CommissionPaid,
    CommissionReversed,
    ReferralJoined,
)

from .deltas import BUCKET_OF_STATUS, PENDING, DeltaSet, UserRecord
from .outbox import APPENDED_SELECT, OutboxRow, OutboxWriter, append_ctes
from .pool import OUT_OF_RESOURCES_RETRY_AFTER_S, connection, connection_lost, out_of_resources
from .sharding import vshard_of

T = TypeVar("T")
P = TypeVar("P")
WRITE_ATTEMPTS_MAX = 5
APPROVAL_SWEEP_ROWS_MAX = 50_000  # per sweep transaction: bounds lock time and memory
# For the approval sweep's update: its slice of up to APPROVAL_SWEEP_ROWS_MAX
# entries is found in the ledger again by primary key, one probe an entry.
# Postgres would rather hash the slice and read the whole ledger past it, at
# a cost that grows with the ledger: with 12,000,000 entries a slice took
# 4.22 to 5.12 s that way against 2.38 to 3.26 by probes (session 52; see
# the README's Benchmark), and the planner still chose the scan. Only for
# that statement: SET LOCAL would last to the end of the transaction, and
# TO DEFAULT gives the rest of it the session's own settings back.
_JOIN_BY_KEY_PROBES = "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off"
_JOINS_AS_CONFIGURED = "SET LOCAL enable_hashjoin TO DEFAULT; SET LOCAL enable_mergejoin TO DEFAULT"
# Approved entries per payout transaction: at most 0.84 s of locks per slice
# here, in payouts of 1 to 3.5 million entries, and 1.62 s for the first part
# of one beneficiary's 2 million (migration 010 says why not one transaction;
# 011, why a beneficiary with more is paid in parts).
PAYOUT_SLICE_ENTRIES = 20_000
# Groups up to this many purchases, all new, are written by one statement;
# larger ones in a transaction whose entries go by COPY. Measured against
# Postgres on this machine (the write path alone, client and server CPU per
# group): 1 purchase 0.26 + 0.42 ms against 0.86 + 0.66 in a transaction;
# 10: 0.6 + 1.2 against 1.2 + 1.4; even near 100; at 2,000 Postgres spends
# 83 us a purchase on INSERT ... SELECT against COPY's 60 (COPY inserts in bulk).
ONE_STATEMENT_PURCHASES_MAX = 64
COPY_COLUMNS = (
    "xid", "transaction_id", "beneficiary_id", "vshard", "level", "rate_bp", "amount_micros", "currency",
    "kind", "status", "created_status", "created_at", "hold_until",
)
# dd_require's SQLSTATE (migration 006): a statement that found its assumption
# false aborted itself, and wrote nothing.
REQUIREMENT_FAILED_SQLSTATE = "DD001"
SETTLE_BACKOFF_S = (0.05, 0.1, 0.2, 0.5, 1.0)  # while the database does not answer
# How long one settle round waits for a terminated server process to exit
# (it may be finishing a commit, fsync included) before asking again.
SETTLE_EXIT_WAIT_MS = 1_000


def body_hash(*fields: object) -> bytes:
    """Fingerprint of a request body, to tell a replay from a reused id."""
    return hashlib.blake2b(msgspec.msgpack.encode(fields), digest_size=16).digest()


def purchase_hash(request: TransactionRequest) -> bytes:
    return body_hash(request.user_id, request.amount_micros, request.currency, request.kind)


class PreparedPurchase(NamedTuple):
    request: TransactionRequest
    body_hash: bytes
    upline: tuple[str, ...]


class PurchaseOutcome(NamedTuple):
    result: TransactionResult | None
    error: Exception | None


def _result(transaction_id: str, status: str, user_id: str, amount_micros: int, currency: str,
            commissions: list[CommissionLine], house_micros: int) -> TransactionResult:
    return TransactionResult(transaction_id=transaction_id, status=status, user_id=user_id, amount_micros=amount_micros,
                             currency=currency, commissions=commissions, house_micros=house_micros)


def _retry_aborted(write):
    """Rerun a write that Postgres aborted to resolve a lock conflict.

    The deltas of the aborted attempt are discarded, so nothing it computed
    reaches memory. Locks are taken in id order everywhere, which makes these
    rare; they remain possible between unrelated statements.
    """

    @functools.wraps(write)
    async def retrying(self, *args):
        deltas: DeltaSet = args[-1]
        for attempt in range(WRITE_ATTEMPTS_MAX):
            deltas.by_route.clear()
            try:
                return await write(self, *args)
            except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
                if attempt == WRITE_ATTEMPTS_MAX - 1:
                    raise
                await asyncio.sleep(0.001 * 2**attempt)

    return retrying


# This transaction's xid and engine time (see Ledger.begin_write).
_CLOCK_QUERY = (
    "SELECT pg_current_xact_id()::text::bigint AS xid,"
    " now() + make_interval(secs => offset_us / 1e6) AS now FROM engine_clock"
)


def _transaction_columns(purchases: list[PreparedPurchase], house_micros: list[int]) -> tuple[list, ...]:
    """Parameters $1..$7 of `_TRANSACTIONS_CTE`."""
    reqs = [p.request for p in purchases]
    return ([r.transaction_id for r in reqs], [r.user_id for r in reqs], [r.amount_micros for r in reqs],
            [r.currency for r in reqs], [r.kind for r in reqs], [p.body_hash for p in purchases], house_micros)


# CTE `inserted`: the ids, of the transactions $1..$7, that were new.
_TRANSACTIONS_CTE = (
    "inserted AS (INSERT INTO transactions (transaction_id, user_id, amount_micros, currency, kind,"
    " body_hash, house_micros, created_at, xid)"
    " SELECT t.*, clock.now, clock.xid FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[],"
    " $5::text[], $6::bytea[], $7::bigint[]) AS t, clock"
    " ON CONFLICT (transaction_id) DO NOTHING RETURNING transaction_id)"
)


# CTE `entries`: new commissions, the columns of _CommissionBook.entries as
# $8..$14 and the holding period as $15, stamped from CTE `clock`: the rows
# the general path COPYs.
_ENTRIES_CTE = (
    f"entries AS (INSERT INTO commission_ledger ({', '.join(COPY_COLUMNS)})"
    " SELECT clock.xid, e.*, 'commission', 'pending', 'pending', clock.now, clock.now + $15::interval"
    " FROM unnest($8::text[], $9::text[], $10::smallint[], $11::smallint[], $12::integer[], $13::bigint[],"
    " $14::text[]) AS e, clock RETURNING 1)"
)


# The general path, in a transaction: its xid, its time, and which ids were new.
_INSERT_TRANSACTIONS_SQL = (
    "WITH clock AS (" + _CLOCK_QUERY + "), " + _TRANSACTIONS_CTE
    + " SELECT clock.xid, clock.now, ARRAY(SELECT transaction_id FROM inserted) FROM clock"
)
# All new ids: transactions, entries and outbox in one statement, which
# requires that all $20 transactions were new (and all $21 entries written).
# Its error aborts the statement and everything its CTEs wrote. Checked where
# the outbox CTEs start, so that the inserts run before the stream rows are
# locked; and in the final SELECT, which runs even when there is no event.
_ALL_NEW = ("dd_require((SELECT count(*) FROM inserted) = $20 AND (SELECT count(*) FROM entries) = $21,"
            " 'a transaction id in the group is known')")
_NEW_PURCHASES_SQL = (
    "WITH clock AS (" + _CLOCK_QUERY + "), " + _TRANSACTIONS_CTE + ", " + _ENTRIES_CTE + ", "
    + append_ctes(16, "(SELECT now FROM clock)", only_if=_ALL_NEW)
    + " SELECT clock.xid, clock.now, " + _ALL_NEW + ", appended.* FROM clock, (" + APPENDED_SELECT + ") AS appended"
)


class _CommissionBook:
    """What a group of new purchases pays, for both write paths: ledger
    entries (the columns of `_ENTRIES_CTE`), live events, and the shards'
    balance and revenue changes."""

    __slots__ = ("entries", "outbox", "_pending", "_revenue")

    def __init__(self, outbox: OutboxWriter):
        # transaction_id, beneficiary_id, vshard, level, rate_bp, amount_micros, currency
        self.entries: tuple[list, ...] = ([], [], [], [], [], [], [])
        self.outbox = outbox
        # Summed per beneficiary here, handed to the deltas once each: the
        # top of a referral tree is in nearly every purchase's upline.
        self._pending: dict[tuple[str, str], int] = {}
        self._revenue: dict[tuple[str, str], list[int]] = {}

    def add(self, purchase: PreparedPurchase, paid: list[int], house_micros: int) -> TransactionResult:
        req = purchase.request
        tid, currency, amount = req.transaction_id, req.currency, req.amount_micros
        tids, beneficiaries, vshards, levels, rates, amounts, currencies = self.entries
        lines = []
        for level, (beneficiary, micros) in enumerate(zip(purchase.upline, paid, strict=True), start=1):
            key = (beneficiary, currency)
            revenue = self._revenue.get(key)
            if revenue is None:
                revenue = self._revenue[key] = [0] * LEVELS_MAX
            revenue[level - 1] += amount
            if micros == 0:
                continue  # a share that floors to nothing is no entry; the house keeps the fraction
            rate = LEVEL_RATES_BP[level - 1]
            tids.append(tid)
            beneficiaries.append(beneficiary)
            vshards.append(vshard_of(beneficiary))
            levels.append(level)
            rates.append(rate)
            amounts.append(micros)
            currencies.append(currency)
            lines.append(CommissionLine(level=level, beneficiary_id=beneficiary, rate_bp=rate, amount_micros=micros))
            self.outbox.add(beneficiary, CommissionEarned(transaction_id=tid, level=level, rate_bp=rate,
                                                          amount_micros=micros, currency=currency))
            self._pending[key] = self._pending.get(key, 0) + micros
        return _result(tid, "created", req.user_id, amount, currency, lines, house_micros)

    def to_deltas(self, deltas: DeltaSet) -> None:
        for (beneficiary, currency), micros in self._pending.items():
            deltas.for_user(beneficiary).add_balance(beneficiary, currency, PENDING, micros)
        for (beneficiary, currency), levels in self._revenue.items():
            deltas.for_user(beneficiary).add_revenue_levels(beneficiary, currency, levels)


# Hands a committed write's outbox rows to its process's LivePublisher.
PublishEvents = Callable[[list[OutboxRow]], None]


class Ledger:
    def __init__(self, pool: asyncpg.Pool, hold_period_s: int, publish_events: PublishEvents | None = None):
        self.pool = pool
        self.hold_period = dt.timedelta(seconds=hold_period_s)
        # Without one, the relay publishes this process's events, a grace period late.
        self.publish_events = publish_events

    def _committed(self, outbox: OutboxWriter) -> None:
        """A write committed: its events can go live."""
        if self.publish_events is not None and outbox.appended:
            self.publish_events(outbox.appended)

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[tuple[asyncpg.Connection, OutboxWriter]]:
        """A write transaction, and the outbox of its events, published once
        it commits (not when it rolls back: the code after `yield` runs only
        when the block, and so the commit, succeeded)."""
        outbox = OutboxWriter()
        async with self._write_connection() as conn:
            transaction = conn.transaction()
            await transaction.start()
            try:
                yield conn, outbox
            except BaseException:
                await transaction.rollback()
                raise
            await self._commit(conn, transaction.commit)
        self._committed(outbox)

    @contextlib.asynccontextmanager
    async def _write_connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pool connection for one write, or for a read that a write
        waits on (see storage.pool.connection: a connection that failed is
        closed). Should the connection fail, or the database be out of room
        (disk, memory, connection slots), the write is ServiceUnavailable:
        it wrote nothing (a commit whose connection failed is
        CommitOutcomeUnknown instead, see _commit)."""
        try:
            async with connection(self.pool) as conn:
                yield conn
        except Exception as exc:
            if out_of_resources(exc):
                raise ServiceUnavailable(
                    f"the database is out of room ({type(exc).__name__}); nothing was written, retry with the same id",
                    retry_after_s=OUT_OF_RESOURCES_RETRY_AFTER_S,
                ) from exc
            if isinstance(exc, CommitOutcomeUnknown) or not connection_lost(exc):
                raise
            raise ServiceUnavailable(
                f"the database connection failed ({type(exc).__name__}); nothing was written, retry with the same id",
                retry_after_s=1,
            ) from exc

    @staticmethod
    async def _commit(conn: asyncpg.Connection, commit: Callable[[], Awaitable[T]]) -> T:
        """Run the request that commits a write. Once it is sent, a lost
        connection no longer means nothing was written: the server may have
        committed and its answer been lost. That is CommitOutcomeUnknown,
        which names the server process that ran the write (see settle)."""
        backend_pid = conn.get_server_pid()
        try:
            return await commit()
        except (asyncpg.InterfaceError, asyncpg.InternalClientError):
            raise  # asyncpg refused to send it (the connection was closed or broken already): nothing committed
        except Exception as exc:
            if not connection_lost(exc):
                raise  # the server refused the write: it rolled back
            unknown = CommitOutcomeUnknown(
                f"the database connection was lost while this write committed ({type(exc).__name__}), so it may"
                " have been recorded; retry with the same id to learn its outcome", retry_after_s=1)
            unknown.backend_pid = backend_pid
            raise unknown from exc

    async def settle(self, backend_pid: int) -> None:
        """Return once the server process that ran a write of unknown outcome
        has exited, so that the write is, for good, committed or not, and
        the ledger says which. The process is terminated if it still runs:
        its client is gone, so it can only finish or abort what it had.
        Retries until the database answers."""
        for attempt in count():
            try:
                async with connection(self.pool) as conn:
                    exited = await conn.fetchval(
                        "SELECT coalesce(bool_and(pg_terminate_backend(pid, $2)), true)"
                        " FROM pg_stat_activity WHERE pid = $1",
                        backend_pid, SETTLE_EXIT_WAIT_MS,
                    )
                if exited:
                    return
            except Exception as exc:
                if not connection_lost(exc):
                    raise
            await asyncio.sleep(SETTLE_BACKOFF_S[min(attempt, len(SETTLE_BACKOFF_S) - 1)])

    # --- time ----------------------------------------------------------------

    @staticmethod
    async def begin_write(conn: asyncpg.Connection) -> tuple[int, dt.datetime]:
        """Assign this transaction its xid and read engine time, in one trip.

        Engine time is the database's clock plus the adjustable offset, so
        every process stamps rows from one clock that tests can move.
        """
        row = await conn.fetchrow(_CLOCK_QUERY)
        return row["xid"], row["now"]

    async def engine_now(self) -> tuple[dt.datetime, int]:
        row = await self.pool.fetchrow(
            "SELECT now() + make_interval(secs => offset_us / 1e6) AS now, offset_us FROM engine_clock"
        )
        return row["now"], row["offset_us"] // 1_000_000

    async def advance_clock(self, seconds: int) -> None:
        await self.pool.execute("UPDATE engine_clock SET offset_us = offset_us + $1", seconds * 1_000_000)

    # --- users ---------------------------------------------------------------

    async def find_referrer(self, referral_code: str) -> tuple[str, tuple[str, ...]] | None:
        async with self._write_connection() as conn:  # a registration waits on it
            row = await conn.fetchrow("SELECT user_id, upline FROM users WHERE referral_code = $1", referral_code)
        return None if row is None else (row["user_id"], tuple(row["upline"]))

    async def get_user(self, user_id: str) -> UserRecord | None:
        async with self._write_connection() as conn:  # a registration waits on it
            row = await conn.fetchrow(
                "SELECT user_id, referral_code, referrer_id, upline, created_at, body_hash FROM users"
                " WHERE user_id = $1", user_id)
        return None if row is None else UserRecord(*row.values())

    async def insert_user(
        self,
        user_id: str,
        referral_code: str,
        referrer_id: str | None,
        upline: tuple[str, ...],
        hash_: bytes,
        deltas: DeltaSet,
    ) -> tuple[int | None, UserRecord | None]:
        """Insert a new user: its xid and record, or (None, None) if the id or the code is taken."""
        async with self._write() as (conn, outbox):
            xid, now = await self.begin_write(conn)
            inserted = await conn.fetchval(
                "INSERT INTO users (user_id, referral_code, referrer_id, upline, vshard, body_hash, created_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING RETURNING true",
                user_id, referral_code, referrer_id, list(upline), vshard_of(user_id), hash_, now,
            )
            if not inserted:
                return None, None
            record = UserRecord(user_id, referral_code, referrer_id, upline, now, hash_)
            deltas.for_user(user_id).users.append(record)
            for level, ancestor in enumerate(upline, start=1):
                deltas.for_user(ancestor).joins.append((ancestor, level, 1))
                outbox.add(ancestor, ReferralJoined(member_id=user_id, level=level))
            if upline:
                await outbox.count_joins(conn, upline)
            await outbox.flush(conn, now, deltas)
        return xid, record

    async def uplines(self, user_ids: list[str]) -> dict[str, tuple[str, ...]]:
        async with self._write_connection() as conn:  # a group of purchases waits on it
            rows = await conn.fetch("SELECT user_id, upline FROM users WHERE user_id = ANY($1::text[])", user_ids)
        return {r["user_id"]: tuple(r["upline"]) for r in rows}

    # --- purchases -----------------------------------------------------------

    async def write_purchases(
        self, purchases: list[PreparedPurchase], deltas: DeltaSet
    ) -> tuple[int | None, list[PurchaseOutcome]]:
        """Durably record purchases and their commissions in one transaction.

        A transaction id seen before (here or in this group) replays the first
        result when the body matches, and is a conflict otherwise.

        A small group of new ids (nearly every one) is written by one
        statement, committed on its own: one round trip where a transaction
        takes five (BEGIN, insert, COPY, outbox, COMMIT), which is most of a
        small group's cost in both processes. Should an id be known after all
        (a retry, a concurrent duplicate), that statement undoes itself and
        the group goes the general way.
        """
        if len(purchases) <= ONE_STATEMENT_PURCHASES_MAX and (
            len({p.request.transaction_id for p in purchases}) == len(purchases)
        ):
            try:
                return await self._write_new_purchases(purchases, deltas)
            except asyncpg.PostgresError as exc:
                if exc.sqlstate != REQUIREMENT_FAILED_SQLSTATE:
                    raise
        return await self._write_purchases_in_transaction(purchases, deltas)

    @_retry_aborted
    async def _write_new_purchases(
        self, purchases: list[PreparedPurchase], deltas: DeltaSet
    ) -> tuple[int, list[PurchaseOutcome]]:
        """Everything computed first, then one statement, which requires that
        every id was new: else it raises REQUIREMENT_FAILED_SQLSTATE."""
        # Insert in id order: two groups holding overlapping ids then wait
        # on each other in the same order instead of deadlocking.
        order = sorted(range(len(purchases)), key=lambda i: purchases[i].request.transaction_id)
        splits = [split_commission(p.request.amount_micros, len(p.upline)) for p in purchases]
        book = _CommissionBook(OutboxWriter())
        outcomes: list[PurchaseOutcome | None] = [None] * len(purchases)
        for i in order:
            outcomes[i] = PurchaseOutcome(book.add(purchases[i], *splits[i]), None)
        book.to_deltas(deltas)
        outbox_rows = book.outbox.rows(deltas)
        async with self._write_connection() as conn:
            xid, now, _, *appended = await self._commit(conn, functools.partial(
                conn.fetchrow, _NEW_PURCHASES_SQL,
                *_transaction_columns([purchases[i] for i in order], [splits[i][1] for i in order]),
                *book.entries, self.hold_period, *outbox_rows.params(), len(purchases), len(book.entries[0]),
            ))
        book.outbox.record_appended(deltas, outbox_rows, now, tuple(appended))
        self._committed(book.outbox)
        return xid, outcomes  # type: ignore[return-value]

    @_retry_aborted
    async def _write_purchases_in_transaction(
        self, purchases: list[PreparedPurchase], deltas: DeltaSet
    ) -> tuple[int | None, list[PurchaseOutcome]]:
        outcomes: list[PurchaseOutcome | None] = [None] * len(purchases)
        seen_ids: set[str] = set()
        fresh: list[int] = []
        seen_before: list[int] = []  # resolved against the recorded row, after the insert
        for i, p in enumerate(purchases):
            tid = p.request.transaction_id
            (seen_before if tid in seen_ids else fresh).append(i)
            seen_ids.add(tid)

        fresh.sort(key=lambda i: purchases[i].request.transaction_id)  # id order, as above
        splits = {i: split_commission(purchases[i].request.amount_micros, len(purchases[i].upline)) for i in fresh}
        async with self._write() as (conn, outbox):
            xid, now, inserted_ids = await conn.fetchrow(
                _INSERT_TRANSACTIONS_SQL,
                *_transaction_columns([purchases[i] for i in fresh], [splits[i][1] for i in fresh]),
            )
            inserted = set(inserted_ids)
            book = _CommissionBook(outbox)
            for i in fresh:
                if purchases[i].request.transaction_id not in inserted:
                    seen_before.append(i)
                    continue
                outcomes[i] = PurchaseOutcome(book.add(purchases[i], *splits[i]), None)
            book.to_deltas(deltas)
            if book.entries[0]:
                n, hold_until = len(book.entries[0]), now + self.hold_period
                await conn.copy_records_to_table("commission_ledger", columns=COPY_COLUMNS, records=zip(
                    repeat(xid, n), *book.entries, repeat("commission", n), repeat("pending", n),
                    repeat("pending", n), repeat(now, n), repeat(hold_until, n)))
            if seen_before:
                await self._replay_purchases(conn, purchases, seen_before, outcomes)
            await outbox.flush(conn, now, deltas)

        return xid, outcomes  # type: ignore[return-value]

    async def _replay_purchases(self, conn, purchases, indexes, outcomes) -> None:
        ids = [purchases[i].request.transaction_id for i in indexes]
        rows = {
            r["transaction_id"]: r
            for r in await conn.fetch(
                "SELECT transaction_id, user_id, amount_micros, currency, body_hash, house_micros"
                " FROM transactions WHERE transaction_id = ANY($1::text[])",
                ids,
            )
        }
        lines: dict[str, list[CommissionLine]] = {tid: [] for tid in ids}
        for r in await conn.fetch(
            "SELECT transaction_id, level, beneficiary_id, rate_bp, amount_micros FROM commission_ledger"
            " WHERE transaction_id = ANY($1::text[]) AND kind = 'commission' ORDER BY level",
            ids,
        ):
            lines[r["transaction_id"]].append(
                CommissionLine(level=r["level"], beneficiary_id=r["beneficiary_id"], rate_bp=r["rate_bp"],
                               amount_micros=r["amount_micros"])
            )
        for i in indexes:
            p = purchases[i]
            row = rows[p.request.transaction_id]
            if bytes(row["body_hash"]) != p.body_hash:
                outcomes[i] = PurchaseOutcome(None, IdempotencyConflict(
                    f"transaction {p.request.transaction_id!r} was already recorded with a different body"))
            else:
                outcomes[i] = PurchaseOutcome(
                    _result(row["transaction_id"], "replayed", row["user_id"], row["amount_micros"],
                            row["currency"].strip(), lines[p.request.transaction_id], row["house_micros"]), None)

    # --- refunds -------------------------------------------------------------

    @_retry_aborted
    async def refund(
        self, transaction_id: str, request: RefundRequest, deltas: DeltaSet
    ) -> tuple[int | None, RefundResult]:
        """Reverse, proportionally, exactly the commissions this purchase paid."""
        # The reason joins the body compared on replay only when given: a
        # refund recorded without one keeps the fingerprint it always had.
        given = (transaction_id, request.amount_micros)
        hash_ = body_hash(*given) if request.reason is None else body_hash(*given, request.reason)
        async with self._write() as (conn, outbox):
            xid, now = await self.begin_write(conn)
            tx = await conn.fetchrow(
                "SELECT t.amount_micros, t.refunded_micros, t.house_micros, t.currency, u.upline"
                " FROM transactions t JOIN users u USING (user_id)"
                " WHERE t.transaction_id = $1 FOR UPDATE OF t",
                transaction_id,
            )
            if tx is None:
                raise NotFound(f"transaction {transaction_id!r} does not exist")
            # Under the row lock, so two deliveries of one refund id serialise.
            earlier = await conn.fetchrow(
                "SELECT transaction_id, body_hash FROM refunds WHERE refund_id = $1", request.refund_id
            )
            if earlier is not None:
                if earlier["transaction_id"] != transaction_id or bytes(earlier["body_hash"]) != hash_:
                    raise IdempotencyConflict(f"refund {request.refund_id!r} was already recorded with a different body")
                return None, await self._refund_result(conn, request.refund_id, "replayed")
            purchase, before = tx["amount_micros"], tx["refunded_micros"]
            after = before + request.amount_micros
            if after > purchase:
                raise RefundExceedsPurchase(
                    f"refund of {request.amount_micros} micros exceeds the {purchase - before} micros"
                    f" still refundable on transaction {transaction_id!r}"
                )
            currency = tx["currency"].strip()
            originals = await conn.fetch(
                "SELECT entry_id, beneficiary_id, vshard, level, rate_bp, amount_micros, status, hold_until"
                " FROM commission_ledger WHERE transaction_id = $1 AND kind = 'commission' ORDER BY entry_id FOR UPDATE",
                transaction_id,
            )
            records = []
            for e in originals:
                micros = proportional_reversal(e["amount_micros"], purchase, before, after)
                if micros == 0:
                    continue
                if e["status"] in ("pending", "approved"):
                    # Still unpaid: the reversal travels with its commission.
                    kind, status, hold_until = "refund", e["status"], e["hold_until"]
                else:
                    # Paid already: a negative entry, payable now, netted next payout.
                    kind, status, hold_until = "clawback", "approved", now
                records.append(
                    (transaction_id, request.refund_id, e["entry_id"], e["beneficiary_id"], e["vshard"], e["level"],
                     e["rate_bp"], -micros, currency, kind, status, status, now, hold_until)
                )
                deltas.for_user(e["beneficiary_id"]).add_balance(
                    e["beneficiary_id"], currency, BUCKET_OF_STATUS[status], -micros)
                outbox.add(e["beneficiary_id"], CommissionReversed(
                    transaction_id=transaction_id, refund_id=request.refund_id, level=e["level"], kind=kind,
                    amount_micros=-micros, currency=currency))
            for level, ancestor in enumerate(tx["upline"], start=1):
                deltas.for_user(ancestor).add_revenue(ancestor, currency, level, -request.amount_micros)
            house_reversal = proportional_reversal(tx["house_micros"], purchase, before, after)
            recorded = await conn.fetchval(
                "INSERT INTO refunds (refund_id, transaction_id, amount_micros, refunded_before_micros,"
                " house_reversal_micros, body_hash, created_at, reason) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                " ON CONFLICT (refund_id) DO NOTHING RETURNING true",
                request.refund_id, transaction_id, request.amount_micros, before, house_reversal, hash_, now,
                request.reason,
            )
            if not recorded:
                # The same id, sent at the same moment for another purchase
                # (one purchase's deliveries serialise on its row above), was
                # recorded first. Raising rolls this write back whole.
                raise IdempotencyConflict(f"refund {request.refund_id!r} was already recorded for another transaction")
            await conn.execute(
                "UPDATE transactions SET refunded_micros = $2 WHERE transaction_id = $1", transaction_id, after
            )
            if records:
                await conn.copy_records_to_table(
                    "commission_ledger",
                    records=records,
                    columns=("transaction_id", "refund_id", "reverses_entry_id", "beneficiary_id", "vshard", "level",
                             "rate_bp", "amount_micros", "currency", "kind", "status", "created_status", "created_at",
                             "hold_until"),
                )
            if after == purchase:
                # Fully refunded: unpaid commissions and their reversals net to
                # zero; they end as 'refunded' and leave every bucket.
                await self._transition(
                    conn, deltas, now, "refunded", None,
                    "transaction_id = $1 AND kind IN ('commission', 'refund') AND status IN ('pending', 'approved')",
                    transaction_id,
                )
            await outbox.flush(conn, now, deltas)
            return xid, await self._refund_result(conn, request.refund_id, "created")

    async def _refund_result(self, conn, refund_id: str, status: str) -> RefundResult:
        r = await conn.fetchrow(
            "SELECT r.transaction_id, r.amount_micros, r.refunded_before_micros, r.house_reversal_micros, r.reason"
            " FROM refunds r WHERE refund_id = $1",
            refund_id,
        )
        # Through the index by transaction: refund_id has none, and a scan of
        # the whole ledger per refund grows with every purchase ever made.
        lines = await conn.fetch(
            "SELECT level, beneficiary_id, amount_micros, kind FROM commission_ledger"
            " WHERE transaction_id = $2 AND refund_id = $1 ORDER BY level",
            refund_id, r["transaction_id"],
        )
        return RefundResult(
            refund_id=refund_id,
            transaction_id=r["transaction_id"],
            status=status,
            amount_micros=r["amount_micros"],
            refunded_total_micros=r["refunded_before_micros"] + r["amount_micros"],
            reversals=[ReversalLine(level=x["level"], beneficiary_id=x["beneficiary_id"],
                                    amount_micros=x["amount_micros"], kind=x["kind"]) for x in lines],
            house_reversal_micros=r["house_reversal_micros"],
            reason=r["reason"],
        )

    async def _transition(self, conn, deltas: DeltaSet, now, to_status: str, payout_id: str | None,
                          where: str, *args, order_limit: str = "ORDER BY entry_id") -> list[asyncpg.Record]:
        """Move the matching entries to `to_status`, journalled in ledger_transitions.

        Rows are locked in `order_limit`'s order. Writers that lock the same
        rows in different orders deadlock (and are retried): a transaction's
        entries share one hold_until, so on them entry_id order and
        (hold_until, entry_id) order agree."""
        n = len(args)
        rows = await conn.fetch(
            f"""
            WITH moved AS (
                UPDATE commission_ledger l SET status = CASE
                    WHEN ${n + 1}::text = 'paid' AND l.kind = 'clawback' THEN 'reversed' ELSE ${n + 1}::text END
                FROM (SELECT entry_id, created_at, status AS from_status FROM commission_ledger
                      WHERE {where} {order_limit} FOR UPDATE) old
                WHERE l.entry_id = old.entry_id AND l.created_at = old.created_at
                RETURNING l.entry_id, l.beneficiary_id, l.vshard, l.currency, l.amount_micros, old.from_status, l.status
            )
            INSERT INTO ledger_transitions (entry_id, beneficiary_id, vshard, currency, amount_micros,
                                            from_status, to_status, payout_id, created_at)
            SELECT entry_id, beneficiary_id, vshard, currency, amount_micros, from_status, status, ${n + 2}, ${n + 3}
            FROM moved
            RETURNING beneficiary_id, currency, amount_micros, from_status, to_status
            """,
            *args, to_status, payout_id, now,
        )
        for r in rows:
            deltas.for_user(r["beneficiary_id"]).move_balance(
                r["beneficiary_id"], r["currency"].strip(), r["from_status"], r["to_status"], r["amount_micros"])
        return rows

    # --- lifecycle -----------------------------------------------------------

    @_retry_aborted
    async def approve_due(self, deltas: DeltaSet) -> tuple[int | None, int]:
        """Approve one bounded slice of commissions whose holding period ended."""
        async with self._write() as (conn, outbox):
            xid, now = await self.begin_write(conn)
            await conn.execute(_JOIN_BY_KEY_PROBES)
            rows = await self._transition(
                conn, deltas, now, "approved", None,
                "status = 'pending' AND hold_until <= $1", now, APPROVAL_SWEEP_ROWS_MAX,
                # Oldest due first, down the pending index, in lock order: a
                # backlog drains in the order it fell due.
                order_limit="ORDER BY hold_until, entry_id LIMIT $2",
            )
            await conn.execute(_JOINS_AS_CONFIGURED)
            approved: dict[tuple[str, str], list[int]] = {}  # (user, currency) -> [micros, entries]
            for r in rows:
                total = approved.setdefault((r["beneficiary_id"], r["currency"].strip()), [0, 0])
                total[0] += r["amount_micros"]
                total[1] += 1
            for (user_id, currency), (micros, entries) in approved.items():
                outbox.add(user_id, CommissionApproved(currency=currency, amount_micros=micros, entries=entries))
            await outbox.flush(conn, now, deltas)
            return (xid if rows else None), len(rows)

    async def open_payout(self, request: PayoutRequest) -> bool:
        """Record a payout's id, or find it recorded with the same body (a
        different body is IdempotencyConflict); returns whether it is complete."""
        hash_ = body_hash(request.payout_id, request.currency)
        async with self._write() as (conn, _):
            _, now = await self.begin_write(conn)
            inserted = await conn.fetchval(
                "INSERT INTO payouts (payout_id, currency, body_hash, created_at) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT DO NOTHING RETURNING true",
                request.payout_id, request.currency, hash_, now,
            )
            if inserted:
                return False
            earlier = await conn.fetchrow(
                "SELECT body_hash, completed_at FROM payouts WHERE payout_id = $1", request.payout_id)
            if bytes(earlier["body_hash"]) != hash_:
                raise IdempotencyConflict(f"payout {request.payout_id!r} was already made with a different body")
            return earlier["completed_at"] is not None

    @_retry_aborted
    async def pay_payout_slice(self, payout_id: str, deltas: DeltaSet) -> tuple[int | None, str]:
        """Pay the payout's next beneficiaries, in (beneficiary, currency)
        order, up to PAYOUT_SLICE_ENTRIES approved entries, in one
        transaction: each whose entries net above zero gets a line, and its
        entries are marked paid. A beneficiary with more entries than that is
        paid in parts, a slice each (_pay_part). Returns "more" while
        beneficiaries remain, "completed" when this slice found none after
        its own, and "completed_before" when another delivery of the payout
        had. Entries approved for a key the payout has passed are left for
        the next payout."""
        async with self._write() as (conn, outbox):
            xid, now = await self.begin_write(conn)
            # Slices of one payout, sent twice at once, take turns here.
            head = await conn.fetchrow(
                "SELECT currency, paid_through_beneficiary, paid_through_currency, part_beneficiary, part_currency,"
                " part_clawbacks, part_after_entry, completed_at FROM payouts WHERE payout_id = $1 FOR UPDATE",
                payout_id,
            )
            if head["completed_at"] is not None:
                return None, "completed_before"
            if head["part_beneficiary"] is not None:
                key = (head["part_beneficiary"], head["part_currency"].strip())
                await self._pay_part(conn, outbox, deltas, now, payout_id, key, head["part_clawbacks"],
                                     head["part_after_entry"])
                await outbox.flush(conn, now, deltas)
                return xid, "more"
            currency = head["currency"] and head["currency"].strip()
            after = (head["paid_through_beneficiary"], head["paid_through_currency"])
            # The next PAYOUT_SLICE_ENTRIES + 1 entries' keys, down the index
            # in key order: a count per key (GROUP BY) was planned as a scan
            # of every approved entry after the last slice, in every slice.
            window = await conn.fetch(
                "SELECT beneficiary_id, currency FROM commission_ledger"
                " WHERE status = 'approved' AND ($1::text IS NULL OR currency = $1)"
                " AND (beneficiary_id, currency) > ($2, $3)"
                " ORDER BY beneficiary_id, currency LIMIT $4",
                currency, *after, PAYOUT_SLICE_ENTRIES + 1,
            )
            keys = list(dict.fromkeys((r["beneficiary_id"], r["currency"].strip()) for r in window))
            completed = len(window) <= PAYOUT_SLICE_ENTRIES
            if not completed and len(keys) == 1:
                # One key, with more entries than a slice: paid in parts.
                await self._begin_parts(conn, outbox, deltas, now, payout_id, keys[0])
                await outbox.flush(conn, now, deltas)
                return xid, "more"
            # A full window ends inside its last key's entries, or just
            # before more of them: that key waits for the next slice.
            taken = len(keys) if completed else len(keys) - 1
            if taken:
                through = keys[taken - 1]
                await self._pay_key_range(conn, outbox, deltas, now, payout_id, currency, after, through)
                await self._paid_through(conn, payout_id, through)
            if completed:
                await conn.execute("UPDATE payouts SET completed_at = $2 WHERE payout_id = $1", payout_id, now)
            await outbox.flush(conn, now, deltas)
            return xid, "completed" if completed else "more"

    @staticmethod
    async def _paid_through(conn, payout_id: str, key: tuple[str, str]) -> None:
        await conn.execute(
            "UPDATE payouts SET paid_through_beneficiary = $2, paid_through_currency = $3, part_beneficiary = NULL,"
            " part_currency = NULL, part_clawbacks = false, part_after_entry = 0 WHERE payout_id = $1",
            payout_id, *key,
        )

    async def _begin_parts(self, conn, outbox: OutboxWriter, deltas: DeltaSet, now, payout_id: str,
                           key: tuple[str, str]) -> None:
        """Net a key too big for one slice, as a slice would (without locks:
        the parts keep the line above zero, whatever changes meanwhile); pay
        its first part if it nets above zero, or pass it by."""
        net = await conn.fetchval(
            "SELECT sum(amount_micros) FROM commission_ledger"
            " WHERE status = 'approved' AND beneficiary_id = $1 AND currency = $2",
            *key,
        )
        if net is None or net <= 0:
            await self._paid_through(conn, payout_id, key)
            return
        await conn.execute(
            "UPDATE payouts SET part_beneficiary = $2, part_currency = $3 WHERE payout_id = $1", payout_id, *key)
        await self._pay_part(conn, outbox, deltas, now, payout_id, key, False, 0)

    async def _pay_part(self, conn, outbox: OutboxWriter, deltas: DeltaSet, now, payout_id: str,
                        key: tuple[str, str], clawbacks: bool, after_entry: int) -> None:
        """Pay the next part of a key paid in parts: up to
        PAYOUT_SLICE_ENTRIES of its approved commissions, in entry order,
        added to its line; once they are paid, its clawbacks, each only while
        the line stays above zero. A clawback left over (approved while the
        payout ran, more than the line) stays approved, for the next payout,
        as one approved just after a payout does. Entries approved behind the
        part paid last wait for the next payout."""
        rows = await conn.fetch(
            "SELECT entry_id, created_at, amount_micros FROM commission_ledger"
            " WHERE status = 'approved' AND beneficiary_id = $1 AND currency = $2 AND entry_id > $3"
            " AND (amount_micros < 0) = $4 ORDER BY entry_id LIMIT $5 FOR UPDATE",
            *key, after_entry, clawbacks, PAYOUT_SLICE_ENTRIES,
        )
        line = await conn.fetchval(
            "SELECT amount_micros FROM payout_lines WHERE payout_id = $1 AND beneficiary_id = $2 AND currency = $3",
            payout_id, *key,
        ) or 0
        taken = []
        for r in rows:
            if clawbacks and line + r["amount_micros"] <= 0:
                break
            line += r["amount_micros"]
            taken.append(r)
        if taken:
            await self._mark_paid(conn, deltas, now, payout_id, taken)
        if line > 0:  # zero only while every commission paid so far was of zero micros
            await conn.execute(
                "INSERT INTO payout_lines (payout_id, beneficiary_id, currency, amount_micros) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (payout_id, beneficiary_id, currency) DO UPDATE SET amount_micros = EXCLUDED.amount_micros",
                payout_id, *key, line,
            )
        if len(rows) == PAYOUT_SLICE_ENTRIES and len(taken) == len(rows):
            await conn.execute("UPDATE payouts SET part_clawbacks = $2, part_after_entry = $3 WHERE payout_id = $1",
                               payout_id, clawbacks, rows[-1]["entry_id"])
        elif not clawbacks:  # its commissions are paid: its clawbacks next, in this slice
            await self._pay_part(conn, outbox, deltas, now, payout_id, key, True, 0)
        else:
            await self._paid_through(conn, payout_id, key)
            if line > 0:
                outbox.add(key[0], CommissionPaid(payout_id=payout_id, currency=key[1], amount_micros=line))

    async def _pay_key_range(self, conn, outbox: OutboxWriter, deltas: DeltaSet, now, payout_id: str,
                             currency: str | None, after: tuple[str, str], through: tuple[str, str]) -> None:
        """Pay every positive net of the approved entries keyed after
        `after`, up to and with `through`."""
        # Lock the entries first, then net: rows a concurrent refund changes
        # are re-read after its commit, never half-seen.
        approved = await conn.fetch(
            "SELECT entry_id, created_at, beneficiary_id, currency, amount_micros FROM commission_ledger"
            " WHERE status = 'approved' AND ($1::text IS NULL OR currency = $1)"
            " AND (beneficiary_id, currency) > ($2, $3) AND (beneficiary_id, currency) <= ($4, $5)"
            " ORDER BY entry_id FOR UPDATE",
            currency, *after, *through,
        )
        net: dict[tuple[str, str], int] = {}
        for r in approved:
            key = (r["beneficiary_id"], r["currency"].strip())
            net[key] = net.get(key, 0) + r["amount_micros"]
        payable = {key: micros for key, micros in net.items() if micros > 0}
        if not payable:
            return
        await conn.copy_records_to_table(
            "payout_lines", records=[(payout_id, b, c, m) for (b, c), m in payable.items()],
            columns=("payout_id", "beneficiary_id", "currency", "amount_micros"),
        )
        # The entries netted above (a racing refund's reversal or a sweep's
        # approvals since that SELECT's snapshot are not among them).
        paid = [r for r in approved if (r["beneficiary_id"], r["currency"].strip()) in payable]
        await self._mark_paid(conn, deltas, now, payout_id, paid)
        for (b, c), m in payable.items():
            outbox.add(b, CommissionPaid(payout_id=payout_id, currency=c, amount_micros=m))

    async def _mark_paid(self, conn, deltas: DeltaSet, now, payout_id: str, entries: list[asyncpg.Record]) -> None:
        """Mark paid exactly `entries` (locked and netted by the caller), by
        their keys: chosen again by status, the move would also take entries
        approved since the caller's SELECT, which no line paid."""
        await self._transition(
            conn, deltas, now, "paid", payout_id,
            "(entry_id, created_at) IN (SELECT * FROM unnest($1::bigint[], $2::timestamptz[]))",
            [r["entry_id"] for r in entries], [r["created_at"] for r in entries],
        )

    async def unfinished_payout_ids(self) -> list[str]:
        """Payouts opened and not completed, oldest first."""
        async with connection(self.pool) as conn:
            rows = await conn.fetch(
                "SELECT payout_id FROM payouts WHERE completed_at IS NULL ORDER BY created_at, payout_id")
        return [r["payout_id"] for r in rows]

    async def payout_view(self, payout_id: str, cursor: str | None, limit: int) -> PayoutView | None:
        """A payout and one page of its lines; None if there is no such payout."""
        after = _decode_cursor(cursor, _PayoutLinePosition) if cursor else ("", "")
        async with connection(self.pool) as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            head = await conn.fetchrow(
                "SELECT currency, created_at, completed_at FROM payouts WHERE payout_id = $1", payout_id)
            if head is None:
                return None
            totals = await conn.fetch(
                "SELECT currency, count(*) AS beneficiaries, sum(amount_micros)::bigint AS amount_micros"
                " FROM payout_lines WHERE payout_id = $1 GROUP BY currency ORDER BY currency",
                payout_id,
            )
            lines = await conn.fetch(
                "SELECT beneficiary_id, currency, amount_micros FROM payout_lines"
                " WHERE payout_id = $1 AND (beneficiary_id, currency) > ($2, $3)"
                " ORDER BY beneficiary_id, currency LIMIT $4",
                payout_id, *after, limit + 1,
            )
        last = lines[limit - 1] if len(lines) > limit else None
        return PayoutView(
            payout_id=payout_id,
            currency=head["currency"] and head["currency"].strip(),
            created_at=head["created_at"],
            completed_at=head["completed_at"],
            totals=[PayoutTotal(currency=t["currency"].strip(), beneficiaries=t["beneficiaries"],
                                amount_micros=t["amount_micros"]) for t in totals],
            lines=[PayoutLine(beneficiary_id=r["beneficiary_id"], currency=r["currency"].strip(),
                              amount_micros=r["amount_micros"]) for r in lines[:limit]],
            next_cursor=None if last is None else _encode_cursor((last["beneficiary_id"], last["currency"].strip())),
        )

    # --- reads ---------------------------------------------------------------

    async def commissions_page(
        self, user_id: str, status: str | None, cursor: str | None, limit: int
    ) -> CommissionPage:
        if cursor:
            micros, entry_id = _decode_cursor(cursor, _EntryPosition)
            after = (_EPOCH + micros * _MICROSECOND, entry_id)
        else:
            after = None
        async with connection(self.pool) as conn:
            rows = await conn.fetch(
                _COMMISSIONS_PAGE, user_id, [status] if status else list(COMMISSION_STATUSES),
                after[0] if after else None, after[1] if after else None, limit + 1,
            )
        items = [
            CommissionEntryView(**{**dict(r), "currency": r["currency"].strip()}) for r in rows[:limit]
        ]
        last = rows[limit - 1] if len(rows) > limit else None
        # Microseconds exactly, unlike a float timestamp.
        next_cursor = None if last is None else _encode_cursor(
            ((last["created_at"] - _EPOCH) // _MICROSECOND, last["entry_id"]))
        return CommissionPage(items=items, next_cursor=next_cursor)

    async def network_graph(self, root: str, depth: int, nodes_max: int) -> tuple[list[tuple[str, str, int]], bool]:
        """Referral edges below `root`, breadth first (by level, then user
        id), at most nodes_max; and whether there were more.

        Level by level: of each node's children only the first N by user id
        can be among the level's first N, and the index by (referrer, user)
        gives them in that order, so a level reads at most N rows per node of
        the level above, whatever the size of the network below. A recursive
        query walked the whole network to its depth before its LIMIT: 280 to
        319 ms at depth 3 and 678 to 744 ms at depth 7 for a user with 220,200
        below, against 19 to 24 ms this way (a probe, session 35); a small
        network's read takes up to 2 ms more, a round trip per level. Users
        are only ever added, so levels read one after another still form a
        tree that exists."""
        edges: list[tuple[str, str, int]] = []
        parents = [root]
        async with connection(self.pool) as conn:
            for level in range(1, depth + 1):
                wanted = nodes_max - len(edges) + 1  # one more than fits says there were more
                rows = await conn.fetch(_NEXT_LEVEL, parents, wanted) if parents else []
                edges += [(r["referrer_id"], r["user_id"], level) for r in rows]
                if len(edges) > nodes_max:
                    return edges[:nodes_max], True
                parents = [r["user_id"] for r in rows]
        return edges, False

    async def house_balances(self) -> dict[str, int]:
        async with connection(self.pool) as conn:
            rows = await conn.fetch("SELECT * FROM house_account")
        return {r["currency"].strip(): r["balance_micros"] for r in rows}


# $1's newest entries in any of the statuses $2, older than ($3, $4) where
# $3 is given, at most $5: the newest $5 of each status by the index by
# (beneficiary, status, time), merged. That index gives each status's
# entries in order, and scans of every month's partition start at their
# first match; filtering on status down an index without it read the whole
# ledger of a referral tree's top (migration 012).
_COMMISSIONS_PAGE = """
    SELECT page.* FROM unnest($2::text[]) AS wanted(status), LATERAL (
        SELECT entry_id, transaction_id, refund_id, level, rate_bp, amount_micros, currency, status, kind,
               created_at, hold_until
        FROM commission_ledger
        WHERE beneficiary_id = $1 AND status = wanted.status
          AND ($3::timestamptz IS NULL OR (created_at, entry_id) < ($3, $4))
        ORDER BY created_at DESC, entry_id DESC LIMIT $5
    ) AS page
    ORDER BY page.created_at DESC, page.entry_id DESC LIMIT $5
"""

# The first $2 children by user id of the nodes in $1 (network_graph).
_NEXT_LEVEL = """
    SELECT child.user_id, child.referrer_id FROM unnest($1::text[]) AS parent(user_id)
    CROSS JOIN LATERAL (
        SELECT user_id, referrer_id FROM users WHERE referrer_id = parent.user_id ORDER BY user_id LIMIT $2
    ) AS child
    ORDER BY child.user_id LIMIT $2
"""

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_MICROSECOND = dt.timedelta(microseconds=1)
# A cursor is a position in a list the client pages through, sent back by
# the client: anything of its position's type is a position to page from.
# A position in a user's entries is (created_at in microseconds, entry_id):
# a time Python cannot hold or an id past Postgres's bigint failed the read
# (500) until session 35. Every created_at came from Python, so this range
# holds every cursor we issue.
_EntryPosition = tuple[
    Annotated[int, msgspec.Meta(
        ge=(dt.datetime.min.replace(tzinfo=dt.timezone.utc) - _EPOCH) // _MICROSECOND,
        le=(dt.datetime.max.replace(tzinfo=dt.timezone.utc) - _EPOCH) // _MICROSECOND,
    )],
    Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)],
]
# A position in a payout's lines: (beneficiary_id, currency), of their
# patterns (a NUL, say, would fail the read in Postgres).
_PayoutLinePosition = tuple[UserId, Currency]


def _encode_cursor(position: tuple) -> str:
    return base64.urlsafe_b64encode(msgspec.msgpack.encode(position)).decode().rstrip("=")


def _decode_cursor(cursor: str, position_type: type[P]) -> P:
    try:
        return msgspec.msgpack.decode(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)), type=position_type)
    except (ValueError, msgspec.DecodeError) as exc:
        raise InvalidRequest("cursor is not one this server issued") from exc

