"""Live-updates benchmark, in one run on this machine:

  (a) end to end: single POST /v1/transactions at fixed rates (open loop),
      latency from each transaction's HTTP 2xx to the beneficiary's WebSocket
      frame, through Serve (HAProxy ingress), outbox, relay, NATS, gateway;
      the engine runs two regions as `dailydoco up` does, and the sockets are
      in the home region, then (at the top rate) in the other one;
  (b) the lower bound: nats-server's own WebSocket listener delivering the
      same event batches, at the same rates, to the same number of clients;
  (c) fan-out: frames/s the gateway delivers to many sockets;
  (d) connections held by one gateway (one Serve replica) and its memory per
      connection (run first, on a fresh replica).

Prints a table and writes bench/results/live.json.
Run: python bench/live_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import msgspec
import nats
import psutil
from open_loop import _Connection, build_request

from dailydoco.cluster.config import DEFAULT_REGIONS, load_config
from dailydoco.cluster.embedded import EmbeddedServers, _nats_server_bin, _wait_for_port, free_port
from dailydoco.cluster.live_client import WebSocketConnection
from dailydoco.cluster.system import EngineSystem, live_app_name
from dailydoco.protocol.live import (
    CommissionEarned,
    Publication,
    ReferralJoined,
    decode_server_frame,
    encode_event_batch,
    encode_events,
    user_subject,
)
from dailydoco.serve.auth import TokenAuthority

RESULTS = Path(__file__).parent / "results" / "live.json"
FRAME_WAIT_S = 10.0  # after the last request, frames still in flight get this long
QUIESCE_S = 3.0


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def summary(samples_ms: list[float], **extra) -> dict:
    return {**extra, "samples": len(samples_ms), "p50_ms": pct(samples_ms, 0.5), "p95_ms": pct(samples_ms, 0.95),
            "p99_ms": pct(samples_ms, 0.99)}


async def _reader(ws: WebSocketConnection, on_publication) -> None:
    try:
        while True:
            frame = decode_server_frame(await ws.receive())
            if isinstance(frame, Publication):
                on_publication(frame)
    except Exception:  # noqa: BLE001 - the socket closed at the end of the run
        return


async def open_socket(url: str, token: str) -> WebSocketConnection:
    ws = await WebSocketConnection.open(url)
    await ws.send('{"type":"connect","token":"%s"}' % token)
    await ws.receive()  # connected
    return ws


# --- (a) end to end -------------------------------------------------------------------


async def end_to_end(system: EngineSystem, auth: TokenAuthority, pairs: list[tuple[str, str]], rate_per_s: int,
                     duration_s: float, region: str) -> dict:
    """Purchases through the home region's API; the sockets in `region`."""
    loop = asyncio.get_running_loop()
    ws_url = system.region_urls[region].replace("http://", "ws://") + "/v1/live"
    framed: dict[str, float] = {}

    def on_publication(p: Publication) -> None:
        if isinstance(p.event, CommissionEarned):
            framed[p.event.transaction_id] = loop.time()

    sockets = [await open_socket(ws_url, auth.issue(root, 3600)[0]) for root, _ in pairs]
    readers = [asyncio.create_task(_reader(ws, on_publication)) for ws in sockets]
    host, port = system.url.removeprefix("http://").split(":")
    headers = {"X-API-Key": system.secrets.service_api_key}
    sent: dict[str, float] = {}
    acked: dict[str, float] = {}
    idle: list[_Connection] = []
    errors = 0
    run_id = f"{rate_per_s}-{time.time_ns()}"

    async def one(i: int) -> None:
        nonlocal errors
        tid = f"e2e-{run_id}-{i}"
        body = msgspec.json.encode({"transaction_id": tid, "user_id": pairs[i % len(pairs)][1],
                                    "amount_micros": 1_000_000})
        conn = idle.pop() if idle else _Connection(*await asyncio.open_connection(host, int(port)))
        sent[tid] = loop.time()
        try:
            status = await asyncio.wait_for(conn.exchange(build_request(host, "POST", "/v1/transactions", headers,
                                                                        body)), 10)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            errors += 1
            return
        idle.append(conn)
        if status == 201:
            acked[tid] = loop.time()
        else:
            errors += 1

    total = int(rate_per_s * duration_s)
    start = loop.time() + 0.05
    async with asyncio.TaskGroup() as group:
        for i in range(total):
            delay = start + i / rate_per_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            group.create_task(one(i))
    deadline = loop.time() + FRAME_WAIT_S
    while len(set(acked) - set(framed)) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    for task in readers:
        task.cancel()
    for ws in sockets:
        await ws.close()
    for conn in idle:
        conn.writer.close()
    # A frame can beat its own 2xx (the commit comes first, the response
    # travels after it): those count as 0, and how many did is reported, with
    # the latency from sending the request to the frame beside it.
    delivered = [t for t in acked if t in framed]
    latencies = [max(0.0, 1000 * (framed[t] - acked[t])) for t in delivered]
    from_request = summary([1000 * (framed[t] - sent[t]) for t in delivered])
    return summary(latencies, region=region, rate_per_s=rate_per_s, sockets=len(sockets), acked=len(acked),
                   missing_frames=len(set(acked) - set(framed)), errors=errors,
                   frames_before_2xx=sum(1 for t in delivered if framed[t] < acked[t]),
                   request_to_frame_p50_ms=from_request["p50_ms"], request_to_frame_p99_ms=from_request["p99_ms"])


def quiesce(system: EngineSystem) -> None:
    """Start the next run on an idle engine: requests a saturated run left
    queued (its client gave up on them) are still being served."""
    import ray

    from dailydoco.actors.refs import chain_actor_name

    time.sleep(QUIESCE_S)  # what HAProxy and the replica still hold reaches the chains
    ray.get([ray.get_actor(chain_actor_name(i), namespace=system.config.namespace).drained.remote()
             for i in range(system.config.chain_actors)])


# --- (b) nats-server's WebSocket listener, the lower bound -------------------------------


def start_nats_websocket(state_dir: Path) -> tuple[subprocess.Popen, str, str]:
    port, ws_port = free_port(), free_port()
    conf = state_dir / "nats-ws.conf"
    conf.write_text(f'listen: "127.0.0.1:{port}"\nwebsocket {{\n  listen: "127.0.0.1:{ws_port}"\n  no_tls: true\n}}\n')
    log = state_dir / "nats-ws.log"
    process = subprocess.Popen([_nats_server_bin(), "-c", str(conf)], stdout=open(log, "ab"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    _wait_for_port(ws_port, process, "nats websocket", log)
    return process, f"nats://127.0.0.1:{port}", f"ws://127.0.0.1:{ws_port}"


async def nats_websocket_floor(nats_url: str, ws_url: str, users: int, rate_per_s: int, duration_s: float) -> dict:
    loop = asyncio.get_running_loop()
    received: dict[int, float] = {}
    subscribers = []
    for u in range(users):
        nc = await nats.connect(ws_url)

        async def cb(msg) -> None:
            received[int(msg.headers["i"])] = loop.time()

        await nc.subscribe(user_subject("us-east", f"floor-{u}"), cb=cb)
        await nc.flush()
        subscribers.append(nc)
    publisher = await nats.connect(nats_url)
    sent: dict[int, float] = {}
    epoch = "floor"
    total = int(rate_per_s * duration_s)
    start = loop.time() + 0.05
    for i in range(total):
        delay = start + i / rate_per_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        body = encode_events([CommissionEarned(transaction_id=f"floor-{i}", level=1, rate_bp=2000,
                                               amount_micros=200_000, currency="USD")])
        sent[i] = loop.time()
        await publisher.publish(user_subject("us-east", f"floor-{i % users}"),
                                encode_event_batch(epoch, i + 1, dt.datetime.now(dt.timezone.utc), body),
                                headers={"i": str(i)})
    await publisher.flush()
    deadline = loop.time() + FRAME_WAIT_S
    while len(received) < len(sent) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    for nc in [publisher, *subscribers]:
        await nc.close()
    latencies = [1000 * (received[i] - sent[i]) for i in sent if i in received]
    return summary(latencies, rate_per_s=rate_per_s, sockets=users, missing_frames=len(sent) - len(received))


# --- (c) fan-out ---------------------------------------------------------------------------


async def fan_out(system: EngineSystem, auth: TokenAuthority, nats_url: str, sockets_n: int, batches: int,
                  events_per_batch: int) -> dict:
    """Many sockets of one user; forged batches straight into that user's subject."""
    ws_url = system.url.replace("http://", "ws://") + "/v1/live"
    user = f"fanout-{time.time_ns()}"
    token = auth.issue(user, 3600)[0]
    count = 0

    def on_publication(p: Publication) -> None:
        nonlocal count
        count += 1

    sockets = [await open_socket(ws_url, token) for _ in range(sockets_n)]
    readers = [asyncio.create_task(_reader(ws, on_publication)) for ws in sockets]
    epoch = (await asyncio.to_thread(_epoch, system))
    nc = await nats.connect(nats_url)
    loop = asyncio.get_running_loop()
    expected = sockets_n * batches * events_per_batch
    started = loop.time()
    for b in range(batches):
        events = encode_events([ReferralJoined(member_id=f"m{b}-{i}", level=1) for i in range(events_per_batch)])
        await nc.publish(user_subject("us-east", user),
                         encode_event_batch(epoch, 1 + b * events_per_batch, dt.datetime.now(dt.timezone.utc), events))
    await nc.flush()
    deadline = loop.time() + 30
    while count < expected and loop.time() < deadline:
        await asyncio.sleep(0.01)
    elapsed = loop.time() - started
    await nc.close()
    for task in readers:
        task.cancel()
    for ws in sockets:
        await ws.close()
    return {"sockets": sockets_n, "frames": count, "expected": expected, "seconds": round(elapsed, 3),
            "frames_per_s": round(count / elapsed)}


def _epoch(system: EngineSystem) -> str:
    import asyncpg

    async def read() -> str:
        conn = await asyncpg.connect(system.postgres_url)
        try:
            return await conn.fetchval("SELECT epoch FROM event_epoch")
        finally:
            await conn.close()

    return asyncio.run(read())


# --- (d) connections and memory --------------------------------------------------------------


def replica_process(app_name: str) -> psutil.Process:
    """One of the app's Serve replicas: the sockets of (d) all go straight to it."""
    title = f"ServeReplica:{app_name}:"
    found = [p for p in psutil.process_iter(["cmdline"]) if any(title in a for a in p.info["cmdline"] or ())]
    if not found:
        raise RuntimeError(f"no Serve replica process of {app_name}")
    return min(found, key=lambda p: p.pid)


def replica_http_port(replica: psutil.Process) -> int:
    """The replica's own HTTP port, the one HAProxy forwards to (Serve itself
    answers /-/healthz there)."""
    for conn in replica.net_connections(kind="tcp"):
        if conn.status != psutil.CONN_LISTEN:
            continue
        try:
            if httpx.get(f"http://127.0.0.1:{conn.laddr.port}/-/healthz", timeout=2).status_code == 200:
                return conn.laddr.port
        except httpx.HTTPError:
            continue
    raise RuntimeError("the Serve replica has no HTTP port answering /-/healthz")


async def connections(system: EngineSystem, auth: TokenAuthority, n: int) -> dict:
    # Straight to the replica: through HAProxy each socket costs HAProxy two
    # descriptors, and 10,000 of them exceed this machine's hard limit of
    # 20,000 per process (HAProxy then refuses to start). The replica is the
    # gateway process whose memory per connection is measured.
    replica = replica_process(live_app_name(system.config, system.config.region))
    ws_url = f"ws://127.0.0.1:{replica_http_port(replica)}/v1/live"
    before = replica.memory_info().rss
    sockets = []
    failed = 0
    started = time.monotonic()
    for i in range(0, n, 50):
        opened = await asyncio.gather(*(open_socket(ws_url, auth.issue(f"conn-{i + j}", 3600)[0])
                                        for j in range(min(50, n - i))), return_exceptions=True)
        sockets += [ws for ws in opened if isinstance(ws, WebSocketConnection)]
        failed += sum(1 for ws in opened if not isinstance(ws, WebSocketConnection))
        if failed:
            break  # report what one replica held, not a pile of timeouts
    opened_s = time.monotonic() - started
    await asyncio.sleep(2)
    after = replica.memory_info().rss
    for ws in sockets:
        await ws.close()
    return {"connections": len(sockets), "failed_to_open": failed, "open_seconds": round(opened_s, 1),
            "replica_fd_limit": replica.rlimit(psutil.RLIMIT_NOFILE)[0],
            "replica_rss_before_mib": round(before / 2**20, 1), "replica_rss_after_mib": round(after / 2**20, 1),
            "kib_per_connection": round((after - before) / len(sockets) / 1024, 1)}


# --- main ------------------------------------------------------------------------------------


def main() -> int:
    # Each socket is a descriptor here too: take the hard limit.
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only-connections", action="store_true", help="run step (d) alone")
    args = parser.parse_args()
    duration_s = 5.0 if args.quick else 15.0
    rates = [250, 1000]
    pairs_n = 50
    conns_n = 2_000 if args.quick else 10_000
    results: dict = {"machine": f"{psutil.cpu_count()} cores", "when": dt.datetime.now(dt.timezone.utc).isoformat()}
    with tempfile.TemporaryDirectory(prefix="dd-live-bench-") as state:
        servers = EmbeddedServers(state)
        urls = servers.resolve(None, None, None, DEFAULT_REGIONS)
        home, *others = DEFAULT_REGIONS
        ws_server, floor_nats, floor_ws = start_nats_websocket(Path(state))
        config = load_config(state_dir=state, postgres_url=urls[0], nats_url=urls[1], redis_url=urls[2],
                             http_port=free_port(), namespace="dailydoco-live-bench", region=home,
                             region_nats_urls={r: servers.nats_urls[r] for r in others})
        system = EngineSystem(config).start()
        try:
            auth = TokenAuthority(system.secrets)
            from dailydoco.cluster.demo import ApiClient

            api = ApiClient(system.url, system.secrets.service_api_key)
            pairs = []
            for i in range(pairs_n):
                root = api.register(f"bench-root-{i}", None)
                buyer = api.register(f"bench-buyer-{i}", root["referral_code"])
                pairs.append((root["user_id"], buyer["user_id"]))
            # First, on a fresh replica: after the other steps the sockets would
            # reuse memory those freed, and read a few KiB lighter than they are.
            results["connections"] = asyncio.run(connections(system, auth, conns_n))
            print(json.dumps(results["connections"]), flush=True)
            if args.only_connections:
                return 0
            results["end_to_end"] = []
            for rate in rates:
                results["end_to_end"].append(asyncio.run(end_to_end(system, auth, pairs, rate, duration_s, home)))
                quiesce(system)
            results["end_to_end_other_region"] = asyncio.run(
                end_to_end(system, auth, pairs, rates[-1], duration_s, others[0]))
            quiesce(system)
            print(json.dumps(results["end_to_end"]), flush=True)
            print(json.dumps(results["end_to_end_other_region"]), flush=True)
            results["nats_websocket_floor"] = [
                asyncio.run(nats_websocket_floor(floor_nats, floor_ws, pairs_n, r, duration_s)) for r in rates]
            print(json.dumps(results["nats_websocket_floor"]), flush=True)
            results["fan_out"] = asyncio.run(fan_out(system, auth, urls[1], 200, 50, 20))
            print(json.dumps(results["fan_out"]), flush=True)
        finally:
            system.stop()
            ws_server.terminate()
            servers.stop()
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print_table(results)
    return 0


def print_table(r: dict) -> None:
    print(f"\nlive benchmark ({r['machine']})")
    print(f"{'path':<48}{'rate/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'missing':>9}")

    def request_to_frame(e2e: dict) -> None:
        print(f"{'  (request sent -> frame)':<48}{'':>8}{e2e['request_to_frame_p50_ms']:>9.2f}{'':>9}"
              f"{e2e['request_to_frame_p99_ms']:>9.2f}   {e2e['frames_before_2xx']:,} of {e2e['acked']:,} "
              f"frames beat their 2xx; {e2e['errors']:,} requests failed")

    for e2e, floor in zip(r["end_to_end"], r["nats_websocket_floor"], strict=True):
        print(f"{'HTTP 2xx -> gateway WebSocket frame, ' + e2e['region']:<48}{e2e['rate_per_s']:>8}{e2e['p50_ms']:>9.2f}"
              f"{e2e['p95_ms']:>9.2f}{e2e['p99_ms']:>9.2f}{e2e['missing_frames']:>9}")
        request_to_frame(e2e)
        print(f"{'  floor: nats-server WebSocket, publish->frame':<48}{floor['rate_per_s']:>8}{floor['p50_ms']:>9.2f}"
              f"{floor['p95_ms']:>9.2f}{floor['p99_ms']:>9.2f}{floor['missing_frames']:>9}")
        print(f"{'  ratio p99 gateway / floor':<48}{'':>8}{'':>9}{'':>9}{e2e['p99_ms'] / floor['p99_ms']:>9.1f}")
    e2e = r["end_to_end_other_region"]
    print(f"{'  the same, sockets in ' + e2e['region'] + ' (other region)':<48}{e2e['rate_per_s']:>8}"
          f"{e2e['p50_ms']:>9.2f}{e2e['p95_ms']:>9.2f}{e2e['p99_ms']:>9.2f}{e2e['missing_frames']:>9}")
    request_to_frame(e2e)
    f = r["fan_out"]
    print(f"fan-out: {f['frames']:,} frames to {f['sockets']} sockets in {f['seconds']} s = {f['frames_per_s']:,} frames/s")
    c = r["connections"]
    print(f"connections: {c['connections']:,} held by one replica, direct ({c['failed_to_open']} failed to open), {c['kib_per_connection']} KiB each "
          f"(RSS {c['replica_rss_before_mib']} -> {c['replica_rss_after_mib']} MiB), opened in {c['open_seconds']} s")


if __name__ == "__main__":
    sys.exit(main())
