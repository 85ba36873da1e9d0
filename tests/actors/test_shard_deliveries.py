"""Deliveries of writes answered after them (a registration, a refund, a
payout; RayShardRouter.deliver_one): a shard that is slow is waited for,
one that falls silent gets the delivery through its mailbox instead, and
the write goes on. The shard here is a stand-in whose answers the test
holds back; the real shard, stopped under the real engine, is
test_crash_recovery.py's."""

import asyncio

import pytest

from dailydoco.actors import refs
from dailydoco.actors.refs import RayShardRouter, SilenceWatch
from dailydoco.protocol import ServiceUnavailable

WAIT_S = 0.1
ANSWERED_WITHIN_S = 5.0  # for a test that fails rather than hangs; far more than any wait here


class _HeldShard:
    """Applies while `applying` is set and pings while `pinging` is; records
    what it was called for."""

    name = "user-shard-test"

    def __init__(self):
        self.applying = asyncio.Event()
        self.pinging = asyncio.Event()
        self.called: list[str] = []
        self.failure: Exception | None = None

    async def call(self, method: str, *args):
        self.called.append(method)
        await (self.pinging if method in ("ping", "ready") else self.applying).wait()
        if method == "apply" and self.failure is not None:
            raise self.failure
        return True


async def _deliveries() -> None:
    shard = _HeldShard()
    router = RayShardRouter("test", 1)
    router.silences = [SilenceWatch(shard, "deliveries to it wait in its mailbox")]
    posted = []
    router.post_one = lambda index, xid, delta: posted.append(xid)
    shard.applying.set()
    shard.pinging.set()

    await router.deliver_one(0, 1, None)
    assert shard.called == ["apply"] and not posted

    # Slow but answering its pings (a hung Redis, a rebuild): waited for.
    shard.applying.clear()
    slow = asyncio.ensure_future(router.deliver_one(0, 2, None))
    await asyncio.sleep(10 * WAIT_S)
    assert not slow.done() and shard.called.count("ping") >= 3
    shard.applying.set()
    await slow
    assert not posted

    # An error of the shard's is the write's, as before.
    shard.failure = ServiceUnavailable("user-shard-test is unavailable")
    with pytest.raises(ServiceUnavailable):
        await router.deliver_one(0, 3, None)
    shard.failure = None

    # Silent: after one wait and one ping the delivery goes to the mailbox.
    shard.applying.clear()
    shard.pinging.clear()
    await asyncio.wait_for(router.deliver_one(0, 4, None), ANSWERED_WITHIN_S)
    assert posted == [4] and shard.called[-3:] == ["apply", "ping", "ready"]
    # The next goes there at once: no call to the shard while its `ready` is held.
    called = len(shard.called)
    await asyncio.wait_for(router.deliver_one(0, 5, None), ANSWERED_WITHIN_S)
    assert posted == [4, 5] and len(shard.called) == called

    # It answers again: its held `ready` returns, and deliveries go to it.
    shard.applying.set()
    shard.pinging.set()
    for _ in range(10):
        await asyncio.sleep(0)
    await router.deliver_one(0, 6, None)
    assert posted == [4, 5] and shard.called[-1] == "apply"


def test_a_silent_shards_deliveries_wait_in_its_mailbox_not_the_write(monkeypatch):
    monkeypatch.setattr(refs, "ANSWER_WAIT_S", WAIT_S)
    monkeypatch.setattr(refs, "PING_WAIT_S", WAIT_S)
    asyncio.run(_deliveries())
