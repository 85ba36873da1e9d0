"""The API's writes through the commission chains: purchases and refunds.

A write goes to the chain its transaction id hashes to (storage/sharding.py),
so that the deliveries of one id usually meet in one chain. The ledger does
not depend on it: one id written by two chains at once is recorded once and
replayed by the other, and so is a refund (the ledger simulation races its
two chains on purchases and on refunds). That lets the write of a chain
that does not answer go to another chain instead of waiting for it. A
chain lost with the Ray head is made again only once a new head is up, a
minute or more after (test_head_node_loss.py), and until session 46 the
purchases that hashed to it waited for it, up to a minute, then 503.

Slow is not silent: a bulk group takes seconds to commit under load, and a
write waits out a Postgres stall. So a write that has waited
CHAIN_ANSWER_WAIT_S asks its chain for a ping, which the chain answers from
its event loop whatever its writes wait on; only a chain that does not
answer that within CHAIN_PING_WAIT_S is silent. The write then goes to the
next chain round the ring that is not, and so do that chain's next writes
at once, until it answers again (SilenceWatch). The first call is left to
finish or fail on its own: whichever commits first records the write, and
the other replays it.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from dailydoco.actors.batching import outcome_unread
from dailydoco.actors.refs import ActorRef, SilenceWatch

# A chain commits a small group in milliseconds; under the benchmark's bulk
# load a batch of 2,000 purchases took up to 2.9 s (p99, session 38), 4.1 s
# with two chains (session 46): slow, not silent.
CHAIN_ANSWER_WAIT_S = 1.0
# A ping is answered from the chain's event loop, which computing a group's
# entries holds for about 25 µs a purchase on a fast host (README, "Why (b)
# is far from 20,000/s"): 0.1 s for the largest group, 4,000.
CHAIN_PING_WAIT_S = 1.0


class ChainWrites:
    def __init__(self, chains: list[ActorRef], rerouted: Callable[[], None] = lambda: None):
        self._chains = [SilenceWatch(chain, "its writes go to the next chain") for chain in chains]
        self._rerouted = rerouted  # counts each write that went to a chain other than its own

    async def call(self, index: int, method: str, *args):
        """`method(*args)` on chain `index`, or, while it is silent, on the
        next chain round the ring that is not. Where every one is silent, the
        write waits for its own (ActorRef's retries bound what fails)."""
        ring = [self._chains[(index + k) % len(self._chains)] for k in range(len(self._chains))]
        for chain in ring:
            if chain.silent:
                chain.probe()
        answering = [chain for chain in ring if not chain.silent] or ring[:1]
        for chain in answering[:-1]:
            call = outcome_unread(asyncio.ensure_future(chain.call(method, *args)))
            if await self._answered(chain, call):
                if chain is not ring[0]:
                    self._rerouted()
                return call.result()
            # Given up (its outcome unread): the next chain's answer is this write's.
        if answering[-1] is not ring[0]:
            self._rerouted()
        return await answering[-1].call(method, *args)

    @staticmethod
    async def _answered(chain: SilenceWatch, call: asyncio.Future) -> bool:
        """True once `call` has returned or raised; False once its chain has
        fallen silent instead."""
        while True:
            done, _ = await asyncio.wait({call}, timeout=CHAIN_ANSWER_WAIT_S)
            if done:
                return True
            ping = outcome_unread(asyncio.ensure_future(chain.call("ping")))
            done, _ = await asyncio.wait({call, ping}, timeout=CHAIN_PING_WAIT_S,
                                         return_when=asyncio.FIRST_COMPLETED)
            if call in done:
                ping.cancel()
                return True
            if ping in done and ping.exception() is None:
                continue  # alive, its write slow: keep waiting for it
            ping.cancel()
            chain.fell_silent(f"a ping within {CHAIN_PING_WAIT_S} s, with a write waiting on it")
            return False

