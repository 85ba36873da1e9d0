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
