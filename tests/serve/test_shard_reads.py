"""Reads of a shard that falls silent (serve/shard_reads.py): the ledger
answers, at once after the first read that waited, until the shard answers
again. The shard here is a stand-in whose answers the test holds back; the
ledger is the session's real Postgres, with one registered user. The real
shard actor, stopped under the real engine, is test_crash_recovery.py's;
that the ledger's answers equal the shard's, the ledger simulation's."""

import asyncio
import os

from dailydoco.actors.registration import register_user
from dailydoco.actors.refs import SilenceWatch
from dailydoco.protocol import BalanceView, RegisterUserRequest, StreamPosition
from dailydoco.serve import shard_reads
from dailydoco.serve.shard_reads import ShardReads
from dailydoco.storage.ledger import Ledger
from dailydoco.storage.pool import open_pool

from ..conftest import migrated_database

WAIT_S = 1.0  # far longer than a read of the ledger takes, however slow the host


class _HeldShard:
    """Answers while `answering` is set; records the methods called."""

    name = "user-shard-test"

    def __init__(self):
        self.answering = asyncio.Event()
        self.called: list[str] = []

    async def call(self, method: str, *args):
        self.called.append(method)
        await self.answering.wait()
        if method == "get_balances":
            return [BalanceView(user_id=u, balances=[], stream=StreamPosition(epoch="shard", offset=0)) for u in args[0]]
        return 0 if method == "ready" else None


class _NoShards:
    """Registration's router: the test's user needs no shard's memory."""

    shard_count = 1

    async def deliver_one(self, shard_index, xid, delta) -> None:
        pass


async def _reads(url: str) -> None:
    pool = await open_pool(url, max_size=2)
    try:
        await register_user(Ledger(pool, 0), _NoShards(), RegisterUserRequest(user_id="known"))
        shard = _HeldShard()
        reads = ShardReads(SilenceWatch(shard, "its reads go to the ledger"), lambda: pool)
        shard.answering.set()
        view, source = await reads.balance("u-1")
        assert source == "shard" and view.stream.epoch == "shard"

        shard.answering.clear()  # silent: lost with its host, or stalled
        view, source = await reads.balance("known")
        assert source == "ledger" and view.user_id == "known" and view.stream.epoch != "shard"
        assert shard.called[-2:] == ["get_balances", "ready"]  # the read it waited for, and one to find out
        # The reads after it go to the ledger without waiting, and no more
        # calls to the shard while that one is held.
        called = len(shard.called)
        assert await asyncio.wait_for(reads.balance("nobody"), WAIT_S / 2) == (None, "ledger")
        assert (await asyncio.wait_for(reads.user("known"), WAIT_S / 2)).user_id == "known"
        assert (await asyncio.wait_for(reads.network_stats("known"), WAIT_S / 2)).network_size == 0
        assert await asyncio.wait_for(reads.user("nobody"), WAIT_S / 2) is None
        assert len(shard.called) == called

        shard.answering.set()  # back: the calls held return
        for _ in range(10):
            await asyncio.sleep(0)
        view, source = await reads.balance("u-2")
        assert source == "shard" and view.stream.epoch == "shard"
    finally:
        await pool.close()


def test_a_silent_shards_reads_go_to_the_ledger_until_it_answers(servers, monkeypatch):
    monkeypatch.setattr(shard_reads, "SHARD_ANSWER_WAIT_S", WAIT_S)
    url = asyncio.run(migrated_database(servers[0], f"dailydoco_shard_reads_{os.getpid()}"))
    asyncio.run(_reads(url))
