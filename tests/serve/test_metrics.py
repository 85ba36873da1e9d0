"""Deployment-wide /metrics (serve/metrics.py), on the session's real Redis."""

import asyncio
import time
import uuid

import msgspec
import redis.asyncio as redis
from prometheus_client import CollectorRegistry, Counter

from dailydoco.serve import metrics as m
from dailydoco.serve.metrics import ReplicaMetrics


def _replica(client, deployment: str, name: str, served: int) -> ReplicaMetrics:
    registry = CollectorRegistry()
    Counter("dailydoco_http_requests_total", "HTTP requests", ["route"], registry=registry).labels("balance").inc(served)
    replica = ReplicaMetrics(registry, client, deployment)
    replica.replica = name  # two replicas in one test process
    return replica


def _served(exposition: bytes) -> dict[str, float]:
    """requests by replica label"""
    found = {}
    for line in exposition.decode().splitlines():
        if line.startswith("dailydoco_http_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            found[labels.split('replica="')[1].split('"')[0]] = float(value)
    return found


def test_every_live_replica_is_in_one_scrape_and_a_gone_one_leaves(servers):
    async def main():
        client = redis.from_url(servers[2])
        deployment = f"test-{uuid.uuid4().hex[:8]}"
        try:
            a, b, gone = (_replica(client, deployment, n, k) for n, k in (("a", 3), ("b", 5), ("gone", 7)))
            await a.publish()
            await b.publish()
            assert _served(await a.exposition()) == {"a": 3.0, "b": 5.0}
            assert await a.exposition() == await b.exposition()  # the same values whichever replica answers
            # One family per name, as the text format requires, however many replicas.
            assert (await a.exposition()).decode().count("# TYPE dailydoco_http_requests_total counter") == 1
            # A replica not heard from for the stale period is dropped, from the scrape and from Redis.
            snapshot = m._Snapshot(time.time() - m.REPLICA_METRICS_STALE_S - 1, b"dailydoco_http_requests_total 7.0\n")
            await client.hset(gone.key, gone.replica, msgspec.msgpack.encode(snapshot))
            assert _served(await a.exposition()) == {"a": 3.0, "b": 5.0}
            assert sorted(await client.hkeys(a.key)) == [b"a", b"b"]
        finally:
            await client.delete(f"dd:metrics:{deployment}")
            await client.aclose()

    asyncio.run(main())


def test_a_scrape_without_redis_shows_this_replica(servers):
    async def main():
        client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)  # nothing listens there
        try:
            assert _served(await _replica(client, "x", "a", 2).exposition()) == {"a": 2.0}
        finally:
            await client.aclose()

    asyncio.run(main())


def _gauges(exposition: bytes) -> dict[str, float]:
    return {line.split(" ")[0]: float(line.split(" ")[1])
            for line in exposition.decode().splitlines() if line and not line.startswith("#")}


def test_the_backlog_is_its_values_or_says_it_is_unknown():
    assert _gauges(m.backlog_exposition(m.EngineBacklog(3, 1.5, 2, 1, 7))) == {
        "dailydoco_engine_backlog_up": 1.0, "dailydoco_outbox_rows": 3.0,
        "dailydoco_outbox_oldest_row_age_seconds": 1.5, "dailydoco_payouts_unfinished": 2.0,
        "dailydoco_ledger_partitions_missing": 1.0, "dailydoco_ledger_default_partition_rows": 7.0}
    # Postgres did not answer: no values that are not known, not zeros.
    assert _gauges(m.backlog_exposition(None)) == {"dailydoco_engine_backlog_up": 0.0}


def test_scrapes_share_one_backlog_read_per_interval_and_answer_while_postgres_does_not():
    async def main():
        reads = []
        stalled = asyncio.Event()

        async def read() -> m.EngineBacklog:
            reads.append(time.monotonic())
            if len(reads) == 2:
                await stalled.wait()  # a Postgres that does not answer
            if len(reads) == 3:
                raise ConnectionError("Postgres went away")
            await asyncio.sleep(0.01)
            return m.EngineBacklog(len(reads), 0.0, 0, 0, 0)

        reader = m.EngineBacklogReader(read, timeout_s=0.2)
        first = await asyncio.gather(*(reader.current() for _ in range(50)))
        assert first == [m.EngineBacklog(1, 0.0, 0, 0, 0)] * 50 and len(reads) == 1
        assert await reader.current() == m.EngineBacklog(1, 0.0, 0, 0, 0) and len(reads) == 1  # within the interval
        reader._last_started_at -= m.BACKLOG_READ_EVERY_S  # the interval is up
        started = time.monotonic()
        assert await reader.current() is None and time.monotonic() - started < 1.0  # bounded, not stalled
        reader._last_started_at -= m.BACKLOG_READ_EVERY_S
        assert await reader.current() is None  # a failed read is reported, not raised
        reader._last_started_at -= m.BACKLOG_READ_EVERY_S
        assert await reader.current() == m.EngineBacklog(4, 0.0, 0, 0, 0)
        stalled.set()

    asyncio.run(main())
