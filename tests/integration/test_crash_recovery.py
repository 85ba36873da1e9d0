"""Killing actors on the real Ray cluster loses and duplicates nothing."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import asyncpg
import ray

from dailydoco.actors.refs import chain_actor_name, shard_actor_name

from .conftest import unique

BUCKETS = {"pending": 0, "approved": 1, "paid": 2, "reversed": 2}


def _ledger_balances(engine) -> dict:
    async def read():
        conn = await asyncpg.connect(engine.postgres_url)
        try:
            return await conn.fetch("SELECT beneficiary_id, currency, status, sum(amount_micros) AS s"
                                    " FROM commission_ledger GROUP BY 1, 2, 3")
        finally:
            await conn.close()

    want: dict = {}
    for r in asyncio.run(read()):
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
