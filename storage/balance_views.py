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
mid-write cannot overwrite what its successor wrote.

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

# KEYS: generation, lease, view...; ARGV: generation, lease ttl (ms; 0 = do
# not renew), body... Returns 1 written, 0 another generation owns the shard,
# -1 the generation key is gone (Redis lost its data: take a new one).
_WRITE = """
local gen = redis.call('GET', KEYS[1])
if not gen then return -1 end
if gen ~= ARGV[1] then return 0 end
for i = 3, #KEYS do redis.call('SET', KEYS[i], ARGV[i]) end
if ARGV[2] ~= '0' then redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2]) end
return 1
"""

# KEYS: generation, lease. A new writer's generation, with the old lease gone.
_TAKE_GENERATION = """
local gen = redis.call('INCR', KEYS[1])
redis.call('DEL', KEYS[2])
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
        self._view_of = view_of
        self._all_users = all_users
        self._script = client.register_script(_WRITE)
        self._take_generation = client.register_script(_TAKE_GENERATION)
        self._encoder = msgspec.json.Encoder()
        self._generation: int | None = None
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
        self._generation = None
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
            keys, bodies = [self._generation_key, self._lease_key], []
            for user_id in ordered[start:start + VIEWS_PER_WRITE_MAX]:
                view = self._view_of(user_id)
                if view is not None:
                    keys.append(view_key(self._epoch, user_id))
                    bodies.append(self._encoder.encode(view))
            last = start + VIEWS_PER_WRITE_MAX >= len(ordered)
            renew = LEASE_TTL_MS if last and not (self._unwritten - users) else 0
            outcome = await self._script(keys=keys, args=[self._generation, renew, *bodies])
            if outcome == -1:
                # Redis lost its data (a restart without persistence): every
                # view is gone, so take a new generation and write them all.
                self._generation = None
                self._unwritten.update(self._all_users())
                raise redis.RedisError("Redis lost this shard's generation key; writing every view again")
            if outcome == 0:
                self.superseded = True
                log.warning("a newer start of this shard writes its balance views now; this one stops")
                return
        self._unwritten -= users

    async def _ensure_generation(self) -> None:
        """Take a generation if this start holds none (at start, or after Redis lost its data)."""
        async with self._generation_lock:
            if self._generation is None:
                self._generation = await self._take_generation(keys=[self._generation_key, self._lease_key])

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
