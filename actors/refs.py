"""All Ray calls between our actors go through here.

A named actor that dies is recreated under the same name by the supervisor;
`ActorRef` re-resolves the name and retries until a deadline. Every method we
call through it is idempotent (ids and xid fences), so a retry after an
unknown outcome is safe.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from dailydoco.protocol import ServiceUnavailable
from dailydoco.storage.deltas import ShardDelta

from .batching import outcome_unread, start_shared_task

# A restart (new worker process + recovery from Postgres) takes a few seconds
# on this machine; callers wait this long before giving up with 503.
ACTOR_RETRY_DEADLINE_S = 60.0
ACTOR_RETRY_BACKOFF_S = (0.05, 0.1, 0.2, 0.5, 1.0)


def shard_actor_name(index: int) -> str:
    return f"user-shard-{index}"


def chain_actor_name(index: int) -> str:
    return f"commission-chain-{index}"


SUPERVISOR_NAME = "supervisor"
RELAY_NAME = "outbox-relay"
VIDEO_PROCESSOR_NAME = "video-processor"
# Posts to a shard gather this long per call. 20 ms rather than 5 took the two
# shards from 19 % to 11 % of a core at 1,000 purchases/s here (the chain's
# calls fell with them); reads of shard memory trail the ledger that much more.
SHARD_POST_GATHER_S = 0.020
MAILBOX_RETRY_DEADLINE_S = 300.0  # then log and keep trying: the delivery is never dropped
# How long a call waits for its actor before asking it for a ping, and how
# long the ping may take before the actor is silent (SilenceWatch.answered).
# Slow is not silent, and the longest waits of live actors are: a chain's
# bulk group, up to 2.9 s to commit under the benchmark's load (p99,
# session 38), 4.1 s with two chains (session 46); a shard's delivery, up
# to BALANCE_VIEW_WRITE_TIMEOUT_S (2 s) on a hung Redis, or until a shard
# made again has rebuilt its memory; anyone's write, a Postgres stall. An
# actor answers a ping on a thread of its own whatever those wait on, and
# however busy its own loop is, while that loop still runs
# (actors/watch.py).
ANSWER_WAIT_S = 1.0
PING_WAIT_S = 1.0
# How often each ActorRef looks its name up again. A lookup asks Ray's
# control store, on the head, and a handle got before the head is lost
# reaches a live actor without it; so an actor made again under its name
# (the supervisor's heal, a move) must be looked up while the head is there,
# not at the first call to it, which may come only once the head is lost.
# A lookup cost 0.21 ms of the caller's CPU and 0.17 of the store's here;
# a one-host deployment holds about 14 refs that have been called.
HANDLE_REFRESH_S = 2.0
# Lookups run here, off the event loop, one at a time per ActorRef: with the
# head lost each waits for a new head, and in asyncio's default pool (six
# threads on two cores) they would hold up its other users.
_LOOKUPS = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="dailydoco-actor-lookup")
log = logging.getLogger("dailydoco.refs")


class ActorRef:
    def __init__(self, name: str, namespace: str):
        self.name = name
        self.namespace = namespace
        self._handle = None
        self._lookup: asyncio.Future | None = None
        self._refresh: asyncio.Task | None = None

    async def handle(self, within_s: float):
        """The actor's handle, its name looked up off the event loop, one
        lookup at a time; TimeoutError if not found within `within_s`. A
        lookup asks Ray's control store, on the head: with the head lost,
        `ray.get_actor` waits for it, and on the loop it stalled every
        request of the process, not only those for this actor (an API
        replica blocked so failed its health checks, and its ingress
        answered 503 to every read; session 44, test_head_node_loss.py).
        From the first call on, the name is looked up again every
        HANDLE_REFRESH_S (`_keep_fresh`)."""
        if self._refresh is None or self._refresh.done():
            self._refresh = start_shared_task(self._keep_fresh())
        if self._handle is None:
            # Shielded: a caller that gives up leaves the lookup to the others.
            self._handle = await asyncio.wait_for(asyncio.shield(self._looked_up()), max(0.0, within_s))
        return self._handle

    def _looked_up(self) -> asyncio.Future:
        """The lookup of the name under way, or a new one."""
        if self._lookup is None or self._lookup.done():
            # Its failure is its waiters' to raise, and none may be left.
            self._lookup = outcome_unread(asyncio.get_running_loop().run_in_executor(
                _LOOKUPS, functools.partial(ray.get_actor, self.name, namespace=self.namespace)))
        return self._lookup

    async def _keep_fresh(self) -> None:
        """Take the handle of whichever actor holds the name now, every
        HANDLE_REFRESH_S. Until session 55 a handle was looked up again
        only after a call on it had failed, so a process that had not
        called an actor since it was made again could not reach it once
        the head was lost: one way to a registration of
        test_head_node_loss.py that waited past the client's 15 s in a CI
        run (README, "The head host lost")."""
        while True:
            await asyncio.sleep(HANDLE_REFRESH_S)
            try:
                found = await asyncio.shield(self._looked_up())
            except ValueError:
                continue  # no actor holds the name now: calls wait for the one made next
            except Exception as exc:  # noqa: BLE001 - looked up again next time
                log.debug("%s: lookup failed (%r)", self.name, exc)
                continue
            if self._handle is None or self._handle._actor_id != found._actor_id:
                self._handle = found

    async def call(self, method: str, *args, deadline_s: float = ACTOR_RETRY_DEADLINE_S):
        deadline = time.monotonic() + deadline_s
        attempt = 0
        while True:
            try:
                handle = await self.handle(deadline - time.monotonic())
                return await getattr(handle, method).remote(*args)
            except (ActorDiedError, ActorUnavailableError, RayActorError, ValueError, TimeoutError) as exc:
                # ValueError: get_actor found no actor of that name (yet);
                # TimeoutError: the lookup did not answer before the deadline.
                if isinstance(exc, RayTaskError) and not isinstance(exc, RayActorError):
                    # The method ran and raised one of its own, which Ray's
                    # error also is (a database read that timed out): the
                    # caller's to hear. Retried, a registration in a Postgres
                    # stall waited out the stall (session 50).
                    raise
                self._handle = None
                if time.monotonic() >= deadline:
                    raise ServiceUnavailable(f"{self.name} is unavailable; retry with the same id") from exc
                await asyncio.sleep(ACTOR_RETRY_BACKOFF_S[min(attempt, len(ACTOR_RETRY_BACKOFF_S) - 1)])
                attempt += 1


class SilenceWatch:
    """Whether an actor answers, as this process's calls last found it.

    A caller that has waited for the actor in vain says so (`fell_silent`):
    the actor's callers then go elsewhere at once instead of each waiting in
    turn (serve/shard_reads.py: reads to the ledger; serve/ring_writes.py:
    writes to the next actor round the ring; RayShardRouter: deliveries to
    the shard's mailbox), while the actor is asked, one call at a time, whether it
    is `ready`: an actor made again answers that only once it can serve (a
    shard once it has rebuilt its memory; it answers a ping before). Any
    call made through `call` that returns ends the silence."""

    def __init__(self, actor: ActorRef, meanwhile: str):
        self.actor = actor
        self.meanwhile = meanwhile  # for the log: where its callers go while it is silent
        self.silent = False
        self._probe: asyncio.Task | None = None

    async def call(self, method: str, *args):
        result = await self.actor.call(method, *args)
        if self.silent:
            log.info("%s answers again; its callers go to it", self.actor.name)
            self.silent = False
        return result

    def fell_silent(self, waited_for: str) -> None:
        if not self.silent:
            log.warning("%s did not answer %s; %s until it does", self.actor.name, waited_for, self.meanwhile)
            self.silent = True
        self.probe()

    def probe(self) -> None:
        """Ask whether it is ready, unless a call asking is out already."""
        if self._probe is None or self._probe.done():
            # Its outcome is only whether it returns (see call).
            self._probe = outcome_unread(start_shared_task(self.call("ready")))

    async def answered(self, call: asyncio.Future) -> bool:
        """True once `call`, made to this actor, has returned or raised;
        False once the actor has fallen silent instead: each time the call
        has waited ANSWER_WAIT_S the actor is pinged, and one whose ping
        does not return within PING_WAIT_S is silent. `call` is left to
        finish or fail on its own."""
        while True:
            done, _ = await asyncio.wait({call}, timeout=ANSWER_WAIT_S)
            if done:
                return True
            ping = outcome_unread(asyncio.ensure_future(self.call("ping")))
            done, _ = await asyncio.wait({call, ping}, timeout=PING_WAIT_S, return_when=asyncio.FIRST_COMPLETED)
            if call in done:
                ping.cancel()
                return True
            if ping in done and ping.exception() is None:
                continue  # alive, the call slow: keep waiting for it
            ping.cancel()
            self.fell_silent(f"a ping within {PING_WAIT_S:g} s, with a call waiting on it")
            return False


class ShardMailbox:
    """Posts to one shard, sent as one `apply_many` call per round.

    Everything posted while a call is in flight goes in the next one, so under
    load one Ray message carries many commits. A shard that is down is
    retried (ActorRef) until the supervisor has it back; its recovery fences
    out whatever it already holds.
    """

    def __init__(self, shard: ActorRef):
        self.shard = shard
        self._posted: list[tuple[int, ShardDelta]] = []
        self._sending: asyncio.Task | None = None

    def post(self, xid: int, delta: ShardDelta) -> None:
        self._posted.append((xid, delta))
        if self._sending is None or self._sending.done():
            self._sending = start_shared_task(self._send())  # carries others' deliveries too

    async def _send(self) -> None:
        while self._posted:
            # Let posts gather a moment first: fewer, larger calls cost the
            # chain and the shard far less CPU than a call per commit, and
            # shard memory trails the (already durable) ledger by this much more.
            await asyncio.sleep(SHARD_POST_GATHER_S)
            batch, self._posted = self._posted, []
            while True:
                try:
                    await self.shard.call("apply_many", batch, deadline_s=MAILBOX_RETRY_DEADLINE_S)
                    break
                except ServiceUnavailable:
                    log.warning("shard %s unreachable; still holding %d deliveries", self.shard.name, len(batch))

    async def drained(self) -> None:
        while self._sending is not None and not self._sending.done():
            await asyncio.shield(self._sending)


class RayShardRouter:
    def __init__(self, namespace: str, shard_count: int):
        self.shard_count = shard_count
        self.shards = [ActorRef(shard_actor_name(i), namespace) for i in range(shard_count)]
        self.mailboxes = [ShardMailbox(ref) for ref in self.shards]
        self.silences = [SilenceWatch(ref, "deliveries to it wait in its mailbox") for ref in self.shards]

    async def deliver_one(self, shard_index: int, xid: int, delta: ShardDelta) -> None:
        """Return once the shard holds the delivery, or once the shard is
        silent (SilenceWatch.answered) and its mailbox holds it instead, to
        deliver when it answers again (one made again rebuilds it from the
        ledger anyway). So a write delivered before its response (a
        registration, a refund, a payout) waits for the shards it changes
        only while they answer: a shard lost with the Ray head is made again
        only once a new head is up, and until session 47 such writes waited
        for it up to a minute, then 503, committed all the same."""
        silence = self.silences[shard_index]
        if silence.silent:
            silence.probe()
        else:
            call = outcome_unread(asyncio.ensure_future(silence.call("apply", xid, delta)))
            if await silence.answered(call):
                call.result()  # its error, if any, is the write's, as before
                return
        # The call given up may land too, when the shard wakes: its xid fence
        # drops whichever of the two comes second.
        self.post_one(shard_index, xid, delta)

    def post_one(self, shard_index: int, xid: int, delta: ShardDelta) -> None:
        self.mailboxes[shard_index].post(xid, delta)

    async def reload(self, shard_index: int) -> None:
        await self.shards[shard_index].call("reload")

    async def drained(self) -> None:
        await asyncio.gather(*(m.drained() for m in self.mailboxes))
