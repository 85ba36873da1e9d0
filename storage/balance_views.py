"""Balance views in Redis: what GET /v1/users/{id}/balance answers from.

A shard actor writes the view of every user whose balance (or live-stream
offset) it just changed: the endpoint's JSON body, byte for byte. A replica
then answers a balance read with one Redis round trip and no Ray call, which
on this project's machine cost the read path most of its latency (p50 9 ms
through the shard against 1.3 ms for the same stack with no work).

Freshness. A view trails the shard's memory by one Redis write, and shard
memory trails the ledger by its delivery (tens of milliseconds, refs.py).
A shard renews a lease (a key with a short expiry) with every write that
leaves nothing of its own unwritten; a reader uses a shard's views only while
its lease lives and otherwise asks the shard. So a shard that cannot reach
Redis, or has fallen behind, is read from memory again within LEASE_TTL_MS.

Fencing. Each start of a shard actor takes a new generation (INCR), and the
write script drops writes of any other generation: a shard process that died
mid-write cannot overwrite what its successor wrote. Within a generation,
each write of views carries a sequence number, and Redis drops one older than
the last it applied: a write the shard gave up on (Redis stalled past the
socket timeout, which it counts as failed and writes again) can reach Redis
after a newer write on another connection, and would otherwise put back an
old view, under a live lease, until that user's balance next changed.

Lost writes. Redis can come back holding less than it acknowledged: a
restart without persistence, or from a snapshot older than the last writes,
or a failover to a replica that lagged. The writer knows the last sequence
number Redis applied for it; a write (the lease renewals included, every
LEASE_RENEW_S) that finds Redis short of it, or the generation gone, drops
the lease and writes every view of the shard again.

Keys carry the database's stream epoch, so deployments that share a Redis
(tests against one external server) never read each other's views.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Iterable

import msgspec
import redis.asyncio as redis

from dailydoco.protocol import BalanceView

log = logging.getLogger("dailydoco.balance_views")

LEASE_TTL_MS = 2_000
LEASE_RENEW_S = 0.5
# Views per write script: a Lua call holds Redis for its whole run, and unpacking
# very long argument lists costs more than several calls.
VIEWS_PER_WRITE_MAX = 2_000

# KEYS: generation, lease, last sequence, view...; ARGV: generation, lease ttl
# (ms; 0 = do not renew), sequence, acknowledged sequence, body... A write of
# views has a sequence number of its own, above the last, and records it; a
# lease-only write carries the last one sent and records nothing. Returns:
#  1 written;
#  0 a newer start of the shard owns it;
# -1 Redis lost writes it had acknowledged: the generation is gone or older
#    than the writer's, or the last sequence is below the acknowledged one
#    (a restart without persistence or from an older snapshot, a failover to
#    a replica that lagged). Nothing written: take a new generation and
#    write every view again, or the lost ones would be served stale;
#  2 a newer write of this shard came first: this one is stale, nothing written.
_WRITE = """
local gen, mine = tonumber(redis.call('GET', KEYS[1]) or '0'), tonumber(ARGV[1])
if gen > mine then return 0 end
local seq, last = tonumber(ARGV[3]), tonumber(redis.call('GET', KEYS[3]) or '0')
if gen < mine or last < tonumber(ARGV[4]) then
  redis.call('DEL', KEYS[2])  -- readers ask the shard until every view is written again
  return -1
end
if seq < last or (#KEYS > 3 and seq == last) then return 2 end
if #KEYS > 3 then redis.call('SET', KEYS[3], ARGV[3]) end
for i = 4, #KEYS do redis.call('SET', KEYS[i], ARGV[i + 1]) end
if ARGV[2] ~= '0' then redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2]) end
return 1
"""

# KEYS: generation, lease, last sequence; ARGV: the writer's sequence now, the
# generation it held last (0: none). A new generation for the writer, above
# any it held (Redis that lost its data counts from 0 again), with the old
# lease gone. The sequence floor is the writer's own (a new process starts
# from 0): a write it sent before a loss and that arrives late is refused.
_TAKE_GENERATION = """
local gen = redis.call('INCR', KEYS[1])
if gen <= tonumber(ARGV[2]) then
  gen = tonumber(ARGV[2]) + 1
  redis.call('SET', KEYS[1], gen)
end
redis.call('DEL', KEYS[2])
redis.call('SET', KEYS[3], ARGV[1])
return gen
"""


def _prefix(epoch: str) -> str:
    return f"dd:{epoch}:bal:"


def view_key(epoch: str, user_id: str) -> str:
    return f"{_prefix(epoch)}v:{user_id}"


def lease_key(epoch: str, shard_index: int) -> str:
    return f"{_prefix(epoch)}lease:{shard_index}"


def generation_key(epoch: str, shard_index: int) -> str:
    return f"{_prefix(epoch)}gen:{shard_index}"


def sequence_key(epoch: str, shard_index: int) -> str:
    return f"{_prefix(epoch)}seq:{shard_index}"


class BalanceViewWriter:
    """One shard actor's writes. `publish` returns once the views of the given
    users, as they are at the time of the write, are in Redis (or the write
    failed, which it logs). One write is in flight at a time and users marked
    meanwhile go in the next, so the last write of each key is its latest view."""

    def __init__(self, client: redis.Redis, epoch: str, shard_index: int,
                 view_of: Callable[[str], BalanceView | None], all_users: Callable[[], Iterable[str]]):
        self._client = client
        self._epoch = epoch
        self._generation_key = generation_key(epoch, shard_index)
        self._lease_key = lease_key(epoch, shard_index)
        self._sequence_key = sequence_key(epoch, shard_index)
        self._sequence = 0  # of the last write of views sent
        self._acknowledged = 0  # of the last write of views Redis applied
        self._view_of = view_of
        self._all_users = all_users
        self._script = client.register_script(_WRITE)
        self._take_generation = client.register_script(_TAKE_GENERATION)
        self._encoder = msgspec.json.Encoder()
        self._generation: int | None = None
        self._last_generation = 0  # held before; a new one is taken above it
        # One generation per start: two taken at once (a delivery's write and
        # the renewal loop, after Redis was down) would supersede each other.
        self._generation_lock = asyncio.Lock()
        self._marked: set[str] = set()  # to write next
        self._unwritten: set[str] = set()  # a write failed: the renewal loop retries them
        self._writing: asyncio.Task | None = None
        self._renewing: asyncio.Task | None = None
        self.superseded = False

    async def take_over(self, user_ids: Iterable[str]) -> None:
        """Take over from any earlier start of this shard: a new generation
        (fencing out the old writer) and its lease dropped, so readers ask
        this shard until the views of `user_ids` (all its users) are written
        again, in the background; then keep the lease."""
        self._last_generation, self._generation = self._generation or self._last_generation, None
        try:
            await self._ensure_generation()
        except (redis.RedisError, OSError) as exc:
            log.warning("Redis unreachable at start (%r): balance views are written once it is back", exc)
        self._unwritten.update(user_ids)
        if self._renewing is None:
            self._renewing = asyncio.get_running_loop().create_task(self._renew_forever())

    def close(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()

    async def publish(self, user_ids: Iterable[str]) -> None:
        self._marked.update(user_ids)
        while self._marked and not self.superseded:
            if self._writing is None or self._writing.done():
                self._writing = asyncio.get_running_loop().create_task(self._write_marked())
            await asyncio.shield(self._writing)

    async def _write_marked(self) -> None:
        users, self._marked = self._marked, set()
        try:
            await self._write(users)
        except (redis.RedisError, OSError) as exc:
            if not self._unwritten:
                log.warning("balance views not written (%r): reads of this shard go to it until they are", exc)
            self._unwritten |= users

    async def _write(self, users: set[str]) -> None:
        """Write `users`' views; renew the lease with the last chunk unless
        some view of this shard is still unwritten."""
        await self._ensure_generation()
        ordered = list(users)
        for start in range(0, max(1, len(ordered)), VIEWS_PER_WRITE_MAX):
            keys, bodies = [self._generation_key, self._lease_key, self._sequence_key], []
            for user_id in ordered[start:start + VIEWS_PER_WRITE_MAX]:
                view = self._view_of(user_id)
                if view is not None:
                    keys.append(view_key(self._epoch, user_id))
                    bodies.append(self._encoder.encode(view))
            if bodies:
                self._sequence += 1
            sequence, generation = self._sequence, self._generation
            last = start + VIEWS_PER_WRITE_MAX >= len(ordered)
            renew = LEASE_TTL_MS if last and not (self._unwritten - users) else 0
            outcome = await self._script(
                keys=keys, args=[generation, renew, sequence, self._acknowledged, *bodies])
            if outcome == -1:
                if generation == self._generation:
                    self._last_generation, self._generation = generation, None
                    self._unwritten.update(self._all_users())
                raise redis.RedisError("Redis lost balance views it had acknowledged; writing every view again")
            if outcome == 2 and not bodies:
                return  # a lease renewal that a newer write overtook: nothing of it is lost
            if outcome == 2 or (outcome == 0 and generation != self._generation):
                # Sent before a newer write of this writer that Redis applied
                # first (a write whose client gave up, or one sent before a
                # new generation). Raised, so its users are written again.
                raise redis.RedisError("a newer write of this shard's views reached Redis first")
            if outcome == 0:
                self.superseded = True
                log.warning("a newer start of this shard writes its balance views now; this one stops")
                return
            if bodies:
                self._acknowledged = max(self._acknowledged, sequence)
        self._unwritten -= users

    async def _ensure_generation(self) -> None:
        """Take a generation if this start holds none (at start, or after Redis lost its data)."""
        async with self._generation_lock:
            if self._generation is None:
                self._generation = await self._take_generation(
                    keys=[self._generation_key, self._lease_key, self._sequence_key],
                    args=[self._sequence, self._last_generation])

    async def _renew_forever(self) -> None:
        while not self.superseded:
            users, self._unwritten = self._unwritten, set()
            if users:
                await self.publish(users)
            else:
                try:
                    await self._write(set())  # the lease alone
                except (redis.RedisError, OSError):
                    pass  # the lease lapses: readers go to the shard, as they should
            await asyncio.sleep(LEASE_RENEW_S)


class BalanceViewReader:
    """A replica's reads: the view body, or None where the shard must answer."""

    def __init__(self, client: redis.Redis, epoch: str):
        self._client = client
        self._epoch = epoch

    def keys(self, user_id: str, shard_index: int) -> tuple[str, str]:
        """What a read fetches: for a caller that has a round trip to Redis to share."""
        return view_key(self._epoch, user_id), lease_key(self._epoch, shard_index)

    @staticmethod
    def body(values: list[bytes | None]) -> bytes | None:
        """The view body from the values of `keys`, if the shard's lease lives."""
        body, lease = values
        return body if lease is not None else None

    async def read(self, user_id: str, shard_index: int) -> bytes | None:
        try:
            return self.body(await self._client.mget(*self.keys(user_id, shard_index)))
        except (redis.RedisError, OSError):
            return None
