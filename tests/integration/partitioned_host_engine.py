"""The engine on two hosts of a real network, one of them cut off under purchases.

Run by tests/integration/test_network_partition.py inside the head host's
network namespace, on the Ray cluster that ray_cluster.yaml's start
commands made there and on the worker host (a driver joins a cluster from
one of its nodes):

    python -m tests.integration.partitioned_host_engine '<json arguments>'

It prints one line of JSON with what it saw; the test judges it. The cut
is the switch's (the worker's bridge port disabled): both hosts keep their
links up and every packet between them is dropped, unanswered, so each
side learns of it only by its timeouts, as in a real partition. Unlike a
host that dies, the cut-off one keeps running meanwhile, and comes back
once the cut ends.
"""

from __future__ import annotations

import json
import sys
import time

import ray

from dailydoco.cluster.system import EngineSystem

from .network_hosts import set_switch_port
from .two_node_engine import (
    _all_back_on,
    _api_replica_nodes,
    _Buyers,
    _hosts_config,
    _placement,
    _purchases_outcome,
    _readiness,
    _ready_within,
    _register_chain,
    _service_client,
    _settled,
    _spread_over_both_hosts,
)

PURCHASING_BEFORE_S = 5.0
HEALED_WITHIN_S = 60.0  # Ray's defaults took about 70 s; the head's settings in ray_cluster.yaml, 12 to 15
PURCHASING_AFTER_HEAL_S = 5.0
PURCHASING_AFTER_RECONNECT_S = 5.0


def main(args: dict) -> dict:
    config = _hosts_config(args)
    ray.init(address=args["ray_address"], namespace=config.namespace, log_to_driver=False)
    try:
        head_id = ray.get_runtime_context().get_node_id()
        system = EngineSystem(config).start()
        before = _spread_over_both_hosts(system)
        worker_id = next(node for node in before.values() if node != head_id)
        api_replicas_before = _api_replica_nodes(config)
        api = _service_client(config, args["head_ip"])
        worker_ingress_before = _ready_within(_service_client(config, args["worker_ip"], timeout_s=5))

        users = _register_chain(api, args["namespace"])
        buyers = _Buyers(api, args["namespace"], users)
        time.sleep(PURCHASING_BEFORE_S)
        acknowledged_before_cut = len(buyers.acknowledged)
        cut_at = time.monotonic()
        set_switch_port(args["switch_netns"], args["switch_port"], "0")  # disabled
        _, healed_after_s = _all_back_on(system, head_id, cut_at, HEALED_WITHIN_S)
        time.sleep(PURCHASING_AFTER_HEAL_S)
        acknowledged_while_cut = len(buyers.acknowledged) - acknowledged_before_cut
        # The cut ends: the worker host, declared dead meanwhile, reaches
        # the head again, with whatever of its processes still run.
        set_switch_port(args["switch_netns"], args["switch_port"], "3")  # forwarding
        time.sleep(PURCHASING_AFTER_RECONNECT_S)
        buyers.stop()
        return {
            "head": head_id, "worker": worker_id, "placement_before": before, "placement_after": _placement(system),
            "healed_after_s": healed_after_s, "api_replicas_before": api_replicas_before,
            "api_replicas_after": _api_replica_nodes(config), "worker_ingress_before": worker_ingress_before,
            "alive_nodes_after": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
            "acknowledged_before_cut": acknowledged_before_cut, "acknowledged_while_cut": acknowledged_while_cut,
            **_purchases_outcome(buyers, _settled(api, config.postgres_url, users)),
            "ready": _readiness(api),
        }
    finally:
        ray.shutdown()


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
