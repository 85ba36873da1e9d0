"""Where a single purchase's CPU goes: every process's CPU, per purchase,
while single POST /v1/transactions arrive at a fixed rate through the
HAProxy ingress (the ledger benchmark's (c) step, measured from the other
side).

At 500/s on this project's 2-core machine the stack uses most of both
cores, so requests queue (README, "Why single POSTs queue"): this says
which process takes what. CPU is each process's user + system time from
psutil, before and after the measured seconds; Postgres's commits and row
counts are its own statistics for the engine's database, read once its
backends have reported them (so they may include the few statements the
engine runs on its own in the seconds around).

Prints a table and writes bench/results/cpu_split.json.
Run: python bench/cpu_split.py [--rate 500] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import tempfile
import time
from pathlib import Path

import asyncpg
import msgspec
import psutil
from dailydoco.cluster.embedded import EmbeddedServers
from dailydoco.cluster.simulator import ViralNetwork
from ledger_bench import fresh_database, register_all, start_engine
from open_loop import build_request, open_loop

RESULTS = Path(__file__).parent / "results" / "cpu_split.json"
WARMUP_S = 5.0  # the replicas' and the chain's first calls, and Postgres's caches, before measuring
SETTLE_S = 3.0  # then the warm-up's own deliveries and publishes end
# Postgres's backends report their counters at most once a second while
# busy, and 10 s after going idle (PGSTAT_IDLE_INTERVAL): read them past that.
PG_STATS_REPORTED_WITHIN_S = 11.0
ENGINE_DATABASE = "bench_cpu_split"
# A process's role, by the first of these its command line holds.
ROLES = (
    ("ray::CommissionChainActor", "chain"),
    ("ray::ServeReplica:dailydoco:engine", "API replicas"),
    ("ray::UserShardActor", "shards"),
    (f"postgres: postgres {ENGINE_DATABASE}", "Postgres backends"),
    ("postgres", "Postgres, its other processes"),  # the postmaster, WAL writer, checkpointer, ...
    ("nats-server", "NATS"),
    ("haproxy", "HAProxy"),
    ("redis-server", "Redis"),
)
# This process: the load generator, and the Ray driver that started the engine.
LOAD_GENERATOR = "load generator and Ray driver"
_PG_COUNTERS = ("xact_commit", "tup_inserted", "tup_updated", "tup_deleted")


def role_of(pid: int, cmdline: str) -> str:
    if pid == os.getpid():
        return LOAD_GENERATOR
    return next((role for marker, role in ROLES if marker in cmdline), "Ray's and Serve's other processes")


def cpu_by_process(state_dir: str) -> dict[int, tuple[str, float]]:
    """The role and CPU seconds so far of this process and every one it
    started (Ray and its workers, HAProxy, the servers), and of every
    process started from `state_dir` (Postgres, which detaches from its
    starter) and theirs: not the machine's other processes, its own
    Postgres, Redis and NATS among them."""
    roots = [psutil.Process()]
    for process in psutil.process_iter(["cmdline"]):
        if state_dir in " ".join(process.info["cmdline"] or ()):
            roots.append(process)
    found = {}
    for root in roots:
        try:
            for process in [root, *root.children(recursive=True)]:
                found[process.pid] = process
        except psutil.NoSuchProcess:
            continue
    seen = {}
    for process in found.values():
        try:
            times = process.cpu_times()
            cmdline = " ".join(process.cmdline() or [process.name()])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        seen[process.pid] = (role_of(process.pid, cmdline), times.user + times.system)
    return seen


async def postgres_counters(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(f"SELECT {', '.join(_PG_COUNTERS)} FROM pg_stat_database"
                                  " WHERE datname = current_database()")
        return dict(row)
    finally:
        await conn.close()


def measure(url: str, api_key: str, database_url: str, state_dir: str, buyers: list[str], rate: int,
            seconds: float) -> dict:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    headers = {"X-API-Key": api_key}
    run = time.time_ns()

    def purchase(i: int) -> bytes:
        body = msgspec.json.encode({"transaction_id": f"cpu-{run}-{i}", "user_id": buyers[(i * 7919) % len(buyers)],
                                    "amount_micros": 9_990_000})
        return build_request(host, "POST", "/v1/transactions", headers, body)

    asyncio.run(open_loop(host, int(port), rate, WARMUP_S, purchase, warmup_s=0.0))
    time.sleep(max(SETTLE_S, PG_STATS_REPORTED_WITHIN_S))
    run = time.time_ns()  # new ids: the warm-up's would be replays
    pg_before = asyncio.run(postgres_counters(database_url))
    cpu_before, started = cpu_by_process(state_dir), time.monotonic()
    latency = asyncio.run(open_loop(host, int(port), rate, seconds, purchase, warmup_s=0.0))
    wall_s, cpu_after = time.monotonic() - started, cpu_by_process(state_dir)
    time.sleep(PG_STATS_REPORTED_WITHIN_S)
    pg_after = asyncio.run(postgres_counters(database_url))
    purchases = latency["ok"]
    assert purchases and not latency["errors"], latency

    by_role: dict[str, dict] = collections.defaultdict(lambda: {"processes": 0, "cpu_s": 0.0})
    for pid, (role, cpu_s) in cpu_after.items():
        used_s = cpu_s - cpu_before.get(pid, (role, 0.0))[1]
        if used_s > 0:
            by_role[role]["processes"] += 1
            by_role[role]["cpu_s"] += used_s
    for role in by_role.values():
        role["us_per_purchase"] = 1e6 * role["cpu_s"] / purchases
        role["core_percent"] = 100 * role["cpu_s"] / wall_s
    total_s = sum(role["cpu_s"] for role in by_role.values())
    return {"rate_per_s": rate, "seconds": wall_s, "purchases": purchases,
            "post_p50_ms": latency["p50_ms"], "post_p99_ms": latency["p99_ms"],
            "cpu_us_per_purchase": 1e6 * total_s / purchases, "cpu_core_percent": 100 * total_s / wall_s,
            "by_role": dict(sorted(by_role.items(), key=lambda kv: -kv[1]["cpu_s"])),
            "postgres_per_purchase": {k: (pg_after[k] - pg_before[k]) / purchases for k in _PG_COUNTERS}}


def print_table(r: dict) -> None:
    print(f"\nCPU a purchase, {r['purchases']:,} single POSTs at {r['rate_per_s']}/s over {r['seconds']:.1f} s "
          f"({os.cpu_count()} cores); POST p50 {r['post_p50_ms']:.2f} ms, p99 {r['post_p99_ms']:.2f} ms\n")
    print("| process | how many | µs a purchase | % of a core |")
    print("| --- | ---: | ---: | ---: |")
    for role, x in r["by_role"].items():
        print(f"| {role} | {x['processes']} | {x['us_per_purchase']:,.0f} | {x['core_percent']:.1f} |")
    print(f"| all | | {r['cpu_us_per_purchase']:,.0f} | {r['cpu_core_percent']:.1f} |")
    pg = r["postgres_per_purchase"]
    print(f"\nPostgres a purchase: {pg['xact_commit']:.2f} commits, rows {pg['tup_inserted']:.1f} inserted, "
          f"{pg['tup_updated']:.1f} updated, {pg['tup_deleted']:.1f} deleted")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=int, default=500, help="single POSTs a second")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--users", type=int, default=3_000)
    args = parser.parse_args()
    registrations = list(ViralNetwork(seed=42, viral_coefficient=1.3, id_prefix="b").registrations(args.users))
    with tempfile.TemporaryDirectory(prefix="dailydoco-bench-") as state_dir:
        servers = EmbeddedServers(state_dir)
        urls = servers.resolve(None, None, None)
        try:
            database_url = asyncio.run(fresh_database(urls[0], ENGINE_DATABASE))
            system = start_engine(state_dir, urls, database_url, haproxy=True)
            try:
                key = system.secrets.service_api_key
                print(f"registering {len(registrations)} users ...", flush=True)
                register_all(system.url, key, registrations)
                print(f"single POSTs at {args.rate}/s for {args.seconds:g} s ...", flush=True)
                result = measure(system.url, key, database_url, state_dir, [r.user_id for r in registrations],
                                 args.rate, args.seconds)
            finally:
                system.stop()
        finally:
            servers.stop()
    print_table(result)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"\nwritten to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
