"""ray_cluster.yaml's Ray on two hosts of a real network, and one host cut off.

The hosts are network namespaces of this machine joined by a bridge
(`network_hosts.py`); Postgres, NATS and Redis run on a third, as external
servers would. `partitioned_host_engine.py` runs the engine and the
purchases from the head, and cuts the worker off.
"""

from __future__ import annotations

import collections

from dailydoco.actors.refs import SUPERVISOR_NAME, shard_actor_name

from .network_hosts import HEAD, HTTP_PORT, NEEDS_ROOT_AND_IPROUTE, TAG, WORKER, run_scenario_on_hosts
from .partitioned_host_engine import HEALED_WITHIN_S

SCENARIO_TIMEOUT_S = 300

pytestmark = NEEDS_ROOT_AND_IPROUTE


def test_a_host_cut_off_from_the_network_loses_nothing_and_its_actors_return_on_the_other():
    seen = run_scenario_on_hosts(
        "tests.integration.partitioned_host_engine", HEAD, SCENARIO_TIMEOUT_S,
        lambda state, _: {"head_ip": HEAD.ip, "worker_ip": WORKER.ip, "http_port": HTTP_PORT,
                          "state_dir": str(state / "engine"), "namespace": f"{TAG}-partition", "region": "us-east",
                          "switch_port": WORKER.port})
    head, worker = seen["head"], seen["worker"]
    print({k: seen[k] for k in ("healed_after_s", "acknowledged_before_cut", "acknowledged_while_cut",
                                "unacknowledged", "transactions_in_ledger")})

    # Both hosts ran actors and an API replica, and the worker's ingress answered.
    per_node = collections.Counter(seen["placement_before"].values())
    assert set(per_node) == {head, worker}, seen["placement_before"]
    assert sorted(seen["api_replicas_before"]) == sorted([head, worker])
    assert seen["worker_ingress_before"] == 200

    # Cut off, the worker was declared dead and its actors made again on the
    # head within the yaml's health checks (about 65 s with Ray's own).
    assert seen["healed_after_s"] is not None and seen["healed_after_s"] < HEALED_WITHIN_S, seen["placement_after"]
    # Every actor, the supervisor and the shards included, on the head.
    assert SUPERVISOR_NAME in seen["placement_after"] and shard_actor_name(0) in seen["placement_after"]
    assert set(seen["placement_after"].values()) == {head}
    assert seen["api_replicas_after"] == [head]
    # Once the cut ended the worker stayed out: Ray does not take back a host it declared dead.
    assert seen["alive_nodes_after"] == [head]

    # Purchases went on through the cut, none lost or written twice, the
    # worker's processes back in reach included; the shards serve the ledger.
    assert seen["errors"] == []
    assert seen["acknowledged_while_cut"] > 0
    assert set(seen["ledger_counts"].values()) == {1}
    assert seen["transactions_in_ledger"] == len(seen["acknowledged"])
    assert seen["served_balances"] == seen["ledger_balances"]
    assert seen["ready"] == 200, seen["ready"]
