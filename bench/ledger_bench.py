"""Ledger benchmark: the naive seed algorithm vs the engine, in one run, one Postgres.

  (a) naive: per purchase, one SELECT per level and one INSERT per commission,
      one Postgres transaction each, 8 connections;
  (b) engine: POST /v1/transactions:batch, every commission durably committed;
  (c) open-loop latency (fixed arrival rate, measured from each request's
      scheduled send time, so a slow server cannot hide behind a slow client):
      single POST /v1/transactions and GET /v1/users/{id}/balance (with the
      service key, and with each user's own token), through Serve with the
      HAProxy ingress and with Serve's default proxy.

Prints a table with ratios to the naive algorithm and writes bench/results/ledger.json.
Run: python bench/ledger_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import asyncpg
from open_loop import build_request, open_loop
import msgspec

from dailydoco.cluster.config import load_config
from dailydoco.cluster.demo import ApiClient
from dailydoco.cluster.embedded import EmbeddedServers, free_port
from dailydoco.cluster.simulator import ViralNetwork
from dailydoco.cluster.system import EngineSystem
from dailydoco.protocol import LEVEL_RATES_BP
from dailydoco.serve.auth import TokenAuthority

RESULTS = Path(__file__).parent / "results" / "ledger.json"
OUTBOX_DRAIN_WAIT_S = 300.0
NAIVE_CONNECTIONS = 8
BATCH_SIZE = 2_000
BATCH_CLIENTS = 8  # concurrent batch requests in flight
# Between latency steps: up to 60 s for five /healthz answers in a row within 20 ms.
QUIET_WAIT_S, QUIET_ANSWERS, QUIET_ANSWER_MS = 60.0, 5, 20.0


class BatchSummary(msgspec.Struct):
    """What the benchmark checks of a batch response: the per-item results
    (about 1 MB for 2,000 purchases) are skipped, not decoded."""

    created: int
    failed: int


BATCH_SUMMARY = msgspec.json.Decoder(BatchSummary)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- (a) the naive algorithm -------------------------------------------------------------


async def naive(postgres_url: str, registrations, purchases) -> dict:
    conn = await asyncpg.connect(postgres_url)
    await conn.execute("""
        DROP TABLE IF EXISTS naive_commissions, naive_users;
        CREATE TABLE naive_users (user_id text PRIMARY KEY, referrer_id text);
        CREATE TABLE naive_commissions (id bigserial PRIMARY KEY, transaction_id text, beneficiary_id text,
                                        level int, amount_micros bigint, created_at timestamptz DEFAULT now());
    """)
    await conn.copy_records_to_table("naive_users", records=[(r.user_id, r.referrer_id) for r in registrations])
    await conn.close()
    pool = await asyncpg.create_pool(postgres_url, min_size=NAIVE_CONNECTIONS, max_size=NAIVE_CONNECTIONS)
    queue = list(purchases)

    async def worker():
        async with pool.acquire() as c:
            while queue:
                p = queue.pop()
                async with c.transaction():
                    current = p.user_id
                    for level in range(1, 8):
                        current = await c.fetchval("SELECT referrer_id FROM naive_users WHERE user_id = $1", current)
                        if current is None:
                            break
                        await c.execute(
                            "INSERT INTO naive_commissions (transaction_id, beneficiary_id, level, amount_micros)"
                            " VALUES ($1, $2, $3, $4)",
                            p.transaction_id, current, level, p.amount_micros * LEVEL_RATES_BP[level - 1] // 10_000)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(NAIVE_CONNECTIONS)))
    elapsed = time.perf_counter() - started
    await pool.close()
    return {"transactions": len(purchases), "seconds": elapsed, "tx_per_s": len(purchases) / elapsed}


# --- (b) the engine's batch endpoint --------------------------------------------------------


async def engine_batches(url: str, api_key: str, purchases) -> dict:
    chunks = [purchases[i:i + BATCH_SIZE] for i in range(0, len(purchases), BATCH_SIZE)]
    bodies = [  # (purchases in it, body)
        (len(chunk), msgspec.json.encode({"transactions": [
            {"transaction_id": p.transaction_id, "user_id": p.user_id, "amount_micros": p.amount_micros}
            for p in chunk]}))
        for chunk in chunks
    ]
    pending = list(reversed(bodies))
    latencies = []
    headers = {"X-API-Key": api_key, "content-type": "application/json"}
    async with aiohttp.ClientSession(headers=headers) as session:
        async def client():
            while pending:
                count, body = pending.pop()
                t = time.perf_counter()
                async with session.post(url + "/v1/transactions:batch", data=body) as r:
                    # msgspec, not aiohttp's json: this client shares the cores it measures.
                    summary = BATCH_SUMMARY.decode(await r.read())
                    assert r.status == 200 and summary.created == count and summary.failed == 0, summary
                latencies.append(time.perf_counter() - t)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(BATCH_CLIENTS)))
        elapsed = time.perf_counter() - started
    return {"transactions": len(purchases), "seconds": elapsed, "tx_per_s": len(purchases) / elapsed,
            "batch_size": BATCH_SIZE, "batch_p50_ms": 1000 * statistics.median(latencies),
            "batch_p99_ms": 1000 * percentile(latencies, 0.99)}


# --- (c) open-loop latency -------------------------------------------------------------------


async def latency_suite(url: str, secrets, network: ViralNetwork, duration_s: float, tag: str) -> dict:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    headers = {"X-API-Key": secrets.service_api_key}
    buyers = network.members
    # Signed here with the deployment's key, as POST /v1/users/{id}/tokens would.
    authority = TokenAuthority(secrets)
    bearer = {u: {"Authorization": "Bearer " + authority.issue(u, 3_600)[0]} for u in buyers}

    def purchase(i: int) -> bytes:
        body = msgspec.json.encode({"transaction_id": f"lat-{tag}-{i}", "user_id": buyers[i % len(buyers)],
                                    "amount_micros": 9_990_000})
        return build_request(host, "POST", "/v1/transactions", headers, body)

    def balance(i: int) -> bytes:
        return build_request(host, "GET", f"/v1/users/{buyers[(i * 7919) % len(buyers)]}/balance", headers)

    def own_balance(i: int) -> bytes:
        user = buyers[(i * 7919) % len(buyers)]
        return build_request(host, "GET", f"/v1/users/{user}/balance", bearer[user])

    def health(i: int) -> bytes:
        return build_request(host, "GET", "/healthz", {})

    steps = {
        "post_transaction_500rps": (500, purchase),
        "get_balance_1000rps": (1_000, balance),
        # A user reading their own balance: token check, and a rate limit in Redis.
        "get_own_balance_1000rps": (1_000, own_balance),
        # The floor: the same stack with no actor, no database, no auth.
        "get_healthz_1000rps": (1_000, health),
    }
    results = {}
    for name, (rate, make_request) in steps.items():
        waited_s = await quiet(host, int(port))
        print(f"    {name}: the server answered promptly after {waited_s:.1f} s", flush=True)
        results[name] = await open_loop(host, int(port), rate, duration_s, make_request) | {"quiet_wait_s": waited_s}
    return results


async def quiet(host: str, port: int) -> float:
    """Wait until the server answers `/healthz` promptly again, and say how
    long that took: a step that overloaded it leaves requests queued inside
    it (their clients gone), and the next step must not start behind them."""
    started = time.monotonic()
    answers_fast, deadline = 0, started + QUIET_WAIT_S
    while answers_fast < QUIET_ANSWERS and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        summary = await open_loop(host, port, 10, 0.1, lambda i: build_request(host, "GET", "/healthz", {}),
                                  warmup_s=0.0)
        answers_fast = answers_fast + 1 if summary["ok"] and summary["p99_ms"] < QUIET_ANSWER_MS else 0
    return time.monotonic() - started


def settle(system: EngineSystem) -> None:
    """Measure latency in steady state, not in the wake of the bulk load: let
    the shard deliveries land and the outbox empty (its rows published); take the
    shards' checkpoint now (the supervisor's next periodic one would fold
    every ledger row of the bulk load, seconds of CPU, in the middle of the
    latency runs); and give the planner statistics for tables that grew from
    empty (autovacuum would, a little later)."""
    import ray

    from dailydoco.actors.refs import SUPERVISOR_NAME, chain_actor_name

    namespace = system.config.namespace
    ray.get([ray.get_actor(chain_actor_name(i), namespace=namespace).drained.remote()
             for i in range(system.config.chain_actors)])
    started = time.monotonic()
    users = ray.get(ray.get_actor(SUPERVISOR_NAME, namespace=namespace).checkpoint.remote())
    print(f"    checkpointed {users:,} users' shard state in {time.monotonic() - started:.1f} s", flush=True)

    async def drain_outbox_and_analyze():
        conn = await asyncpg.connect(system.postgres_url)
        started, waiting = time.monotonic(), await conn.fetchval("SELECT count(*) FROM outbox")
        while await conn.fetchval("SELECT count(*) FROM outbox") and time.monotonic() - started < OUTBOX_DRAIN_WAIT_S:
            await asyncio.sleep(0.2)
        print(f"    the outbox took {time.monotonic() - started:.1f} s more to publish the {waiting:,} rows"
              " still waiting after the bulk load", flush=True)
        await conn.execute("VACUUM ANALYZE")
        await conn.close()

    asyncio.run(drain_outbox_and_analyze())


def start_engine(state_dir: str, urls, postgres_url: str, haproxy: bool) -> EngineSystem:
    config = load_config(state_dir=state_dir, postgres_url=postgres_url, nats_url=urls[1], redis_url=urls[2],
                         http_port=free_port(), haproxy=haproxy, namespace="dailydoco-bench")
    return EngineSystem(config).start()


async def fresh_database(server_url: str, name: str) -> str:
    conn = await asyncpg.connect(server_url)
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    return server_url.rpartition("/")[0] + "/" + name


def register_all(url: str, api_key: str, registrations) -> None:
    client = ApiClient(url, api_key)
    codes: dict[str, str] = {}
    for reg in registrations:
        codes[reg.user_id] = client.register(reg.user_id, codes.get(reg.referrer_id))["referral_code"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a smaller run, for a smoke check")
    parser.add_argument("--users", type=int, default=3_000)
    parser.add_argument("--naive-transactions", type=int, default=20_000)
    parser.add_argument("--engine-transactions", type=int, default=120_000)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    args = parser.parse_args()
    if args.quick:
        args.users, args.naive_transactions, args.engine_transactions, args.latency_seconds = 500, 2_000, 20_000, 3.0

    network = ViralNetwork(seed=42, viral_coefficient=1.3, id_prefix="b")
    registrations = list(network.registrations(args.users))
    depth = max(_depth(registrations).values())
    results: dict = {"machine": _machine(), "users": args.users, "network_depth_max": depth}
    with tempfile.TemporaryDirectory(prefix="dailydoco-bench-") as state_dir:
        servers = EmbeddedServers(state_dir)
        urls = servers.resolve(None, None, None)
        try:
            naive_purchases = list(network.purchases(args.naive_transactions))
            print(f"(a) naive algorithm: {len(naive_purchases)} purchases ...", flush=True)
            naive_db = asyncio.run(fresh_database(urls[0], "bench_naive"))
            results["naive"] = asyncio.run(naive(naive_db, registrations, naive_purchases))

            engine_db = asyncio.run(fresh_database(urls[0], "bench_engine"))
            for haproxy in (True, False):
                mode = "haproxy" if haproxy else "default_proxy"
                print(f"starting the engine ({mode}) ...", flush=True)
                system = start_engine(state_dir, urls, engine_db, haproxy)
                try:
                    key = system.secrets.service_api_key
                    if haproxy:
                        print(f"registering {len(registrations)} users ...", flush=True)
                        register_all(system.url, key, registrations)
                        engine_purchases = list(network.purchases(args.engine_transactions))
                        print(f"(b) engine batch endpoint: {len(engine_purchases)} purchases ...", flush=True)
                        results["engine_batch"] = asyncio.run(engine_batches(system.url, key, engine_purchases))
                        settle(system)
                    print(f"(c) open-loop latency, {mode} ...", flush=True)
                    results[f"latency_{mode}"] = asyncio.run(
                        latency_suite(system.url, system.secrets, network, args.latency_seconds, mode))
                finally:
                    system.stop()
        finally:
            servers.stop()
    results["ratios"] = {"engine_batch_vs_naive": results["engine_batch"]["tx_per_s"] / results["naive"]["tx_per_s"]}
    print_table(results)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {RESULTS}")
    return 0


def _depth(registrations) -> dict[str, int]:
    depth: dict[str, int] = {}
    for r in registrations:
        depth[r.user_id] = 0 if r.referrer_id is None else depth[r.referrer_id] + 1
    return depth


def _machine() -> str:
    import os
    import platform

    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def print_table(r: dict) -> None:
    naive_tps = r["naive"]["tx_per_s"]
    print(f"\nLedger benchmark ({r['machine']}; {r['users']} users, network depth up to {r['network_depth_max']})\n")
    print("| path | transactions/s | p50 ms | p95 ms | p99 ms | vs naive |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(f"| (a) naive: SELECT per level + INSERT per commission, 8 conns | {naive_tps:,.0f} | | | | 1.0x |")
    b = r["engine_batch"]
    print(f"| (b) engine, POST /v1/transactions:batch ({b['batch_size']}/request, {BATCH_CLIENTS} in flight) "
          f"| {b['tx_per_s']:,.0f} | {b['batch_p50_ms']:.1f} (batch) | | {b['batch_p99_ms']:.1f} (batch) "
          f"| {b['tx_per_s'] / naive_tps:.1f}x |")
    for mode in ("haproxy", "default_proxy"):
        for name, label in (("post_transaction_500rps", "single POST /v1/transactions @ 500/s"),
                            ("get_balance_1000rps", "GET /v1/users/{id}/balance @ 1,000/s"),
                            ("get_own_balance_1000rps", "the same with the user's token @ 1,000/s"),
                            ("get_healthz_1000rps", "floor: GET /healthz @ 1,000/s")):
            x = r[f"latency_{mode}"][name]
            errors = sum(x["errors"].values())
            print(f"| (c) {label}, {mode.replace('_', ' ')} | {x['ok']:,} ok, {errors:,} failed "
                  f"{x['errors'] or ''} | {x['p50_ms']:.2f} | {x['p95_ms']:.2f} | {x['p99_ms']:.2f} | |")


if __name__ == "__main__":
    sys.exit(main())
