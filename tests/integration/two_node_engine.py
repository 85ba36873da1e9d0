"""The engine on a Ray cluster of two nodes, one of which dies under purchases.

Run by tests/integration/test_two_nodes.py in a process of its own (a
process joins one Ray cluster, and the test session's engine has its own):

    python -m tests.integration.two_node_engine '<json arguments>'

It prints one line of JSON with what it saw; the test judges it. Both nodes
run on this machine (ray.cluster_utils.Cluster: a raylet, object store and
workers each), on loopback, as two hosts would run them; removing the worker
node kills its raylet and every process on it, as a lost host would. The
supervisor is moved onto that node first (Ray places it at random), so that
it is lost with the writers beside it. A third node then joins, and chain 0
leaves the supervisor's node for it (the loss had left every actor on the
head).

Either ingress (`haproxy` in the arguments): Serve runs one on each node
that holds an API replica, and the engine puts one replica on each node.
The ingresses of both nodes take the API's port, as on hosts of their own
behind a load balancer; a lost node loses its ingress with it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import asyncpg
import httpx
import psutil
import ray
from ray._private import state as ray_state
from ray.cluster_utils import Cluster

from dailydoco.actors.refs import SUPERVISOR_NAME, chain_actor_name
from dailydoco.cluster.config import load_config
from dailydoco.cluster.demo import retryable
from dailydoco.cluster.system import EngineSystem, haproxy_processes, ray_env, serve_app_name
from tests.conftest import free_port, migrated_database

SHARD_ACTORS = 3
CHAIN_ACTORS = 2
BUYERS = 4
USERS = 9  # a chain: the last three buy, so every level is paid
PURCHASING_BEFORE_S = 5.0
PURCHASING_AFTER_S = 8.0
HEALED_WITHIN_S = 60.0
# The supervisor's hang check, every 5 s, moves the chain; its start takes about a second.
CHAIN_MOVED_WITHIN_S = 30.0
PURCHASING_AFTER_MOVE_S = 4.0
SUPERVISOR_MOVES_MAX = 20  # each lands on the worker with even odds
SETTLED_WITHIN_S = 15.0
INGRESS_LISTENING_WITHIN_S = 30.0
SPREAD_WITHIN_S = 30.0
# Both nodes on loopback: Ray takes a node's address from its route out
# unless it believes it runs on one machine, as this setting tells it.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _purchase(api: httpx.Client, transaction_id: str, user_id: str, amount_micros: int,
              unacknowledged: collections.Counter) -> None:
    """Send until acknowledged, the same body each time, as the engine's
    client does through a failure (`retryable`); counts the answers that
    were not acknowledgements by kind. A plain-text 500 is Serve's default
    proxy's for a request whose API replica was lost with the node."""
    for _ in range(300):
        try:
            r = api.post("/v1/transactions", json={"transaction_id": transaction_id, "user_id": user_id,
                                                   "amount_micros": amount_micros, "currency": "USD"})
            if r.status_code in (200, 201):
                return
            if not retryable(r):
                raise AssertionError(f"{transaction_id}: {r.status_code} {r.text}")
            unacknowledged[f"{r.status_code} {r.headers.get('content-type')}"] += 1
        except httpx.TransportError as exc:
            unacknowledged[type(exc).__name__] += 1
        time.sleep(0.2)
    raise AssertionError(f"{transaction_id} was never acknowledged")


def _supervisor_onto(system: EngineSystem, node_id: str) -> int:
    """Kill the supervisor until Ray restarts it on `node_id` (Ray places it
    at random), so that losing that node loses the supervisor with the
    writers beside it: the case in which shards elsewhere miss a delivery
    unless the restarted supervisor reloads them. Returns the kills."""
    for kills in range(SUPERVISOR_MOVES_MAX + 1):
        placement, deadline = None, time.monotonic() + HEALED_WITHIN_S
        while placement is None and time.monotonic() < deadline:
            placement = _placement(system)
            if placement is None:
                time.sleep(0.2)
        if placement is not None and placement[SUPERVISOR_NAME] == node_id:
            return kills
        ray.kill(system.supervisor, no_restart=False)
        time.sleep(0.5)
    raise AssertionError(f"the supervisor never came back on node {node_id}")


def _placed(system: EngineSystem, placed: Callable[[dict], bool], since: float,
            within_s: float) -> tuple[dict | None, float | None]:
    """Wait until the actors' placement is `placed`; return the last
    placement seen and the seconds from `since` (monotonic) until then,
    None if not within `within_s`."""
    placement = None
    while time.monotonic() - since < within_s:
        placement = _placement(system)
        if placement is not None and placed(placement):
            return placement, time.monotonic() - since
        time.sleep(0.2)
    return placement, None


def _all_back_on(system: EngineSystem, node_id: str, since: float, within_s: float) -> tuple[dict | None, float | None]:
    """Wait until every actor runs on `node_id` (see _placed)."""
    return _placed(system, lambda placement: set(placement.values()) == {node_id}, since, within_s)


def _api_replica_nodes(config) -> list[str]:
    """The node of each live API replica of the home region. Ray's actor
    table says where an actor runs: its public state API needs the
    dashboard, which the engine does not start."""
    prefix = f"SERVE_REPLICA::{serve_app_name(config, config.region)}#"
    return sorted(actor["Address"]["NodeID"] for actor in ray_state.actors().values()
                  if actor["State"] == "ALIVE" and actor["Name"].startswith(prefix))


def _ingress_listening(config, node_ids: list[str]) -> dict[str, bool] | None:
    """Whether each node's HAProxy listens on the API's port (None: Serve's proxy)."""
    if not config.haproxy:
        return None
    listening = {}
    for node_id in node_ids:
        listening[node_id] = False
        for process in haproxy_processes(node_id):
            with contextlib.suppress(psutil.Error):
                listening[node_id] |= any(c.status == psutil.CONN_LISTEN and c.laddr.port == config.http_port
                                          for c in process.net_connections("tcp"))
    return listening


def _placement(system: EngineSystem) -> dict[str, str] | None:
    try:
        return ray.get(system.supervisor.placement.remote(), timeout=10)
    except ray.exceptions.RayError:
        return None  # an actor is dead and not yet recreated, or the supervisor is starting


async def _ledger(url: str) -> tuple[dict[str, int], dict[str, int]]:
    conn = await asyncpg.connect(url)
    try:
        counts = {r[0]: r[1] for r in await conn.fetch(
            "SELECT transaction_id, count(*) FROM transactions GROUP BY 1")}
        sums = {r[0]: int(r[1]) for r in await conn.fetch(
            "SELECT beneficiary_id, sum(amount_micros) FROM commission_ledger GROUP BY 1")}
    finally:
        await conn.close()
    return counts, sums


def _register_chain(api: httpx.Client, namespace: str) -> list[str]:
    """USERS users, each referred by the one before: a chain whose last
    three buy, so that every level is paid."""
    users, code = [], None
    for i in range(USERS):
        body = {"user_id": f"{namespace}-u{i}"} | ({"referral_code": code} if code else {})
        r = api.post("/v1/users", json=body)
        assert r.status_code == 201, r.text
        users.append(r.json()["user_id"])
        code = r.json()["referral_code"]
    return users


class _Buyers:
    """BUYERS threads buying for the chain's last three users, each purchase
    sent until acknowledged; what they saw is read once they are stopped."""

    def __init__(self, api: httpx.Client, namespace: str, users: list[str]):
        self.acknowledged: list[str] = []
        self.acknowledged_at: list[float] = []  # time.monotonic() of each
        self.unacknowledged: collections.Counter = collections.Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._buy, args=(api, namespace, users, k)) for k in range(BUYERS)]
        for thread in self._threads:
            thread.start()

    def _buy(self, api: httpx.Client, namespace: str, users: list[str], k: int) -> None:
        n = k
        try:
            while not self._stop.is_set():
                tid = f"{namespace}-t{n}"
                _purchase(api, tid, users[-1 - n % 3], 1_000_000 + n, self.unacknowledged)
                self.acknowledged.append(tid)
                self.acknowledged_at.append(time.monotonic())
                n += BUYERS
        except Exception as exc:  # noqa: BLE001 - reported to the test
            self.errors.append(repr(exc))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def _hosts_config(args: dict):
    """The engine's config for a scenario on network_hosts' hosts: the
    servers on the services host, the API on every address of its host."""
    return load_config(state_dir=args["state_dir"], postgres_url=args["postgres_url"], nats_url=args["nats_url"],
                       redis_url=args["redis_url"], ray_address=args["ray_address"], http_host="0.0.0.0",
                       http_port=args["http_port"], shard_actors=SHARD_ACTORS, chain_actors=CHAIN_ACTORS,
                       namespace=args["namespace"], regions=(args["region"],), region=args["region"])


def _spread_over_both_hosts(system) -> dict[str, str]:
    """The actors' placement once it spans both hosts (Ray places the
    supervisor, which deals the shards and chains in turn from there)."""
    spread_until = time.monotonic() + SPREAD_WITHIN_S
    while (placement := _placement(system)) is None or len(set(placement.values())) < 2:
        assert time.monotonic() < spread_until, f"the actors never spanned both hosts: {placement}"
        time.sleep(0.5)
    return placement


def _service_client(config, host_ip: str, timeout_s: float = 30, key: str = "service_api_key") -> httpx.Client:
    """The API of the ingress on `host_ip`, as a backend of that host reaches it, with the service key
    (or the admin's, `key="admin_api_key"`)."""
    keys = json.loads((Path(config.state_dir) / "secrets.json").read_text())
    return httpx.Client(base_url=f"http://{host_ip}:{config.http_port}",
                        headers={"X-API-Key": keys[key]}, timeout=timeout_s)


def _answered(client: httpx.Client, path: str) -> int | str:
    """A GET's status, or the name of the transport error that stopped it."""
    try:
        return client.get(path).status_code
    except httpx.TransportError as exc:
        return type(exc).__name__


def _readiness(client: httpx.Client) -> int | str | dict:
    """/readyz's status; where it is not 200, with the body, which names
    the checks that failed; or the transport error that stopped it."""
    try:
        r = client.get("/readyz")
    except httpx.TransportError as exc:
        return type(exc).__name__
    return 200 if r.status_code == 200 else {"status": r.status_code, "body": r.text[:2000]}


def _ready_within(client: httpx.Client) -> int | str:
    """`/readyz`'s answer once it is 200, or its last after
    INGRESS_LISTENING_WITHIN_S: Serve starts a host's ingress once a
    replica runs there, after the application is ready."""
    ready_until = time.monotonic() + INGRESS_LISTENING_WITHIN_S
    while (answer := _answered(client, "/readyz")) != 200 and time.monotonic() < ready_until:
        time.sleep(0.2)
    return answer


def _settled(api: httpx.Client, postgres_url: str, users: list[str]) -> dict:
    """The ledger's transaction counts, and each user's pending balance as
    served and as the ledger sums it, once they agree (shards trail the
    ledger by tens of milliseconds) or SETTLED_WITHIN_S has passed."""
    settle_until = time.monotonic() + SETTLED_WITHIN_S
    while True:
        counts, sums = asyncio.run(_ledger(postgres_url))
        served = {}
        for user in users:
            balances = api.get(f"/v1/users/{user}/balance").json()["balances"]
            served[user] = balances[0]["pending_micros"] if balances else 0
        expected = {user: sums.get(user, 0) for user in users}
        if served == expected or time.monotonic() > settle_until:
            return {"counts": counts, "served": served, "expected": expected}
        time.sleep(0.5)


def _longest_gap(times: list[float]) -> float:
    """The longest stretch between consecutive times, sorted (0 for fewer than two)."""
    times = sorted(times)
    return max((b - a for a, b in zip(times, times[1:])), default=0.0)


def _purchases_outcome(buyers: _Buyers, settled: dict) -> dict:
    """What every scenario reports of its purchases, for the test to judge:
    acknowledged and not, and how the ledger and the shards stand."""
    return {
        "acknowledged": buyers.acknowledged, "unacknowledged": buyers.unacknowledged, "errors": buyers.errors,
        "ledger_counts": {tid: settled["counts"].get(tid, 0) for tid in buyers.acknowledged},
        "transactions_in_ledger": len(settled["counts"]),
        "served_balances": settled["served"], "ledger_balances": settled["expected"],
    }


def main(args: dict) -> dict:
    url = asyncio.run(migrated_database(args["postgres_server_url"], args["database"]))
    config = load_config(state_dir=args["state_dir"], postgres_url=url, nats_url=args["nats_url"],
                         redis_url=args["redis_url"], http_port=free_port(), shard_actors=SHARD_ACTORS,
                         chain_actors=CHAIN_ACTORS,
                         namespace=args["namespace"], haproxy=args["haproxy"])
    # What ray_cluster.yaml sets for `ray start` on every host (Ray's
    # telemetry off, Serve's settings), here for the nodes this process starts.
    ray_env(config)
    # Both nodes' ingresses bind the API's port, each as on its own host: on
    # one machine only with SO_REUSEPORT, which Serve leaves off (HAProxy's
    # `-dR`) unless this is set. The kernel then deals the client's
    # connections over the two, as a load balancer would over hosts.
    os.environ["SERVE_SOCKET_REUSE_PORT_ENABLED"] = "1"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False,
        # A lost node is declared dead within about 3 s, not Ray's 30.
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
    worker = cluster.add_node(num_cpus=1)
    head_id = cluster.head_node.node_id
    try:
        ray.init(address=cluster.address, namespace=args["namespace"], include_dashboard=False, log_to_driver=False)
        cluster.wait_for_nodes()
        system = EngineSystem(config).start()
        supervisor_moves = _supervisor_onto(system, worker.node_id)
        before = _placement(system)
        api_replicas_before = _api_replica_nodes(config)
        # Serve starts a node's ingress once a replica runs there, after the
        # application is ready: give it a moment.
        listening_until = time.monotonic() + INGRESS_LISTENING_WITHIN_S
        while (ingress_before := _ingress_listening(config, [head_id, worker.node_id])) and not all(
                ingress_before.values()) and time.monotonic() < listening_until:
            time.sleep(0.2)
        keys = json.loads((Path(config.state_dir) / "secrets.json").read_text())
        api = httpx.Client(base_url=system.url, headers={"X-API-Key": keys["service_api_key"]}, timeout=30)

        users = _register_chain(api, args["namespace"])
        buyers = _Buyers(api, args["namespace"], users)
        time.sleep(PURCHASING_BEFORE_S)
        acknowledged_before_loss = len(buyers.acknowledged)
        lost_at = time.monotonic()
        cluster.remove_node(worker)
        for process in haproxy_processes(worker.node_id):  # a grandchild, which Ray leaves; the host would not
            process.kill()
        after, healed_after_s = _all_back_on(system, head_id, lost_at, HEALED_WITHIN_S)
        time.sleep(PURCHASING_AFTER_S)
        ingress_after = _ingress_listening(config, [head_id, worker.node_id])
        api_replicas_after = _api_replica_nodes(config)

        # The loss left every actor, the supervisor too, on the head: a node
        # that joins takes chain 0, so that the head's loss would leave a writer.
        joined = cluster.add_node(num_cpus=1)
        joined_at = time.monotonic()
        moved, moved_after_s = _placed(
            system, lambda placement: placement[chain_actor_name(0)] == joined.node_id, joined_at,
            CHAIN_MOVED_WITHIN_S)
        moved_at = time.monotonic()
        time.sleep(PURCHASING_AFTER_MOVE_S)
        buyers.stop()
        settled = _settled(api, url, users)
        return {
            "head": head_id, "worker": worker.node_id, "supervisor_moves": supervisor_moves,
            "placement_before": before, "placement_after": after, "healed_after_s": healed_after_s,
            "ingress_before": ingress_before, "ingress_after": ingress_after,
            "api_replicas_before": api_replicas_before, "api_replicas_after": api_replicas_after,
            "joined": joined.node_id, "placement_joined": moved, "chain_moved_after_s": moved_after_s,
            "acknowledged_after_move": sum(at > moved_at for at in list(buyers.acknowledged_at)),
            "longest_unacknowledged_after_join_s": _longest_gap(
                [joined_at, *(at for at in list(buyers.acknowledged_at) if at > joined_at)]),
            "acknowledged_before_loss": acknowledged_before_loss, **_purchases_outcome(buyers, settled),
            "ready": _readiness(api),
            "restarts": ray.get(system.supervisor.restart_counts.remote()),
            "chain_moves": ray.get(system.supervisor.chain_moves.remote()),
        }
    finally:
        # Every actor ends with its cluster; Serve's graceful stop would wait for nothing.
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
