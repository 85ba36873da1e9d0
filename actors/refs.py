"""All Ray calls between our actors go through here.

A named actor that dies is recreated under the same name by the supervisor;
`ActorRef` re-resolves the name and retries until a deadline. Every method we
call through it is idempotent (ids and xid fences), so a retry after an
unknown outcome is safe.
"""

from __future__ import annotations

import asyncio
import time

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from dailydoco.protocol import ServiceUnavailable
from dailydoco.storage.deltas import ShardDelta

# A restart (new worker process + recovery from Postgres) takes a few seconds
# on this machine; callers wait this long before giving up with 503.
ACTOR_RETRY_DEADLINE_S = 60.0
ACTOR_RETRY_BACKOFF_S = (0.05, 0.1, 0.2, 0.5, 1.0)


def shard_actor_name(index: int) -> str:
    return f"user-shard-{index}"


def chain_actor_name(index: int) -> str:
    return f"commission-chain-{index}"


SUPERVISOR_NAME = "supervisor"


class ActorRef:
    def __init__(self, name: str, namespace: str):
        self.name = name
        self.namespace = namespace
        self._handle = None

    def handle(self):
        if self._handle is None:
            self._handle = ray.get_actor(self.name, namespace=self.namespace)
        return self._handle

    async def call(self, method: str, *args, deadline_s: float = ACTOR_RETRY_DEADLINE_S):
        deadline = time.monotonic() + deadline_s
        attempt = 0
        while True:
            try:
                return await getattr(self.handle(), method).remote(*args)
            except (ActorDiedError, ActorUnavailableError, RayActorError, ValueError) as exc:
                # ValueError: get_actor found no actor of that name (yet).
                self._handle = None
                if time.monotonic() >= deadline:
                    raise ServiceUnavailable(f"{self.name} is unavailable; retry with the same id") from exc
                await asyncio.sleep(ACTOR_RETRY_BACKOFF_S[min(attempt, len(ACTOR_RETRY_BACKOFF_S) - 1)])
                attempt += 1


class RayShardRouter:
    def __init__(self, namespace: str, shard_count: int):
        self.shard_count = shard_count
        self.shards = [ActorRef(shard_actor_name(i), namespace) for i in range(shard_count)]

    async def deliver_one(self, shard_index: int, xid: int, delta: ShardDelta) -> None:
        await self.shards[shard_index].call("apply", xid, delta)
