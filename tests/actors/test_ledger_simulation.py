"""Seeded simulation of the ledger, VOPR-style.

Random registrations, purchases (with duplicate, conflicting and concurrent
deliveries), partial and full refunds, payouts, clock moves, checkpoints,
shard crashes, lost and doubled deliveries, the ledger's months made (their
rows moved out of the default partition) — driving the engine's own code
(registration, CommissionEngine, lifecycle, recovery, partitions) against
real Postgres.
After every step the rules are re-derived from first principles and compared
with both the ledger and every shard's memory. A failing case names its seed
(`-k "seed_17"` replays it exactly).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import multiprocessing
import os
import random
from fractions import Fraction

import asyncpg
import pytest

from dailydoco.actors import lifecycle
from dailydoco.actors.commission_core import CommissionEngine
from dailydoco.actors.recovery import checkpoint_all, recover_shard, user_state_from_ledger
from dailydoco.protocol.live import BalanceChanged, CommissionEarned, ReferralJoined, decode_events
from dailydoco.actors.registration import register_user
from dailydoco.protocol import (
    CommitOutcomeUnknown,
    IdempotencyConflict,
    PayoutRequest,
    RefundExceedsPurchase,
    RefundRequest,
    RegisterUserRequest,
    ServiceUnavailable,
    TransactionRequest,
)
from dailydoco.storage import ledger as ledger_module
from dailydoco.storage.ledger import Ledger
from dailydoco.storage.partitions import DEFAULT_PARTITION, ensure_ledger_partitions
from dailydoco.storage.pool import open_pool
from dailydoco.storage.sharding import VSHARDS, actor_of_vshard, vshard_of, vshards_of_actor

from ..conftest import SIMULATION_DATABASE, migrated_database
from ..postgres_faults import Fault, FaultyPostgresProxy

SEEDS = int(os.environ.get("DD_SIMULATION_SEEDS", "200"))
SEED_FIRST = int(os.environ.get("DD_SIMULATION_SEED_FIRST", "0"))  # a soak run can go past CI's seeds
STEPS_PER_SEED = int(os.environ.get("DD_SIMULATION_STEPS", "30"))
LEDGER_READS_PER_STEP = 3
SHARDS = 3
HOLD_PERIOD_S = 30 * 24 * 3600
RATES_BP = (2000, 1000, 500, 300, 200, 100, 50)  # restated here, not imported: the oracle is independent
CURRENCIES = ("USD", "EUR")
# Approved entries per payout transaction, one per seed: with a few, a payout
# is many slices, and nearly every beneficiary is paid in parts, which a
# crash can cut between and a second delivery, refunds and the approval
# sweep can interleave with.
PAYOUT_SLICE_ENTRIES = (1, 3, 20_000)
TABLES = ("users, transactions, refunds, commission_ledger, ledger_transitions, payouts, payout_lines, shard_checkpoints,"
          " event_streams, outbox")


class FaultyRouter:
    """Delivers to in-process shard states; can lose, double or reorder deliveries."""

    def __init__(self, states, rng, pool):
        self.states = states
        self.shard_count = len(states)
        self.rng = rng
        self.pool = pool
        self.lose_deliveries = False
        self.double_deliveries = False
        self.posted: list[tuple[int, int, object]] = []

    def post_one(self, shard_index, xid, delta):
        if not self.lose_deliveries:
            self.posted.append((shard_index, xid, delta))

    async def flush_posted(self):
        """Deliver what was posted, in a random order: deltas must commute."""
        posted, self.posted = self.posted, []
        self.rng.shuffle(posted)
        for shard_index, xid, delta in posted:
            await self.deliver_one(shard_index, xid, delta)

    async def deliver_one(self, shard_index, xid, delta):
        if self.lose_deliveries:
            return  # the writer "crashed" after its commit, before delivering
        state = self.states[shard_index]
        applied = state.apply(xid, delta)
        if self.double_deliveries:
            assert not state.apply(xid, delta), "a doubled delivery was applied twice"
        assert applied or state.recovered_at.sees(xid)

    async def reload(self, shard_index):
        self.states[shard_index] = await recover_shard(self.pool, vshards_of_actor(shard_index, SHARDS))


class Simulation:
    def __init__(self, seed: int, url: str, pool: asyncpg.Pool):
        self.seed = seed
        self.url = url
        self.rng = random.Random(seed)
        # Whether the partition upkeep runs at a step draws from a stream of
        # its own, so that seeds replay the scenarios they did before it.
        self.upkeep_rng = random.Random(f"{seed}-partitions")
        self.ledger_reads_rng = random.Random(f"{seed}-ledger-reads")  # likewise
        self.pool = pool
        self.ledger = Ledger(pool, HOLD_PERIOD_S)
        self.router = FaultyRouter([None] * SHARDS, self.rng, pool)
        # Two chains: concurrent deliveries of one id may meet different ones.
        self.chains = [CommissionEngine(self.ledger, self.router), CommissionEngine(self.ledger, self.router)]
        self.users: list[str] = []
        self.codes: dict[str, str] = {}
        self.purchases: dict[str, TransactionRequest] = {}
        self.purchases_drawn = 0  # numbers each new transaction id, so two never share one
        self.refunds: dict[str, tuple[str, RefundRequest]] = {}
        self.refunds_drawn = 0
        self.step_name = "start"
        self.faults: tuple[FaultyPostgresProxy, asyncpg.Pool] | None = None  # see lose_message

    def fail(self, message: str) -> str:
        return f"seed {self.seed}, step {self.step_name}: {message}"

    async def recover(self, index: int) -> None:
        await self.router.reload(index)

    async def close(self) -> None:
        if self.faults is not None:
            proxy, pool = self.faults
            pool.terminate()
            await proxy.close()

    # --- steps ---------------------------------------------------------------

    async def register(self) -> None:
        for _ in range(self.rng.randint(1, 6)):
            user = f"s{self.seed}-u{len(self.users)}"
            referrer = self.rng.choice(self.users) if self.users and self.rng.random() < 0.85 else None
            code = self.codes[referrer] if referrer else None
            if code and self.rng.random() < 0.3:
                code = code.lower()  # codes are case-insensitive on input
            view = await register_user(self.ledger, self.router, RegisterUserRequest(user_id=user, referral_code=code))
            assert view.referrer_id == referrer, self.fail("referrer not fixed from the code")
            replay = await register_user(self.ledger, self.router, RegisterUserRequest(user_id=user, referral_code=code))
            assert replay.status == "replayed" and replay.referral_code == view.referral_code
            self.users.append(user)
            self.codes[user] = view.referral_code

    async def concurrent_registrations(self) -> None:
        """One user registered twice at once, and once more with another
        referrer at the same moment: whichever body lands first is the user;
        its twin replays it, the other body is a 409."""
        if not self.users:
            return await self.register()
        user = f"s{self.seed}-u{len(self.users)}"
        referrer, other = self.rng.choice(self.users), self.rng.choice(self.users)
        same = RegisterUserRequest(user_id=user, referral_code=self.codes[referrer])
        different = RegisterUserRequest(user_id=user, referral_code=None if other == referrer else self.codes[other])
        outcomes = await asyncio.gather(*(register_user(self.ledger, self.router, r) for r in (same, same, different)),
                                        return_exceptions=True)
        same_won = not isinstance(outcomes[0], BaseException) or not isinstance(outcomes[1], BaseException)
        want = ["created", "replayed", IdempotencyConflict] if same_won else [IdempotencyConflict, IdempotencyConflict,
                                                                               "created"]
        got = [type(o) if isinstance(o, BaseException) else o.status for o in outcomes]
        if same_won:
            got[:2] = sorted(got[:2], key=str)
        assert got == want, self.fail(f"racing registrations: {outcomes}")
        view = next(o for o in outcomes if not isinstance(o, BaseException))
        winner_referrer = referrer if same_won else (other if different.referral_code else None)
        assert view.referrer_id == winner_referrer, self.fail("the user's referrer is not its first body's")
        self.users.append(user)
        self.codes[user] = view.referral_code

    def _new_purchase(self) -> TransactionRequest:
        # Numbered by a counter, not len(self.purchases): a step draws several
        # before any is recorded, and the random suffix alone let two of them
        # share an id (seed 1555 of a 2,000-seed soak: a 409 that was right).
        self.purchases_drawn += 1
        return TransactionRequest(
            transaction_id=f"s{self.seed}-t{self.purchases_drawn}-{self.rng.getrandbits(24)}",
            user_id=self.rng.choice(self.users),
            amount_micros=self.rng.choice([1, 7, 99, 1_000_001, 9_990_000, 123_456_789, 10**12]),
            currency=self.rng.choice(CURRENCIES),
        )

    async def purchase(self) -> None:
        if not self.users:
            return await self.register()
        fresh = [self._new_purchase() for _ in range(self.rng.randint(1, 25))]
        batch = list(fresh)
        known = list(self.purchases.values())
        for _ in range(self.rng.randint(0, 4)):  # duplicates, old and new
            batch.append(self.rng.choice(known + fresh))
        conflicting = None
        if known and self.rng.random() < 0.3:
            old = self.rng.choice(known)
            conflicting = TransactionRequest(transaction_id=old.transaction_id, user_id=old.user_id,
                                             amount_micros=old.amount_micros % 10**12 + 1, currency=old.currency)
            batch.append(conflicting)
        self.rng.shuffle(batch)
        # Split across both chains and run concurrently: one id may be
        # written by two chains at once.
        cut = self.rng.randint(0, len(batch))
        halves = [batch[:cut] + fresh[:2], batch[cut:] + fresh[:2]]
        results = await asyncio.gather(*(chain.submit(h) for chain, h in zip(self.chains, halves) if h))
        created: dict[str, int] = {}
        for half, outcomes in zip([h for h in halves if h], results):
            for req, outcome in zip(half, outcomes):
                if req is conflicting:
                    assert isinstance(outcome.error, IdempotencyConflict), self.fail("conflict not detected")
                    continue
                assert outcome.error is None, self.fail(f"unexpected error {outcome.error!r}")
                if outcome.result.status == "created":
                    created[req.transaction_id] = created.get(req.transaction_id, 0) + 1
                expected = self.purchases.get(req.transaction_id, req)
                assert outcome.result.amount_micros == expected.amount_micros
        for tid, n in created.items():
            assert n == 1 and tid not in self.purchases, self.fail(f"{tid} created {n} times")
        for req in fresh:
            assert req.transaction_id in created, self.fail(f"{req.transaction_id} never created")
            self.purchases[req.transaction_id] = req

    def _refund_id(self) -> str:
        self.refunds_drawn += 1
        return f"s{self.seed}-r{self.refunds_drawn}"

    async def _refundable(self, tid: str) -> tuple[int, int]:
        """(refunded so far, still refundable) of a purchase, as recorded."""
        refunded = await self.pool.fetchval("SELECT refunded_micros FROM transactions WHERE transaction_id = $1", tid)
        return refunded, self.purchases[tid].amount_micros - refunded

    async def _racing_refund(self) -> tuple[str, RefundRequest, int] | None:
        """A refund of some purchase with something left (its id, the request,
        what was refunded before), to race against other writes."""
        tid = self.rng.choice(list(self.purchases))
        refunded, refundable = await self._refundable(tid)
        if not refundable:
            return None
        return tid, RefundRequest(refund_id=self._refund_id(), amount_micros=self.rng.randint(1, refundable)), refunded

    async def refund(self) -> None:
        if not self.purchases:
            return await self.purchase()
        if self.refunds and self.rng.random() < 0.2:  # replay an earlier refund
            tid, req = self.rng.choice(list(self.refunds.values()))
            before = await self._ledger_rows()
            result = await self.chains[0].refund(tid, req)
            assert result.status == "replayed" and await self._ledger_rows() == before, self.fail("refund replay wrote")
            return
        tid = self.rng.choice(list(self.purchases))
        refunded, remaining = await self._refundable(tid)
        roll = self.rng.random()
        if roll < 0.15 or remaining == 0:
            amount = remaining + self.rng.randint(1, 10)
            req = RefundRequest(refund_id=self._refund_id(), amount_micros=amount)
            before = await self._ledger_rows()
            with pytest.raises(RefundExceedsPurchase):
                await self.chains[1].refund(tid, req)
            assert await self._ledger_rows() == before, self.fail("a rejected refund wrote rows")
            return
        amount = remaining if roll < 0.45 else self.rng.randint(1, remaining)
        req = RefundRequest(refund_id=self._refund_id(), amount_micros=amount)
        result = await self.chains[self.rng.randint(0, 1)].refund(tid, req)
        assert result.status == "created" and result.refunded_total_micros == refunded + amount
        self.refunds[req.refund_id] = (tid, req)

    async def concurrent_refunds(self) -> None:
        """Refunds racing on both chains: one refund delivered twice at once;
        two refunds of one purchase that together exceed what is left; one
        refund id sent for two purchases at once."""
        refunded_of = dict(await self.pool.fetch("SELECT transaction_id, refunded_micros FROM transactions"))
        refundable = {tid: tx.amount_micros - refunded_of[tid] for tid, tx in self.purchases.items()}
        unrefunded = [tid for tid, micros in refundable.items() if micros]
        if len(unrefunded) < 2:
            return await self.purchase()
        tid, other = self.rng.sample(unrefunded, 2)
        refunded, remaining = refunded_of[tid], refundable[tid]
        race = self.rng.choice(["duplicate", "overdraw", "shared_id"])
        if race == "duplicate":
            req = RefundRequest(refund_id=self._refund_id(), amount_micros=self.rng.randint(1, remaining))
            a, b = await asyncio.gather(self.chains[0].refund(tid, req), self.chains[1].refund(tid, req))
            assert sorted([a.status, b.status]) == ["created", "replayed"], self.fail(f"duplicate refund: {a}, {b}")
            assert a.refunded_total_micros == b.refunded_total_micros == refunded + req.amount_micros
            self.refunds[req.refund_id] = (tid, req)
        elif race == "overdraw":
            # Each fits alone; both do not. Exactly one is taken.
            first = self.rng.randint(remaining // 2 + 1, remaining) if remaining > 1 else 1
            reqs = [RefundRequest(refund_id=self._refund_id(), amount_micros=first),
                    RefundRequest(refund_id=self._refund_id(), amount_micros=remaining - first + 1)]
            outcomes = await asyncio.gather(*(chain.refund(tid, req) for chain, req in zip(self.chains, reqs)),
                                            return_exceptions=True)
            taken = [(req, o) for req, o in zip(reqs, outcomes) if not isinstance(o, BaseException)]
            refused = [o for o in outcomes if isinstance(o, BaseException)]
            assert len(taken) == 1 and all(isinstance(o, RefundExceedsPurchase) for o in refused), \
                self.fail(f"overdrawing refunds: {outcomes}")
            req, result = taken[0]
            assert result.status == "created" and result.refunded_total_micros == refunded + req.amount_micros
            self.refunds[req.refund_id] = (tid, req)
        else:
            # One refund id for two purchases: the first recorded keeps it; the other is a conflict.
            amount = min(remaining, refundable[other])
            req = RefundRequest(refund_id=self._refund_id(), amount_micros=self.rng.randint(1, amount))
            outcomes = await asyncio.gather(self.chains[0].refund(tid, req), self.chains[1].refund(other, req),
                                            return_exceptions=True)
            taken = [(t, o) for t, o in zip((tid, other), outcomes) if not isinstance(o, BaseException)]
            refused = [o for o in outcomes if isinstance(o, BaseException)]
            assert len(taken) == 1 and all(isinstance(o, IdempotencyConflict) for o in refused), \
                self.fail(f"one refund id for two purchases: {outcomes}")
            assert taken[0][1].status == "created"
            self.refunds[req.refund_id] = (taken[0][0], req)

    async def concurrent_lifecycle(self) -> None:
        """The approval sweep, payouts (one delivered twice), a refund and new
        purchases, all at once: each takes its locks and retries what Postgres
        aborts, and every rule still holds after (verify)."""
        if not self.purchases:
            return await self.purchase()
        await self.ledger.advance_clock(self.rng.choice([29 * 86400, 31 * 86400]))
        refund = await self._racing_refund()
        twice = PayoutRequest(payout_id=f"s{self.seed}-p{self.rng.getrandbits(32)}")  # delivered twice at once
        other = PayoutRequest(payout_id=f"s{self.seed}-p{self.rng.getrandbits(32)}", currency=self.rng.choice(CURRENCIES))
        racing = [lifecycle.payout(self.ledger, self.router, twice), lifecycle.payout(self.ledger, self.router, twice),
                  lifecycle.payout(self.ledger, self.router, other), lifecycle.approve_due(self.ledger, self.router),
                  self.purchase()]
        if self.upkeep_rng.random() < 0.5:
            racing.append(self.keep_partitions())
        if refund is not None:
            racing.append(self.chains[self.rng.randint(0, 1)].refund(*refund[:2]))
        results = await asyncio.gather(*racing)
        assert sorted([results[0].status, results[1].status]) == ["created", "replayed"] \
            and results[0].lines == results[1].lines, self.fail("a payout delivered twice at once")
        if refund is not None:
            tid, request, refunded = refund
            assert results[-1].refunded_total_micros == refunded + request.amount_micros, self.fail("racing refund")
            self.refunds[request.refund_id] = (tid, request)

    async def concurrent_checkpoint(self) -> None:
        """A checkpoint taken while purchases, a sweep and a refund commit:
        each write is in it or after it, never both nor neither, so a shard
        rebuilt from it is the one lost."""
        if self.rng.random() < 0.5:
            await self.ledger.advance_clock(31 * 86400)  # so the sweep has entries to approve
        racing = [checkpoint_all(self.pool, list(range(VSHARDS))), self.purchase(),
                  lifecycle.approve_due(self.ledger, self.router)]
        refund = await self._racing_refund() if self.purchases else None
        if refund is not None:
            racing.append(self.chains[self.rng.randint(0, 1)].refund(*refund[:2]))
            self.refunds[refund[1].refund_id] = refund[:2]
        await asyncio.gather(*racing)
        await self.router.flush_posted()
        await self.crash_shard()

    async def move_clock(self) -> None:
        await self.ledger.advance_clock(self.rng.choice([3600, 10 * 86400, 29 * 86400, 31 * 86400]))
        await lifecycle.approve_due(self.ledger, self.router)
        if self.upkeep_rng.random() < 0.5:
            await self.keep_partitions()
            # Nothing ran beside it, so it took every lock it asked for.
            assert await self.pool.fetchval(f"SELECT count(*) FROM {DEFAULT_PARTITION}") == 0, \
                self.fail("rows left in the default partition")

    async def keep_partitions(self) -> None:
        """The supervisor's upkeep, at a random few of the clock's moves: the
        months written before it ran are in the default partition, and move."""
        async with self.pool.acquire() as conn:
            await ensure_ledger_partitions(conn)

    async def payout(self) -> None:
        currency = self.rng.choice([None, *CURRENCIES])
        request = PayoutRequest(payout_id=f"s{self.seed}-p{self.rng.getrandbits(32)}", currency=currency)
        result = await lifecycle.payout(self.ledger, self.router, request)
        again = await lifecycle.payout(self.ledger, self.router, request)
        assert again.status == "replayed" and again.lines == result.lines and again.totals == result.totals, \
            self.fail("payout replay differs")
        totals: dict[str, list[int]] = {}
        for line in result.lines:  # a simulated payout's lines fit the first page
            total = totals.setdefault(line.currency, [0, 0])
            total[0] += 1
            total[1] += line.amount_micros
        assert result.next_cursor is None and result.completed_at is not None \
            and {t.currency: [t.beneficiaries, t.amount_micros] for t in result.totals} == totals, \
            self.fail(f"payout totals differ from its lines: {result}")
        positive = await self.pool.fetchval(
            "SELECT count(*) FROM (SELECT 1 FROM commission_ledger WHERE status = 'approved'"
            " AND ($1::text IS NULL OR currency = $1) GROUP BY beneficiary_id, currency"
            " HAVING sum(amount_micros) > 0) x", currency)
        assert positive == 0, self.fail("a positive approved balance was left unpaid")
        # Nothing raced it: each line paid its beneficiary's whole net.
        left = await self.pool.fetchval(
            "SELECT count(*) FROM payout_lines p JOIN commission_ledger l USING (beneficiary_id, currency)"
            " WHERE p.payout_id = $1 AND l.status = 'approved'", request.payout_id)
        assert left == 0, self.fail("a beneficiary paid kept approved entries: the line was not its net")

    async def crash_shard(self) -> None:
        """A shard comes back exactly as it was: every statistic and balance,
        zeros included (a fully refunded commission leaves its currency at 0)."""
        index = self.rng.randrange(SHARDS)
        before = _shard_image(self.router.states[index])
        await self.recover(index)
        assert _shard_image(self.router.states[index]) == before, self.fail("a recovered shard differs from the one lost")

    async def lose_delivery(self) -> None:
        """A writer dies between commit and delivery; the supervisor reloads all shards."""
        self.router.lose_deliveries = True
        try:
            await self.rng.choice([self.purchase, self.register, self.move_clock])()
        finally:
            self.router.lose_deliveries = False
        for i in range(SHARDS):
            await self.recover(i)

    async def lose_message(self) -> None:
        """A statement of a write, or its answer, is lost on the way (a proxy
        cuts the connection: once the server is ready for the next query,
        or before the statement reaches it). The commit's answer lost, the
        write is committed; the commit lost, it is not; either way the
        writer hears CommitOutcomeUnknown, and by then every shard the write
        touched has reread the ledger. A statement before the commit lost,
        or its answer, nothing is written: ServiceUnavailable. Either way the
        same write sent again replays or makes it, and memory equals the
        ledger (verify)."""
        if not self.purchases:
            return await self.purchase()
        if self.faults is None:
            proxy = FaultyPostgresProxy(self.url)
            self.faults = proxy, await open_pool(await proxy.start(), max_size=2)
        proxy, pool = self.faults
        chain = CommissionEngine(Ledger(pool, HOLD_PERIOD_S), self.router)
        write = self.rng.choice(["purchase", "purchase_group", "refund", "register", "payout"])
        refund = await self._racing_refund() if write == "refund" else None
        if write == "refund" and refund is None:
            write = "purchase"
        # The statement failed: the commit, or one before it; at the commit,
        # its request or its answer lost.
        at_commit = write in ("purchase", "register") or self.rng.random() < 0.5
        fault = self.rng.choice([Fault.REPLY_LOST, Fault.REQUEST_LOST])
        committed = at_commit and fault is Fault.REPLY_LOST
        if write in ("purchase", "purchase_group"):
            # Up to 64 new purchases are one statement, committed on its own;
            # more go in a transaction, committed by COMMIT.
            requests = [self._new_purchase() for _ in range(self.rng.randint(1, 5) if write == "purchase" else 70)]
            lost = "COMMIT" if write == "purchase_group" and at_commit else "INSERT INTO transactions"
            attempt = lambda engine: engine.submit(requests)  # noqa: E731
        elif write == "refund":
            lost = "COMMIT" if at_commit else "INSERT INTO refunds"
            attempt = lambda engine: engine.refund(*refund[:2])  # noqa: E731
        elif write == "register":
            user = f"s{self.seed}-u{len(self.users)}"
            request = RegisterUserRequest(user_id=user, referral_code=self.codes[self.rng.choice(self.users)])
            lost = "COMMIT"
            attempt = lambda engine: register_user(engine.ledger, self.router, request)  # noqa: E731
        else:
            await self.ledger.advance_clock(31 * 86400)
            request = PayoutRequest(payout_id=f"s{self.seed}-p{self.rng.getrandbits(32)}")
            # The approval sweep's commit, which comes first; or the last
            # slice's, after every other slice committed: its retry finishes
            # what they left.
            lost = "COMMIT" if at_commit else "UPDATE payouts SET completed_at"
            attempt = lambda engine: lifecycle.payout(engine.ledger, self.router, request)  # noqa: E731
        proxy.fail(lost, fault)
        with pytest.raises(ServiceUnavailable) as raised:
            await attempt(chain)
        assert proxy.fired.is_set(), self.fail(f"the proxy met no {lost!r}")
        assert type(raised.value) is (CommitOutcomeUnknown if at_commit else ServiceUnavailable), \
            self.fail(f"{fault.name} at {lost!r}: {raised.value!r}")
        if write == "payout":
            # Not sent again at once: the supervisor's sweep finishes a payout
            # cut short, unless a delivery of it is in hand. The approval
            # sweep's commit came before the payout was opened.
            in_hand = self.rng.choice([set(), {request.payout_id}])
            finished = await lifecycle.finish_cut_short_payouts(
                self.ledger, self.router, in_hand, lifecycle.PayoutRetries())
            committed = not at_commit and not in_hand  # completed by the sweep: the retry replays it
            assert finished == ([request.payout_id] if committed else []), self.fail(f"sweep finished {finished}")
        again = await attempt(self.chains[self.rng.randint(0, 1)])
        status = "replayed" if committed else "created"
        if write in ("purchase", "purchase_group"):
            assert [o.result.status for o in again] == [status] * len(requests), self.fail(f"retry: {again}")
            self.purchases.update((r.transaction_id, r) for r in requests)
        elif write == "refund":
            assert again.status == status, self.fail(f"retry: {again}")
            self.refunds[refund[1].refund_id] = refund[:2]
        elif write == "register":
            assert again.status == status, self.fail(f"retry: {again}")
            self.users.append(user)
            self.codes[user] = again.referral_code
        else:  # a payout: what failed was the approval sweep before it, or its last slice
            assert again.status == status and again.completed_at is not None, self.fail(f"retry: {again}")

    async def double_delivery(self) -> None:
        self.router.double_deliveries = True
        try:
            await self.rng.choice([self.purchase, self.refund, self.payout])()
        finally:
            self.router.double_deliveries = False

    async def checkpoint(self) -> None:
        await checkpoint_all(self.pool, list(range(VSHARDS)))

    # --- the oracle ------------------------------------------------------------

    async def _ledger_rows(self) -> int:
        return await self.pool.fetchval("SELECT count(*) FROM commission_ledger")

    async def verify(self) -> None:
        f = self.fail
        users = {r["user_id"]: list(r["upline"]) for r in await self.pool.fetch("SELECT user_id, upline FROM users")}
        # Uplines: the referrer chain, truncated at 7, no cycles.
        for user, upline in users.items():
            assert len(upline) <= 7 and user not in upline, f(f"bad upline for {user}")
            if upline:
                assert upline[1:] == users[upline[0]][:6], f(f"upline of {user} is not its referrer's chain")

        txs = {r["transaction_id"]: r for r in await self.pool.fetch("SELECT * FROM transactions")}
        entries = await self.pool.fetch("SELECT * FROM commission_ledger")
        by_tx: dict[str, list] = {}
        reversed_of: dict[int, int] = {}
        for e in entries:
            if e["kind"] == "commission":
                by_tx.setdefault(e["transaction_id"], []).append(e)
            else:
                reversed_of[e["reverses_entry_id"]] = reversed_of.get(e["reverses_entry_id"], 0) - e["amount_micros"]
        refunds = await self.pool.fetch("SELECT * FROM refunds ORDER BY transaction_id, refunded_before_micros")
        refunded_sum: dict[str, int] = {}
        for r in refunds:
            assert r["refunded_before_micros"] == refunded_sum.get(r["transaction_id"], 0), f("refund chain broken")
            refunded_sum[r["transaction_id"]] = r["refunded_before_micros"] + r["amount_micros"]
        for tid, tx in txs.items():
            upline = users[tx["user_id"]]
            amount = tx["amount_micros"]
            got = sorted(by_tx.get(tid, []), key=lambda e: e["level"])
            shares = [Fraction(amount * RATES_BP[level - 1], 10_000) for level in range(1, len(upline) + 1)]
            exact = sum(shares, Fraction(0))
            paid_levels = [level for level, share in enumerate(shares, start=1) if share >= 1]
            assert [e["level"] for e in got] == paid_levels, f(f"{tid}: levels {got}")
            for e in got:
                level = e["level"]
                share = shares[level - 1]
                assert e["beneficiary_id"] == upline[level - 1], f(f"{tid}: paid a non-ancestor")
                assert e["amount_micros"] == share.__floor__(), f(f"{tid}: level {level} amount")
                # Refunds reverse exactly the proportional share, never more.
                refunded = tx["refunded_micros"]
                assert refunded == refunded_sum.get(tid, 0), f(f"{tid}: refunded total")
                want = (Fraction(e["amount_micros"] * refunded, amount)).__floor__()
                assert reversed_of.get(e["entry_id"], 0) == want, f(f"{tid}: level {level} reversed wrong amount")
            assert tx["house_micros"] == exact.__floor__() - sum(e["amount_micros"] for e in got), f(f"{tid}: house")
            if tx["refunded_micros"] == amount:
                for e in got:
                    assert e["status"] in ("refunded", "paid"), f(f"{tid}: fully refunded but {e['status']}")

        now = await self.pool.fetchval(
            "SELECT now() + make_interval(secs => offset_us / 1e6) FROM engine_clock")
        for e in entries:
            if e["status"] == "pending":
                assert e["hold_until"] > now, f("a commission past its hold is still pending")
            if e["status"] == "approved" and e["kind"] != "clawback":
                assert e["hold_until"] <= now, f("a commission was approved before its hold ended")

        # Balances in memory equal the sum of the entries, per bucket.
        want: dict[tuple[str, str], list[int]] = {}
        bucket = {"pending": 0, "approved": 1, "paid": 2, "reversed": 2}
        for e in entries:
            if e["status"] in bucket:
                b = want.setdefault((e["beneficiary_id"], e["currency"].strip()), [0, 0, 0])
                b[bucket[e["status"]]] += e["amount_micros"]
        have: dict[tuple[str, str], list[int]] = {}
        for state in self.router.states:
            for user, stats in state.stats.items():
                for currency, buckets in stats.balances.items():
                    if any(buckets):
                        have[(user, currency)] = list(buckets)
        want = {k: v for k, v in want.items() if any(v)}
        assert have == want, f(f"memory balances differ from the ledger: {_diff(have, want)}")
        await self.verify_reads_from_ledger(sorted(users))

        # Paid equals what payouts paid.
        paid_lines: dict[tuple[str, str], int] = {}
        for r in await self.pool.fetch("SELECT beneficiary_id, currency, amount_micros FROM payout_lines"):
            key = (r["beneficiary_id"], r["currency"].strip())
            paid_lines[key] = paid_lines.get(key, 0) + r["amount_micros"]
        assert {k: v for k, v in paid_lines.items() if v} == {k: v[2] for k, v in want.items() if v[2]}, \
            f("paid balances differ from payout lines")

        # Network statistics in memory equal those derived from users and purchases.
        size: dict[str, list[int]] = {}
        revenue: dict[tuple[str, str], list[int]] = {}
        for user, upline in users.items():
            for level, ancestor in enumerate(upline, start=1):
                size.setdefault(ancestor, [0] * 7)[level - 1] += 1
        for tid, tx in txs.items():
            net = tx["amount_micros"] - tx["refunded_micros"]
            for level, ancestor in enumerate(users[tx["user_id"]], start=1):
                revenue.setdefault((ancestor, tx["currency"].strip()), [0] * 7)[level - 1] += net
        for state in self.router.states:
            for user in state.users:
                stats = state.stats.get(user)
                assert (stats.size_by_level if stats else [0] * 7) == size.get(user, [0] * 7), f(f"size of {user}")
                assert (stats.direct_referrals if stats else 0) == size.get(user, [0] * 7)[0]
                for currency in CURRENCIES:
                    got_rev = (stats.revenue_by_level.get(currency) if stats else None) or [0] * 7
                    assert got_rev == revenue.get((user, currency), [0] * 7), f(f"revenue of {user}")
        owned = sorted(u for s in self.router.states for u in s.users)
        assert owned == sorted(users), f("shards do not own exactly the registered users")
        await self.verify_live_streams(want, entries, size)

    async def verify_reads_from_ledger(self, users: list[str]) -> None:
        """What a read answers from the ledger when the shard does not
        (recovery.user_state_from_ledger) is what the shard answers: the
        balance, stream offset included, the record and the network
        statistics, for a few users a step (all would double the seeds'
        time; the statistics of one), and nothing for a user never registered."""
        for k, user in enumerate(self.ledger_reads_rng.sample(users, min(LEDGER_READS_PER_STEP, len(users)))):
            shard = self.router.states[actor_of_vshard(vshard_of(user), SHARDS)]
            own = await user_state_from_ledger(self.pool, user, network=False)
            assert (own.balance_view(user), own.user_view(user)) == (shard.balance_view(user), shard.user_view(user)), \
                self.fail(f"the ledger's balance or record of {user} differs from its shard's")
            if k == 0:  # the whole vshard is read: once a step
                whole = await user_state_from_ledger(self.pool, user, network=True)
                assert whole.network_stats(user) == shard.network_stats(user), \
                    self.fail(f"the ledger's network statistics of {user} differ from its shard's")
        assert "never-registered" not in (await user_state_from_ledger(self.pool, "never-registered", False)).users

    async def verify_live_streams(self, balances, entries, size) -> None:
        """Each user's outbox events: offsets 1..last with no gap or overlap,
        balance changes summing to the balance, one event per commission."""
        f = self.fail
        last_seqs = dict(await self.pool.fetch("SELECT user_id, last_seq FROM event_streams"))
        next_seq: dict[str, int] = {}
        balance_sum: dict[tuple[str, str], list[int]] = {}
        earned: dict[str, list[tuple[str, int]]] = {}
        joined: dict[str, int] = {}
        for r in await self.pool.fetch("SELECT user_id, first_seq, events FROM outbox ORDER BY outbox_id"):
            user = r["user_id"]
            assert r["first_seq"] == next_seq.get(user, 0) + 1, f(f"stream of {user} has a gap or an overlap")
            events = decode_events(bytes(r["events"]))
            next_seq[user] = r["first_seq"] + len(events) - 1
            for e in events:
                if isinstance(e, BalanceChanged):
                    b = balance_sum.setdefault((user, e.currency), [0, 0, 0])
                    b[0] += e.pending_delta_micros
                    b[1] += e.approved_delta_micros
                    b[2] += e.paid_delta_micros
                elif isinstance(e, CommissionEarned):
                    earned.setdefault(user, []).append((e.transaction_id, e.amount_micros))
                elif isinstance(e, ReferralJoined):
                    joined[user] = joined.get(user, 0) + 1
        assert next_seq == {u: s for u, s in last_seqs.items() if s}, f("outbox offsets differ from event_streams")
        assert {k: v for k, v in balance_sum.items() if any(v)} == balances, f("balance events do not sum to balances")
        want_earned: dict[str, list[tuple[str, int]]] = {}
        for e in entries:
            if e["kind"] == "commission":
                want_earned.setdefault(e["beneficiary_id"], []).append((e["transaction_id"], e["amount_micros"]))
        assert {u: sorted(v) for u, v in earned.items()} == {u: sorted(v) for u, v in want_earned.items()}, \
            f("commission events differ from commission entries")
        assert joined == {u: sum(v) for u, v in size.items()}, f("referral events differ from network sizes")
        for state in self.router.states:
            for user in state.users:
                assert state.stream_offsets.get(user, 0) == last_seqs.get(user, 0), f(f"stream offset of {user}")

    async def run(self, steps: int) -> None:
        for i in range(SHARDS):
            await self.recover(i)
        actions = [
            (self.register, 3), (self.purchase, 6), (self.refund, 3), (self.move_clock, 2), (self.payout, 2),
            (self.crash_shard, 1), (self.lose_delivery, 1), (self.double_delivery, 1), (self.checkpoint, 1),
            # Racing steps: writes that meet in Postgres at once.
            (self.concurrent_registrations, 1), (self.concurrent_refunds, 1), (self.concurrent_lifecycle, 1),
            (self.concurrent_checkpoint, 1),
            (self.lose_message, 1),
        ]
        for step in range(steps):
            action = self.rng.choices([a for a, _ in actions], weights=[w for _, w in actions])[0]
            self.step_name = f"{step}:{action.__name__}"
            await action()
            await self.router.flush_posted()
            await self.verify()


def _shard_image(state) -> tuple:
    return ({u: s.to_wire() for u, s in state.stats.items()}, {u: r.__reduce__()[1] for u, r in state.users.items()},
            dict(state.stream_offsets))


def _diff(have, want):
    keys = set(have) | set(want)
    return {k: (have.get(k), want.get(k)) for k in sorted(keys) if have.get(k) != want.get(k)}


async def _run_seed(url: str, seed: int) -> None:
    pool = await open_pool(url, max_size=6)
    try:
        await pool.execute(f"TRUNCATE {TABLES} CASCADE; UPDATE engine_clock SET offset_us = 0")
        # The default partition alone: the seed's rows land there until its
        # upkeep makes their months.
        for month in await pool.fetch(
                "SELECT inhrelid::regclass::text AS name FROM pg_inherits"
                " WHERE inhparent = 'commission_ledger'::regclass AND inhrelid <> $1::regclass", DEFAULT_PARTITION):
            await pool.execute(f"DROP TABLE {month['name']}")
        simulation = Simulation(seed, url, pool)
        try:
            await simulation.run(STEPS_PER_SEED)
        finally:
            await simulation.close()
    finally:
        await pool.close()


# --- seeds run ahead of their tests ------------------------------------------
# A seed spends about half its time waiting on Postgres, so several run at
# once, each worker process on a database of its own; each seed's test waits
# for its seed and reports it. On this 2-core machine one worker took 1.0 s
# a seed, two 0.6 s and three 0.5 s (session 50). Processes, not tasks: a
# seed sets the ledger's slice size for its run (PAYOUT_SLICE_ENTRIES), and
# the seeds' Python would share one core.
SIMULATION_WORKERS = int(os.environ.get("DD_SIMULATION_WORKERS", min(8, (os.cpu_count() or 1) + 1)))
_worker_database_url = ""  # in a worker: the database it alone runs its seeds on


def _worker_takes_a_database(database_urls) -> None:
    global _worker_database_url
    _worker_database_url = database_urls.get()


def _run_seed_in_worker(seed: int) -> None:
    """One seed in a worker; a failure carries the seed's log (the worker's
    own stderr would scatter it through pytest's report)."""
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        ledger_module.PAYOUT_SLICE_ENTRIES = random.Random(seed).choice(PAYOUT_SLICE_ENTRIES)
        asyncio.run(_run_seed(_worker_database_url, seed))
    except BaseException as exc:
        exc.add_note(f"seed {seed}'s log:\n{log.getvalue()}")
        raise
    finally:
        logging.getLogger().removeHandler(handler)


@pytest.fixture(scope="module")
def seeds_run_ahead(request, servers) -> dict[int, concurrent.futures.Future]:
    """Each seed selected in this session, submitted to the workers in the
    tests' order: the seed's outcome, by seed."""
    seeds = [item.callspec.params["seed"] for item in request.session.items
             if item.module is request.module and item.originalname == "test_ledger_simulation"]
    workers = max(1, min(SIMULATION_WORKERS, len(seeds)))
    context = multiprocessing.get_context("spawn")  # this process may hold Ray's threads: no fork
    database_urls = context.SimpleQueue()
    for k in range(workers):
        database_urls.put(asyncio.run(migrated_database(servers[0], f"{SIMULATION_DATABASE}_{k}")))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_takes_a_database,
                                                initargs=(database_urls,)) as executor:
        outcomes = {seed: executor.submit(_run_seed_in_worker, seed) for seed in seeds}
        try:
            yield outcomes
        finally:
            executor.shutdown(cancel_futures=True)  # what a stopped session (-x) did not reach


@pytest.mark.parametrize("seed", [pytest.param(s, id=f"seed_{s}") for s in range(SEED_FIRST, SEED_FIRST + SEEDS)])
def test_ledger_simulation(seeds_run_ahead, seed):
    seeds_run_ahead[seed].result()
