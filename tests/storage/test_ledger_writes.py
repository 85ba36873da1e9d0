"""The purchase write paths and the approval sweep, against the real Postgres.

A small group of new ids is written by one statement; a group that meets an
id known already must undo that statement and go the general way, so that
every id still has one set of entries, one set of events, and the shards'
deltas count each purchase once. The sweep approves a due backlog in bounded
slices, oldest first. A write whose connection is lost, or whose database
never answers, says whether it may have committed.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from dailydoco.actors.routing import new_delta_set
from dailydoco.protocol import CommitOutcomeUnknown, IdempotencyConflict, ServiceUnavailable, TransactionRequest
from dailydoco.protocol.live import BalanceChanged, CommissionEarned, decode_events
from dailydoco.storage import ledger as ledger_module
from dailydoco.storage.deltas import PENDING
from dailydoco.storage.ledger import ONE_STATEMENT_PURCHASES_MAX, Ledger, PreparedPurchase, purchase_hash
from dailydoco.storage.pool import OUT_OF_RESOURCES_RETRY_AFTER_S, open_pool
from dailydoco.storage.sharding import vshard_of
from tests.conftest import migrated_database
from tests.postgres_faults import Fault, FaultyPostgresProxy, disk_full

SHARDS = 2
ROOT, MIDDLE, BUYER = "w-root", "w-middle", "w-buyer"  # BUYER's upline: MIDDLE, ROOT


HOLD_S = 3_600


def _own_database(name: str):
    """A module fixture: a fresh database with every migration applied, for one test."""
    @pytest.fixture(scope="module")
    def database_url(servers):
        return asyncio.run(migrated_database(servers[0], f"dailydoco_ledger_{name}"))
    return database_url


ledger_database_url = _own_database("writes")
sweep_database_url = _own_database("sweeps")
lost_answers_database_url = _own_database("lost_answers")
unanswered_writes_database_url = _own_database("unanswered_writes")
out_of_room_database_url = _own_database("out_of_room")


async def _insert_users(pool) -> None:
    for user, upline in ((ROOT, []), (MIDDLE, [ROOT]), (BUYER, [MIDDLE, ROOT])):
        await pool.execute(
            "INSERT INTO users (user_id, referral_code, referrer_id, upline, vshard, body_hash, created_at)"
            " VALUES ($1, $2, $3, $4, $5, '\\x00', now())",
            user, user.upper(), upline[0] if upline else None, upline, vshard_of(user))


def _purchase(tid: str, amount_micros: int = 10_000_000) -> PreparedPurchase:
    request = TransactionRequest(transaction_id=tid, user_id=BUYER, amount_micros=amount_micros)
    return PreparedPurchase(request, purchase_hash(request), (MIDDLE, ROOT))


async def _scenario(url: str) -> None:
    pool = await open_pool(url, max_size=2)
    try:
        await _insert_users(pool)
        ledger = Ledger(pool, hold_period_s=HOLD_S)

        # All new: one statement, so one xid for every row it wrote.
        first = new_delta_set(SHARDS)
        xid, first_outcomes = await ledger.write_purchases([_purchase("w-1"), _purchase("w-2")], first)
        assert [o.result.status for o in first_outcomes] == ["created", "created"]
        assert await pool.fetchval("SELECT array_agg(DISTINCT xid) FROM commission_ledger") == [xid]
        assert await pool.fetchval("SELECT array_agg(DISTINCT xid) FROM transactions") == [xid]
        assert first.for_user(ROOT).event_seqs[ROOT] == (1, 3)  # two commissions, one balance change

        # New-looking, but w-1 is known: replayed, and written nothing again.
        second = new_delta_set(SHARDS)
        group = [_purchase("w-3"), _purchase("w-1"), _purchase("w-4")]
        assert len(group) <= ONE_STATEMENT_PURCHASES_MAX  # the one-statement path is tried first
        _, outcomes = await ledger.write_purchases(group, second)
        assert [o.result.status for o in outcomes] == ["created", "replayed", "created"]
        assert outcomes[1].result.commissions == first_outcomes[0].result.commissions
        entries = dict(await pool.fetch(
            "SELECT transaction_id, count(*) FROM commission_ledger GROUP BY transaction_id"))
        assert entries == {"w-1": 2, "w-2": 2, "w-3": 2, "w-4": 2}
        # The deltas hold this write's purchases only: w-3 and w-4, 10 % each to ROOT (level 2).
        assert second.for_user(ROOT).balances[(ROOT, "USD")][PENDING] == 2 * 1_000_000

        # A known id with another body is a conflict; its neighbours are written.
        _, outcomes = await ledger.write_purchases([_purchase("w-5"), _purchase("w-2", 20_000_000)],
                                                   new_delta_set(SHARDS))
        assert outcomes[0].result.status == "created"
        assert isinstance(outcomes[1].error, IdempotencyConflict)

        # ROOT's stream: offsets 1.. with no gap and no repeat, one earned event per purchase.
        rows = await pool.fetch("SELECT first_seq, events FROM outbox WHERE user_id = $1 ORDER BY first_seq", ROOT)
        offsets, earned = [], []
        for row in rows:
            events = decode_events(bytes(row["events"]))
            offsets += range(row["first_seq"], row["first_seq"] + len(events))
            earned += [e.transaction_id for e in events if isinstance(e, CommissionEarned)]
            assert sum(isinstance(e, BalanceChanged) for e in events) == 1
        assert offsets == list(range(1, len(offsets) + 1))
        assert offsets[-1] == await pool.fetchval("SELECT last_seq FROM event_streams WHERE user_id = $1", ROOT)
        assert sorted(earned) == ["w-1", "w-2", "w-3", "w-4", "w-5"]
    finally:
        await pool.close()


def test_group_writes_record_each_purchase_once(ledger_database_url):
    asyncio.run(_scenario(ledger_database_url))


async def _sweeps(url: str, monkeypatch) -> None:
    pool = await open_pool(url, max_size=2)
    try:
        await _insert_users(pool)
        ledger = Ledger(pool, hold_period_s=HOLD_S)
        for group in (["s-1"], ["s-2", "s-3"], ["s-4"], ["s-5"]):  # 600 s apart
            await ledger.write_purchases([_purchase(tid) for tid in group], new_delta_set(SHARDS))
            await ledger.advance_clock(600)

        async def ids(status: str) -> list[str]:
            return [r[0] for r in await pool.fetch(
                "SELECT transaction_id FROM commission_ledger WHERE status = $1 ORDER BY entry_id", status)]

        await ledger.advance_clock(HOLD_S - 2_400 + 1)  # s-1's hold is over, not s-2's
        deltas = new_delta_set(SHARDS)
        assert (await ledger.approve_due(deltas))[1] == 2
        assert await ids("approved") == ["s-1", "s-1"]
        # s-1 pays MIDDLE 20 % and ROOT 10 % of 10 USD: ROOT's million moves.
        assert deltas.for_user(ROOT).balances[(ROOT, "USD")] == [-1_000_000, 1_000_000, 0]  # pending, approved, paid

        # s-2, s-3 and s-4 due: six entries, in slices of three, oldest first.
        await ledger.advance_clock(1_200)
        monkeypatch.setattr(ledger_module, "APPROVAL_SWEEP_ROWS_MAX", 3)
        assert (await ledger.approve_due(new_delta_set(SHARDS)))[1] == 3
        assert await ids("pending") == ["s-3", "s-4", "s-4", "s-5", "s-5"]
        assert [(await ledger.approve_due(new_delta_set(SHARDS)))[1] for _ in range(2)] == [3, 0]
        assert await ids("pending") == ["s-5", "s-5"]
        assert await pool.fetchval("SELECT count(*) FROM ledger_transitions WHERE to_status = 'approved'") == 8
    finally:
        await pool.close()


def test_approval_sweep_moves_only_due_entries_in_bounded_slices(sweep_database_url, monkeypatch):
    asyncio.run(_sweeps(sweep_database_url, monkeypatch))


async def _lost_answers(url: str) -> None:
    pool = await open_pool(url, max_size=2)
    proxy = FaultyPostgresProxy(url)
    proxied = await open_pool(await proxy.start(), max_size=1)
    try:
        await _insert_users(pool)
        ledger, through_proxy = Ledger(pool, hold_period_s=HOLD_S), Ledger(proxied, hold_period_s=HOLD_S)

        async def recorded(tid: str) -> bool:
            return await pool.fetchval("SELECT count(*) FROM transactions WHERE transaction_id = $1", tid) == 1

        # The one statement of a small group commits it: its answer lost,
        # the outcome is unknown, and the error names the server process.
        proxy.fail("INSERT INTO transactions", Fault.REPLY_LOST)
        with pytest.raises(CommitOutcomeUnknown) as unknown:
            await through_proxy.write_purchases([_purchase("lost-1")], new_delta_set(SHARDS))
        assert unknown.value.status == 503 and unknown.value.backend_pid
        await ledger.settle(unknown.value.backend_pid)
        assert await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                                   unknown.value.backend_pid) == 0
        assert await recorded("lost-1")  # the proxy cut the connection after the commit

        # Its request lost, the same statement never reached the server: the
        # outcome is just as unknown to the writer, and settling shows it
        # was not written.
        proxy.fail("INSERT INTO transactions", Fault.REQUEST_LOST)
        with pytest.raises(CommitOutcomeUnknown) as unknown:
            await through_proxy.write_purchases([_purchase("unsent-1")], new_delta_set(SHARDS))
        await ledger.settle(unknown.value.backend_pid)
        assert not await recorded("unsent-1")

        # In a transaction (a large group), an answer lost before COMMIT was
        # sent means nothing was written; the COMMIT's own answer lost, unknown.
        group = [_purchase(f"lost-big-{i}") for i in range(ONE_STATEMENT_PURCHASES_MAX + 1)]
        proxy.fail("INSERT INTO transactions", Fault.REPLY_LOST)
        with pytest.raises(ServiceUnavailable) as unavailable:
            await through_proxy.write_purchases(group, new_delta_set(SHARDS))
        assert type(unavailable.value) is ServiceUnavailable and not await recorded("lost-big-0")
        proxy.fail("COMMIT", Fault.REPLY_LOST)
        with pytest.raises(CommitOutcomeUnknown) as unknown:
            await through_proxy.write_purchases(group, new_delta_set(SHARDS))
        await ledger.settle(unknown.value.backend_pid)
        assert await recorded("lost-big-0")

        # Settling a process that already exited returns at once.
        await asyncio.wait_for(ledger.settle(unknown.value.backend_pid), 1)
    finally:
        proxied.terminate()
        await proxy.close()
        await pool.close()


def test_a_lost_answer_says_whether_the_write_may_have_committed(lost_answers_database_url):
    asyncio.run(_lost_answers(lost_answers_database_url))


UNANSWERED_COMMAND_TIMEOUT_S = 1.0  # the proxied pool's (the engine's is POOL_COMMAND_TIMEOUT_S)
UNANSWERED_RAISE_WAIT_S = 5.0  # the timeout, and room for asyncpg's cancel request and a loaded machine


async def _unanswered_writes(url: str) -> None:
    pool = await open_pool(url, max_size=2)
    proxy = FaultyPostgresProxy(url)
    proxied = await open_pool(await proxy.start(), max_size=1, command_timeout_s=UNANSWERED_COMMAND_TIMEOUT_S)
    try:
        await _insert_users(pool)
        ledger, through_proxy = Ledger(pool, hold_period_s=HOLD_S), Ledger(proxied, hold_period_s=HOLD_S)

        def big_group(prefix: str) -> list[PreparedPurchase]:  # written in a transaction, committed by COMMIT
            return [_purchase(f"{prefix}-{i}") for i in range(ONE_STATEMENT_PURCHASES_MAX + 1)]

        # (fault, the statement it meets, the write, what the writer hears, whether it was written)
        cases = [
            (Fault.REPLY_HELD, "INSERT INTO transactions", [_purchase("held-reply")], CommitOutcomeUnknown, True),
            (Fault.REQUEST_HELD, "INSERT INTO transactions", [_purchase("held-request")], CommitOutcomeUnknown, False),
            (Fault.REPLY_HELD, "INSERT INTO transactions", big_group("held-insert"), ServiceUnavailable, False),
            (Fault.REPLY_HELD, "COMMIT", big_group("held-commit-reply"), CommitOutcomeUnknown, True),
            (Fault.REQUEST_HELD, "COMMIT", big_group("held-commit"), CommitOutcomeUnknown, False),
        ]
        for fault, statement, purchases, heard, written in cases:
            case = f"{fault.name} at {statement!r}, {len(purchases)} purchases"
            proxy.fail(statement, fault)
            started = time.monotonic()
            with pytest.raises(ServiceUnavailable) as raised:
                await through_proxy.write_purchases(purchases, new_delta_set(SHARDS))
            waited_s = time.monotonic() - started
            assert proxy.fired.is_set() and type(raised.value) is heard, (case, raised.value)
            assert UNANSWERED_COMMAND_TIMEOUT_S <= waited_s < UNANSWERED_RAISE_WAIT_S, (case, waited_s)
            if heard is CommitOutcomeUnknown:
                await ledger.settle(raised.value.backend_pid)
            ids = [p.request.transaction_id for p in purchases]
            assert await pool.fetchval("SELECT count(*) FROM transactions WHERE transaction_id = ANY($1::text[])",
                                       ids) == (len(ids) if written else 0), case
            # The same write sent again, as a client retries a 503, replays or makes it.
            _, outcomes = await through_proxy.write_purchases(purchases, new_delta_set(SHARDS))
            assert {o.result.status for o in outcomes} == {"replayed" if written else "created"}, case
    finally:
        proxied.terminate()
        await proxy.close()
        await pool.close()


def test_a_write_the_database_never_answers_gives_up_and_says_whether_it_may_have_committed(
        unanswered_writes_database_url):
    """A network that drops packets without closing, or a hung server: the
    writer hears nothing back. The pool's command timeout ends the wait,
    and the error says, as for a cut connection, whether the write may have
    committed; settled, the ledger says whether it did."""
    asyncio.run(_unanswered_writes(unanswered_writes_database_url))


async def _out_of_room(url: str) -> None:
    pool = await open_pool(url, max_size=2)
    try:
        await _insert_users(pool)
        make_disk_full, make_room = disk_full(on_insert="full-insert-", at_commit="full-commit-")
        await pool.execute(make_disk_full)
        ledger = Ledger(pool, hold_period_s=HOLD_S)

        def group(prefix: str, size: int) -> list[PreparedPurchase]:
            return [_purchase(f"{prefix}{i}") for i in range(size)]

        # One statement, a transaction refused at an insert, a transaction
        # refused at its COMMIT: each a whole refusal, retryable, not unknown.
        for purchases in (group("full-insert-small-", 2), group("full-insert-big-", ONE_STATEMENT_PURCHASES_MAX + 1),
                          group("full-commit-big-", ONE_STATEMENT_PURCHASES_MAX + 1)):
            case = purchases[0].request.transaction_id
            with pytest.raises(ServiceUnavailable) as raised:
                await ledger.write_purchases(purchases + [_purchase(f"room-{case}")], new_delta_set(SHARDS))
            assert type(raised.value) is ServiceUnavailable, (case, raised.value)
            assert raised.value.retry_after_s == OUT_OF_RESOURCES_RETRY_AFTER_S, case
            assert "out of room (DiskFullError)" in raised.value.detail, (case, raised.value.detail)
            assert await pool.fetchval("SELECT count(*) FROM transactions") == 0, case
            assert await pool.fetchval("SELECT count(*) FROM commission_ledger") == 0, case
        # Room again: the first of them goes through.
        await pool.execute(make_room)
        _, outcomes = await ledger.write_purchases(group("full-insert-small-", 2), new_delta_set(SHARDS))
        assert [o.result.status for o in outcomes] == ["created", "created"]
    finally:
        await pool.close()


def test_a_database_out_of_room_refuses_the_whole_write_and_says_retry_later(out_of_room_database_url):
    """The disk full (SQLSTATE 53100, as Postgres reports it), at an insert
    or at the commit: nothing of the write is recorded, and the writer hears
    ServiceUnavailable with a Retry-After, not an internal error (it was one
    before session 34) and not an unknown outcome: an error at COMMIT is a
    rollback."""
    asyncio.run(_out_of_room(out_of_room_database_url))
