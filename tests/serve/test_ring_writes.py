"""Writes through a ring of actors (serve/ring_writes.py): an actor that is
slow is waited for, one that falls silent has its writes sent to the next
round the ring, then to the last resorts, until it answers again. The actors here are stand-in chains
whose answers the test holds back; the real chain and shard actors, stopped
under the real engine, are test_crash_recovery.py's; that two chains
writing one id record it once, the ledger simulation's."""

import asyncio

from dailydoco.actors import refs
from dailydoco.actors.refs import SilenceWatch
from dailydoco.serve.ring_writes import RingWrites

WAIT_S = 0.1
ANSWERED_WITHIN_S = 5.0  # for a test that fails rather than hangs; far more than any wait here


class _HeldChain:
    """Answers writes while `writing` is set and pings while `pinging` is;
    records what it was called for, and answers a write with its own name."""

    def __init__(self, name: str):
        self.name = name
        self.writing = asyncio.Event()
        self.pinging = asyncio.Event()
        self.called: list[str] = []
        self.writing.set()
        self.pinging.set()

    async def call(self, method: str, *args):
        self.called.append(method)
        await (self.pinging if method in ("ping", "ready") else self.writing).wait()
        return self.name if method == "submit" else 0

    def answer(self) -> None:
        self.writing.set()
        self.pinging.set()

    def fall_silent(self) -> None:
        self.writing.clear()
        self.pinging.clear()


async def _writes() -> None:
    first, second, third = _HeldChain("first"), _HeldChain("second"), _HeldChain("third")
    rerouted = []
    writes = RingWrites([SilenceWatch(chain, "its writes go to the next chain") for chain in (first, second, third)],
                        lambda: rerouted.append(1))

    assert await writes.call(0, "submit") == "first"

    # Slow but answering its pings (a big group, a Postgres stall): waited for.
    first.writing.clear()
    slow = asyncio.ensure_future(writes.call(0, "submit"))
    await asyncio.sleep(10 * WAIT_S)
    assert not slow.done() and first.called.count("ping") >= 3
    first.writing.set()
    assert await slow == "first" and not rerouted

    # Silent: the write goes to the next chain after one wait and one ping.
    first.fall_silent()
    assert await asyncio.wait_for(writes.call(0, "submit"), ANSWERED_WITHIN_S) == "second"
    assert rerouted == [1] and first.called[-3:] == ["submit", "ping", "ready"]
    # The writes after it go there at once: no more calls to the silent
    # chain while its `ready` is held.
    called = len(first.called)
    assert await asyncio.wait_for(writes.call(0, "submit"), ANSWERED_WITHIN_S) == "second"
    assert await writes.call(1, "submit") == "second"
    assert len(first.called) == called and len(rerouted) == 2

    # Two silent: round the ring to the third; the second's own writes too.
    second.fall_silent()
    assert await asyncio.wait_for(writes.call(1, "submit"), ANSWERED_WITHIN_S) == "third"
    called = len(first.called), len(second.called)
    assert await writes.call(0, "submit") == "third"
    assert (len(first.called), len(second.called)) == called

    # Every one silent: the write waits for its own.
    third.fall_silent()
    waiting = asyncio.ensure_future(writes.call(2, "submit"))
    await asyncio.sleep(10 * WAIT_S)
    assert not waiting.done()
    third.answer()
    assert await waiting == "third"

    # The first answers again: its held `ready` returns, and its writes go to it.
    first.answer()
    for _ in range(10):
        await asyncio.sleep(0)
    rerouted.clear()
    assert await writes.call(0, "submit") == "first" and not rerouted


def test_a_silent_chains_writes_go_to_the_next_until_it_answers(monkeypatch):
    monkeypatch.setattr(refs, "ANSWER_WAIT_S", WAIT_S)
    monkeypatch.setattr(refs, "PING_WAIT_S", WAIT_S)
    asyncio.run(_writes())


async def _last_resorts() -> None:
    first, second, supervisor = _HeldChain("first"), _HeldChain("second"), _HeldChain("supervisor")
    rerouted = []
    writes = RingWrites([SilenceWatch(chain, "its writes go to the next chain") for chain in (first, second)],
                        lambda: rerouted.append(1), last_resorts=[SilenceWatch(supervisor, "")])

    # The ring before the last resort, whichever chain the write is for.
    second.fall_silent()
    assert await asyncio.wait_for(writes.call(1, "submit"), ANSWERED_WITHIN_S) == "first"
    assert not supervisor.called

    # Every chain silent: the last resort writes, each chain's writes alike.
    first.fall_silent()
    assert await asyncio.wait_for(writes.call(0, "submit"), ANSWERED_WITHIN_S) == "supervisor"
    assert await writes.call(1, "submit") == "supervisor"
    assert rerouted == [1, 1, 1]

    # A chain answers again: its writes, and the other's, go to it.
    second.answer()
    for _ in range(10):
        await asyncio.sleep(0)
    assert await writes.call(0, "submit") == "second"
    assert await writes.call(1, "submit") == "second"
    assert supervisor.called == ["submit", "submit"]


def test_writes_go_to_the_last_resort_only_while_every_actor_of_the_ring_is_silent(monkeypatch):
    monkeypatch.setattr(refs, "ANSWER_WAIT_S", WAIT_S)
    monkeypatch.setattr(refs, "PING_WAIT_S", WAIT_S)
    asyncio.run(_last_resorts())
