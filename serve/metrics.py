"""`/metrics` for the whole deployment, whichever replica a scrape reaches.

Each replica counts its own requests in memory (prometheus_client: nothing
on the request path). Behind HAProxy a scrape lands on one replica, so each
replica writes its exposition to one Redis hash every
`REPLICA_METRICS_INTERVAL_S`, and `/metrics` answers with the series of every
replica heard from in the last `REPLICA_METRICS_STALE_S`, as last written,
each labelled with its `replica`: at most an interval old. Sum across
replicas in the query (`sum without (replica) (...)`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import msgspec
import redis.asyncio as redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

REPLICA_METRICS_INTERVAL_S = 1.0
# A replica not heard from for this long is gone (stopped, replaced): its
# series leave /metrics and its entry the hash. Many intervals, so a replica
# that is merely busy for a moment keeps its series.
REPLICA_METRICS_STALE_S = 15.0
REPLICA_LABEL = "replica"
CONTENT_TYPE = "text/plain; version=0.0.4"
log = logging.getLogger("dailydoco.metrics")


class _Snapshot(msgspec.Struct, array_like=True, frozen=True):
    written_at_s: float  # the writer's wall clock
    exposition: bytes


class _Families:
    """Parsed expositions as one collector, for `generate_latest`."""

    def __init__(self):
        self._families: dict[str, Metric] = {}

    def add(self, replica: str, exposition: str) -> None:
        for parsed in text_string_to_metric_families(exposition):
            family = self._families.setdefault(
                parsed.name, Metric(parsed.name, parsed.documentation, parsed.type, parsed.unit))
            for s in parsed.samples:
                family.add_sample(s.name, {**s.labels, REPLICA_LABEL: replica}, s.value, s.timestamp, s.exemplar)

    def collect(self):
        return iter(self._families.values())


class ReplicaMetrics:
    def __init__(self, registry: CollectorRegistry, redis_client: redis.Redis, deployment: str):
        self.registry = registry
        self.redis = redis_client
        self.key = f"dd:metrics:{deployment}"
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(_Snapshot)

    async def publish_forever(self) -> None:
        while True:
            try:
                await self.publish()
            except Exception as exc:  # noqa: BLE001 - logged, and tried again: the loop must outlive any one failure
                # Redis away: this replica's own scrapes show its live series; in
                # the others' its entry ages out after REPLICA_METRICS_STALE_S.
                log.warning("publishing this replica's metrics failed: %r", exc)
            await asyncio.sleep(REPLICA_METRICS_INTERVAL_S)

    async def publish(self) -> None:
        snapshot = _Snapshot(time.time(), generate_latest(self.registry))
        await self.redis.hset(self.key, self.replica, self._encoder.encode(snapshot))

    async def exposition(self) -> bytes:
        """Every live replica's series as last published, this one's
        included: whichever replica a scrape reaches, it reads the same
        values, so no counter seems to go back between two scrapes."""
        families = _Families()
        try:
            stored = await self.redis.hgetall(self.key)
        except (OSError, redis.RedisError) as exc:
            # This replica's live series alone, however long Redis is away
            # (once Redis is back, a series may read up to an interval lower
            # than the scrape before did, that once).
            log.warning("reading the replicas' metrics failed: %s", exc)
            families.add(self.replica, generate_latest(self.registry).decode())
            return generate_latest(families)
        now, stale = time.time(), []
        for replica, raw in sorted(stored.items()):
            snapshot = self._decoder.decode(raw)
            if now - snapshot.written_at_s > REPLICA_METRICS_STALE_S:
                stale.append(replica)
                continue
            families.add(replica.decode(), snapshot.exposition.decode())
        if stale:
            try:
                await self.redis.hdel(self.key, *stale)
            except (OSError, redis.RedisError):
                pass  # the next scrape drops them again
        return generate_latest(families)
