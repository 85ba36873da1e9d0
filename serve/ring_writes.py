"""The API's writes through a ring of actors, each write to the actor its id
hashes to (storage/sharding.py) unless that one is silent: purchases and
refunds through the commission chains, then the supervisor; registrations
through the user shards; payouts through the supervisor, then the chains.

The ledger does not depend on the deliveries of one id meeting in one
actor: one purchase id written by two chains at once is recorded once and
replayed by the other, and so is a refund (the ledger simulation races its
two chains on purchases and on refunds); one user id registered by two
shards at once is inserted once, and the other replays it (Postgres's
unique user id; the ledger simulation registers one user twice at once);
a payout's slices are taken one delivery at a time (its row locked),
whoever delivers it, as the supervisor's sweep finishes a payout cut short
beside the deliveries of it. That lets the write of an actor that does
not answer go to another instead of waiting for it. An actor lost with the
Ray head is made again only once a new head is up, a minute or more after
(test_head_node_loss.py), and until session 46 (chains) and 47 (shards,
the supervisor) the writes that hashed to it waited for it, up to a
minute, then 503. The supervisor, which holds a ledger writer for its
own writes (approvals, payouts), is the chains' last resort (since session
48): with one chain, the default on two or three cores, a chain that
stopped answering had no other to go to, and its writes waited until the
supervisor's hang check had made it again, 5 to 10 s and its restart.

Slow is not silent (SilenceWatch.answered: a write that has waited asks its
actor for a ping). A write whose actor is silent goes to the next actor
round the ring that is not, then to the last resorts, and so do that
actor's next writes at once, until it answers again. The first call is
left to finish or fail on its own: whichever commits first records the
write, and the other replays it.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Sequence

from dailydoco.actors.batching import outcome_unread
from dailydoco.actors.refs import SilenceWatch


class RingWrites:
    def __init__(self, actors: list[SilenceWatch], rerouted: Callable[[], None] = lambda: None,
                 last_resorts: Sequence[SilenceWatch] = ()):
        self._actors = actors
        self._last_resorts = list(last_resorts)  # after the whole ring, whichever actor the write's is
        self._rerouted = rerouted  # counts each write that went to an actor other than its own

    async def call(self, index: int, method: str, *args):
        """`method(*args)` on actor `index`, or, while it is silent, on the
        next actor round the ring that is not, or else the first last resort
        that is not. Where every one is silent, the write waits for its own
        (ActorRef's retries bound what fails)."""
        ring = [self._actors[(index + k) % len(self._actors)] for k in range(len(self._actors))]
        ring += self._last_resorts
        for actor in ring:
            if actor.silent:
                actor.probe()
        answering = [actor for actor in ring if not actor.silent] or ring[:1]
        for actor in answering[:-1]:
            call = outcome_unread(asyncio.ensure_future(actor.call(method, *args)))
            if await actor.answered(call):
                if actor is not ring[0]:
                    self._rerouted()
                return call.result()
            # Given up (its outcome unread): the next actor's answer is this write's.
        if answering[-1] is not ring[0]:
            self._rerouted()
        return await answering[-1].call(method, *args)
