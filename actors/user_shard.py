"""UserShardActor: the Ray shell around one ShardState."""

from __future__ import annotations

import asyncio

import ray
import redis.asyncio as redis

from dailydoco.cluster.config import EngineConfig
from dailydoco.cluster.heap import freeze_startup_heap
from dailydoco.cluster.process_log import log_to_stderr
from dailydoco.protocol import BalanceView, NetworkStats, RegisterUserRequest, RegistrationResult, UserView
from dailydoco.storage.balance_views import BalanceViewWriter
from dailydoco.storage.deltas import ShardDelta
from dailydoco.storage.pool import REQUEST_COMMAND_TIMEOUT_S, open_pool
from dailydoco.storage.sharding import vshards_of_actor

from .live_publisher import publishing_ledger
from .recovery import recover_shard
from .refs import RayShardRouter
from .registration import register_user
from .shard_core import ShardState
from .watch import LIVENESS_GROUPS, Watched

BALANCE_VIEW_WRITE_TIMEOUT_S = 2.0  # a hung Redis holds deliveries no longer than this


class LocalFirstRouter(RayShardRouter):
    """Deliveries (and rereads) of this very shard skip Ray: an actor must not await itself.
    A registration's delivery is posted only to a shard found silent, never
    this one, so post_one is never local."""

    def __init__(self, namespace: str, shard_count: int, owner: "UserShardActor"):
        super().__init__(namespace, shard_count)
        self.owner = owner

    async def deliver_one(self, shard_index: int, xid: int, delta: ShardDelta) -> None:
        if shard_index == self.owner.index:
            await self.owner.apply(xid, delta)
        else:
            await super().deliver_one(shard_index, xid, delta)

    async def reload(self, shard_index: int) -> None:
        if shard_index == self.owner.index:
            await self.owner.reload()
        else:
            await super().reload(shard_index)


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=1_000, concurrency_groups=LIVENESS_GROUPS)
class UserShardActor(Watched):
    """Owns the users of its virtual shards: records, statistics, balances.

    Guarantees: its memory equals the ledger's (checkpoint + rows after it)
    plus every delta delivered since, each applied once; after a crash the
    supervisor recreates it and `_ensure_ready` rebuilds exactly that state.
    A delivery returns once the balance views it changed are written to Redis
    (storage/balance_views.py), or their write failed and the lease will lapse.
    """

    def __init__(self, index: int, config: EngineConfig, postgres_url: str, redis_url: str, nats_url: str):
        log_to_stderr()
        self.keep_loop_ticking()
        self.index = index
        self.config = config
        self.postgres_url = postgres_url
        self.redis_url = redis_url
        self.nats_url = nats_url
        self.vshards = vshards_of_actor(index, config.shard_actors)
        self.state: ShardState | None = None
        self._ready_lock = asyncio.Lock()
        self._reloading: list[tuple[int, ShardDelta]] | None = None
        self._reload_lock = asyncio.Lock()

    async def _ensure_ready(self) -> ShardState:
        if self.state is None:
            async with self._ready_lock:
                if self.state is None:
                    # Recovery's long reads, one at a time (_reload_lock), wait
                    # asyncpg's 60 s; registrations give up sooner, as the chains' writes do.
                    self.pool = await open_pool(self.postgres_url, max_size=1)
                    registrations = await open_pool(self.postgres_url, max_size=2,
                                                    command_timeout_s=REQUEST_COMMAND_TIMEOUT_S)
                    self.ledger = publishing_ledger(registrations, self.config, self.nats_url,
                                                    f"dailydoco-shard-{self.index}")
                    self.router = LocalFirstRouter(self.config.namespace, self.config.shard_actors, self)
                    state = await recover_shard(self.pool, self.vshards)
                    self.views = BalanceViewWriter(
                        redis.from_url(self.redis_url, socket_timeout=BALANCE_VIEW_WRITE_TIMEOUT_S),
                        state.stream_epoch, self.index, self._balance_view, lambda: list(self.state.users))
                    await self.views.take_over(list(state.users))
                    # Published last: calls that see a state skip the lock, and
                    # their deliveries must not write views before take_over.
                    self.state = state
                    freeze_startup_heap()  # the recovered state included
        return self.state

    def _balance_view(self, user_id: str) -> BalanceView | None:
        return self.state.balance_view(user_id) if user_id in self.state.users else None

    async def ready(self) -> int:
        return len((await self._ensure_ready()).users)

    async def apply(self, xid: int, delta: ShardDelta) -> bool:
        return await self.apply_many([(xid, delta)]) == 1

    async def apply_many(self, deliveries: list[tuple[int, ShardDelta]]) -> int:
        """Coalesced deliveries (see refs.ShardMailbox); returns how many were new."""
        state = await self._ensure_ready()
        if self._reloading is not None:
            self._reloading.extend(deliveries)
        applied, changed = 0, set()
        for xid, delta in deliveries:
            if state.apply(xid, delta):
                applied += 1
                changed |= delta.users_with_new_balance_view()
        await self.views.publish(changed)
        return applied

    async def reload(self) -> int:
        """Rebuild from the ledger, picking up writes whose delivery was lost
        (a writer that crashed between its commit and its delivery, or
        whose commit's outcome it never heard). One at a time: deliveries
        that arrive during a reload are kept for it alone."""
        await self._ensure_ready()
        async with self._reload_lock:
            self._reloading = []
            try:
                fresh = await recover_shard(self.pool, self.vshards)
                for xid, delta in self._reloading:
                    fresh.apply(xid, delta)  # the fence drops what the new snapshot holds
                self.state = fresh
            finally:
                self._reloading = None
        await self.views.publish(fresh.users)  # the rebuilt state may differ from what memory had
        return len(fresh.users)

    async def register(self, request: RegisterUserRequest) -> RegistrationResult:
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
