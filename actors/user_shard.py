"""UserShardActor: the Ray shell around one ShardState."""

from __future__ import annotations

import asyncio

import ray

from dailydoco.cluster.config import EngineConfig
from dailydoco.cluster.heap import freeze_startup_heap
from dailydoco.protocol import BalanceView, NetworkStats, RegisterUserRequest, UserView
from dailydoco.storage.deltas import ShardDelta
from dailydoco.storage.ledger import Ledger
from dailydoco.storage.pool import open_pool
from dailydoco.storage.sharding import vshards_of_actor

from .recovery import recover_shard
from .refs import RayShardRouter
from .registration import register_user
from .shard_core import ShardState


class LocalFirstRouter(RayShardRouter):
    """Deliveries to this very shard skip Ray: an actor must not await itself.
    Registration delivers synchronously only, so post_one is never local."""

    def __init__(self, namespace: str, shard_count: int, owner: "UserShardActor"):
        super().__init__(namespace, shard_count)
        self.owner = owner

    async def deliver_one(self, shard_index: int, xid: int, delta: ShardDelta) -> None:
        if shard_index == self.owner.index:
            await self.owner.apply(xid, delta)
        else:
            await super().deliver_one(shard_index, xid, delta)


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=1_000)
class UserShardActor:
    """Owns the users of its virtual shards: records, statistics, balances.

    Guarantees: its memory equals the ledger's (checkpoint + rows after it)
    plus every delta delivered since, each applied once; after a crash the
    supervisor recreates it and `_ensure_ready` rebuilds exactly that state.
    """

    def __init__(self, index: int, config: EngineConfig, postgres_url: str):
        self.index = index
        self.config = config
        self.postgres_url = postgres_url
        self.vshards = vshards_of_actor(index, config.shard_actors)
        self.state: ShardState | None = None
        self._ready_lock = asyncio.Lock()
        self._reloading: list[tuple[int, ShardDelta]] | None = None

    async def _ensure_ready(self) -> ShardState:
        if self.state is None:
            async with self._ready_lock:
                if self.state is None:
                    self.pool = await open_pool(self.postgres_url, max_size=3)
                    self.ledger = Ledger(self.pool, self.config.hold_period_s)
                    self.router = LocalFirstRouter(self.config.namespace, self.config.shard_actors, self)
                    self.state = await recover_shard(self.pool, self.vshards)
                    freeze_startup_heap()  # the recovered state included
        return self.state

    async def ready(self) -> int:
        return len((await self._ensure_ready()).users)

    async def apply(self, xid: int, delta: ShardDelta) -> bool:
        state = await self._ensure_ready()
        if self._reloading is not None:
            self._reloading.append((xid, delta))
        return state.apply(xid, delta)

    async def apply_many(self, deliveries: list[tuple[int, ShardDelta]]) -> int:
        """Coalesced deliveries (see refs.ShardMailbox); returns how many were new."""
        applied = 0
        for xid, delta in deliveries:
            applied += await self.apply(xid, delta)
        return applied

    async def reload(self) -> int:
        """Rebuild from the ledger, picking up writes whose delivery was lost
        (a writer that crashed between its commit and its delivery)."""
        await self._ensure_ready()
        self._reloading = []
        try:
            fresh = await recover_shard(self.pool, self.vshards)
            for xid, delta in self._reloading:
                fresh.apply(xid, delta)  # the fence drops what the new snapshot holds
            self.state = fresh
        finally:
            self._reloading = None
        return len(fresh.users)

    async def register(self, request: RegisterUserRequest) -> UserView:
        await self._ensure_ready()
        return await register_user(self.ledger, self.router, request)

    async def get_user(self, user_id: str) -> UserView | None:
        return (await self._ensure_ready()).user_view(user_id)

    async def get_balances(self, user_ids: list[str]) -> list[BalanceView | None]:
        """Many reads in one call: the API coalesces concurrent ones (MicroBatcher)."""
        state = await self._ensure_ready()
        return [state.balance_view(u) if u in state.users else None for u in user_ids]

    async def get_network_stats(self, user_id: str) -> NetworkStats | None:
        state = await self._ensure_ready()
        return state.network_stats(user_id) if user_id in state.users else None

    async def dump_balances(self) -> dict[str, dict[str, list[int]]]:
        """Every user's balances, for audits against the ledger."""
        state = await self._ensure_ready()
        return {u: {c: list(b) for c, b in s.balances.items()} for u, s in state.stats.items() if s.balances}

    def ping(self) -> int:
        return self.index
