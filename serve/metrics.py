"""`/metrics` for the whole deployment, whichever replica a scrape reaches.

Each replica counts its own requests in memory (prometheus_client: nothing
on the request path). Behind HAProxy a scrape lands on one replica, so each
replica writes its exposition to one Redis hash every
`REPLICA_METRICS_INTERVAL_S`, and `/metrics` answers with the series of every
replica heard from in the last `REPLICA_METRICS_STALE_S`, as last written,
each labelled with its `replica`: at most an interval old. Sum across
replicas in the query (`sum without (replica) (...)`).

Beside them, the engine's backlog (`EngineBacklog`), read from Postgres by
the replica a scrape reaches: one value for the whole engine, with no
`replica` label, and the same in every region's scrape.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable

import msgspec
import redis.asyncio as redis
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from dailydoco.actors.batching import start_shared_task
from dailydoco.storage.outbox import BACKLOG_COUNT_MAX
from dailydoco.storage.partitions import LEDGER_MONTHS_AHEAD
from dailydoco.storage.pool import answered_within

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


class EngineBacklog(msgspec.Struct, frozen=True):
    """What the engine owes and has not done yet: what an operator alerts on."""

    outbox_rows: int  # live events committed and not yet published to NATS (counted up to a cap)
    outbox_oldest_age_s: float
    payouts_unfinished: int  # cut short; the supervisor finishes them
    ledger_partitions_missing: int  # of the months the supervisor keeps made (storage/partitions.py)
    ledger_default_partition_rows: int  # no month took them (counted up to the same cap)


# /metrics is open to anyone: however often it is scraped, a replica reads
# the backlog from Postgres at most this often, and concurrent scrapes share
# one read.
BACKLOG_READ_EVERY_S = 5.0


class EngineBacklogReader:
    def __init__(self, read: Callable[[], Awaitable[EngineBacklog]], timeout_s: float):
        self._read = read
        self._timeout_s = timeout_s
        self._last: asyncio.Task | None = None
        self._last_started_at = 0.0

    async def current(self) -> EngineBacklog | None:
        """The backlog read at most BACKLOG_READ_EVERY_S ago; None if that
        read failed or took over `timeout_s` (Postgres away or stalled: a
        scrape must answer meanwhile, and say so)."""
        if self._last is None or time.monotonic() - self._last_started_at >= BACKLOG_READ_EVERY_S:
            self._last_started_at = time.monotonic()
            self._last = start_shared_task(self._read_within())
        return await asyncio.shield(self._last)  # a scraper that hangs up leaves the read to the others

    async def _read_within(self) -> EngineBacklog | None:
        try:
            return await answered_within(self._read(), self._timeout_s)
        except Exception as exc:  # noqa: BLE001 - reported in the scrape, as readiness does
            log.warning("reading the engine's backlog for /metrics failed: %r", exc)
            return None


def backlog_exposition(backlog: EngineBacklog | None) -> bytes:
    """`backlog` as Prometheus text; None: `dailydoco_engine_backlog_up 0`
    alone, rather than values that are not known."""
    registry = CollectorRegistry()
    Gauge("dailydoco_engine_backlog_up", "1 if Postgres answered the last read of the backlog in time",
          registry=registry).set(backlog is not None)
    if backlog is not None:
        Gauge("dailydoco_outbox_rows",
              f"Live events committed and not yet published to NATS (counted up to {BACKLOG_COUNT_MAX:,})",
              registry=registry).set(backlog.outbox_rows)
        Gauge("dailydoco_outbox_oldest_row_age_seconds",
              "Age of the oldest unpublished live event, by Postgres's clock (0: none)",
              registry=registry).set(backlog.outbox_oldest_age_s)
        Gauge("dailydoco_payouts_unfinished",
              "Payouts cut short and not yet finished (the supervisor retries them every sweep)",
              registry=registry).set(backlog.payouts_unfinished)
        Gauge("dailydoco_ledger_partitions_missing",
              f"Months of the ledger without their partition, of the current one and the {LEDGER_MONTHS_AHEAD} after"
              " it that the supervisor keeps made",
              registry=registry).set(backlog.ledger_partitions_missing)
        Gauge("dailydoco_ledger_default_partition_rows",
              f"Ledger rows in the default partition, which no month took (counted up to {BACKLOG_COUNT_MAX:,})",
              registry=registry).set(backlog.ledger_default_partition_rows)
    return generate_latest(registry)
