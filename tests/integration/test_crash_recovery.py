"""Killing actors on the real Ray cluster, or cutting every connection to
Postgres, loses and duplicates nothing."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import time

import asyncpg
import ray

from dailydoco.actors.refs import chain_actor_name, shard_actor_name
from dailydoco.actors.supervisor import video_processing_installed
from dailydoco.serve.app import POSTGRES_CONNECTIONS_MAX

from .conftest import unique

BUCKETS = {"pending": 0, "approved": 1, "paid": 2, "reversed": 2}


def _query(engine, method: str, sql: str, *args):
    """One statement, on a connection of the test's own (the engine's are what these tests cut)."""
    async def run():
        conn = await asyncpg.connect(engine.postgres_url)
        try:
            return await getattr(conn, method)(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


def _ledger_balances(engine) -> dict:
    want: dict = {}
    for r in _query(engine, "fetch", "SELECT beneficiary_id, currency, status, sum(amount_micros) AS s"
                                     " FROM commission_ledger GROUP BY 1, 2, 3"):
        if r["status"] in BUCKETS:
            want.setdefault(r["beneficiary_id"], {}).setdefault(r["currency"].strip(), [0, 0, 0])[BUCKETS[r["status"]]] += r["s"]
    return {u: {c: b for c, b in v.items() if any(b)} for u, v in want.items() if any(any(b) for b in v.values())}


def _memory_balances(engine) -> dict:
    have = {}
    for i in range(engine.config.shard_actors):
        actor = ray.get_actor(shard_actor_name(i), namespace=engine.config.namespace)
        for user, currencies in ray.get(actor.dump_balances.remote()).items():
            kept = {c: b for c, b in currencies.items() if any(b)}
            if kept:
                have[user] = kept
    return have


def _kill(engine, name: str) -> None:
    ray.kill(ray.get_actor(name, namespace=engine.config.namespace), no_restart=True)


def test_killed_actors_come_back_with_exact_balances(api, engine):
    users = api.chain(8, prefix="crash")
    buyers = users[1:]
    stop = time.monotonic() + 8

    def load(worker: int) -> int:
        sent = 0
        while time.monotonic() < stop:
            r = api.purchase(buyers[(worker + sent) % len(buyers)], 1_000_003 + sent, unique(f"crash{worker}"))
            assert r.status_code in (200, 201), r.text
            sent += 1
        return sent

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(load, w) for w in range(4)]
        time.sleep(2)
        _kill(engine, shard_actor_name(0))
        time.sleep(2)
        _kill(engine, chain_actor_name(0))
        sent = sum(f.result() for f in futures)
    assert sent > 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if api.anonymous.get("/readyz").status_code == 200:
            break
        time.sleep(0.5)
    api.settle()
    # Retries after an unknown outcome replay, never duplicate.
    ledger = _ledger_balances(engine)
    assert _memory_balances(engine) == ledger
    # And what the API serves (balance views in Redis, written again by the
    # restarted shard) is the ledger too: no view of the dead one survives.
    for user in users:
        served = api.service.get(f"/v1/users/{user}/balance").json()["balances"]
        assert {b["currency"]: [b["pending_micros"], b["approved_micros"], b["paid_micros"]] for b in served
                if b["pending_micros"] or b["approved_micros"] or b["paid_micros"]} == ledger.get(user, {}), user
    restarts = ray.get(engine.supervisor.restart_counts.remote())
    assert restarts.get(shard_actor_name(0), 0) >= 1 and restarts.get(chain_actor_name(0), 0) >= 1


def _cut_database_connections(engine) -> int:
    """Terminate every server process of the engine's database but the one asking."""
    return _query(engine, "fetchval", "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                                      " WHERE datname = current_database() AND pid <> pg_backend_pid()")


def _video_queue_listeners(engine) -> int:
    return _query(engine, "fetchval", "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                                      " AND query LIKE 'LISTEN %dd_video_jobs%'")


def test_cut_database_connections_lose_and_double_nothing(api, engine):
    """Every connection to Postgres is cut, three times, while purchases flow.
    A purchase caught at its commit is a 503 commit-outcome-unknown (its
    shards reread the ledger before it goes out), one caught before is a 503
    that wrote nothing; a client retrying with the same id gets each purchase
    once, and memory and the served balances still equal the ledger."""
    users = api.chain(8, prefix="dbcut")
    buyers = users[1:]
    listened = _video_queue_listeners(engine)
    assert listened == (1 if video_processing_installed() else 0)
    stop = time.monotonic() + 6
    answers: collections.Counter = collections.Counter()
    lock = threading.Lock()

    def load(worker: int) -> list[str]:
        sent = []
        while time.monotonic() < stop:
            tid = unique(f"dbcut{worker}")
            for _ in range(200):
                r = api.purchase(buyers[(worker + len(sent)) % len(buyers)], 2_000_003 + len(sent), tid)
                with lock:
                    body = r.json()
                    answers[r.status_code, body["type"].rsplit("/", 1)[-1] if r.status_code >= 400 else body["status"]] += 1
                if r.status_code != 503:
                    break
                assert r.headers["content-type"] == "application/problem+json" and r.headers["retry-after"], r.headers
                time.sleep(0.05)
            assert r.status_code in (200, 201), r.text
            sent.append(tid)
        return sent

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(load, w) for w in range(4)]
        cut = 0
        for _ in range(3):
            time.sleep(1.5)
            cut += _cut_database_connections(engine)
        sent = [tid for f in futures for tid in f.result()]
    assert cut > 0 and sent
    api.settle()

    assert _query(engine, "fetchval", "SELECT count(*) FROM transactions WHERE transaction_id = ANY($1::text[])",
                  sent) == len(sent)
    ledger = _ledger_balances(engine)
    assert _memory_balances(engine) == ledger, dict(answers)
    for user in users:
        served = api.service.get(f"/v1/users/{user}/balance").json()["balances"]
        assert {b["currency"]: [b["pending_micros"], b["approved_micros"], b["paid_micros"]] for b in served
                if b["pending_micros"] or b["approved_micros"] or b["paid_micros"]} == ledger.get(user, {}), user
    assert api.anonymous.get("/readyz").status_code == 200
    # The video processor listens for new jobs again.
    deadline = time.monotonic() + 10
    while _video_queue_listeners(engine) < listened and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _video_queue_listeners(engine) == listened

    # Reads that Postgres serves (the replicas' own pools, the actors') fail
    # no worse than 503 once their connections are cut, and then recover.
    code = api.service.get(f"/v1/users/{users[-1]}").json()["referral_code"]
    cut += _cut_database_connections(engine)
    reads: collections.Counter = collections.Counter()
    for user in users:
        for _ in range(50):
            r = api.service.get(f"/v1/users/{user}/commissions", params={"limit": 5})
            reads[r.status_code] += 1
            if r.status_code != 503:
                break
            assert r.headers["content-type"] == "application/problem+json" and r.headers["retry-after"], r.headers
            time.sleep(0.05)
        assert r.status_code == 200, r.text
    # And writes that start with an actor's read (a registration looks up
    # the user first) are 503 at worst, then served.
    registrations: collections.Counter = collections.Counter()
    for _ in range(50):
        r = api.service.post("/v1/users", json={"user_id": unique("dbcut-late"), "referral_code": code})
        registrations[r.status_code] += 1
        if r.status_code != 503:
            break
        time.sleep(0.05)
    assert r.status_code == 201, r.text
    # At most once per connection the replicas' pools held.
    assert reads[503] <= engine.config.serve_replicas * POSTGRES_CONNECTIONS_MAX, reads
    print(f"{cut} connections cut; purchases: {dict(answers)}; reads: {dict(reads)};"
          f" registrations: {dict(registrations)}")
