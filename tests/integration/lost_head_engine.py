"""The engine on two hosts of a real network, and its Ray head host lost under purchases.

Run by tests/integration/test_head_node_loss.py inside the worker host's
network namespace, a driver of the cluster from the host that survives,
once `dailydoco up` has started the engine on the head as the yaml's
instructions say:

    python -m tests.integration.lost_head_engine '<json arguments>'

It prints one line of JSON with what it saw; the test judges it. The head
host is lost as a power cut loses it: its cable is unplugged (the
switch's port disabled) and every process on it killed, so the worker
hears nothing, not even its connections closing. Its replacement comes up
on the same address, from ray_cluster.yaml's head start command, and finds
Ray's control store where the old head left it: in Redis on the services
host (the yaml's RAY_REDIS_ADDRESS). `dailydoco up` is lost with the head,
and nothing starts it again: the engine's actors and Serve applications
are detached, and outlive the process that made them.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
import types

import httpx
import ray
from ray._private import state as ray_state

from dailydoco.actors.refs import SUPERVISOR_NAME, shard_actor_name
from dailydoco.storage.sharding import actor_of_vshard, vshard_of

from .network_hosts import kill_everything_on, set_switch_port
from .two_node_engine import (
    SHARD_ACTORS,
    _answered,
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
    _supervisor_onto,
)

PURCHASING_BEFORE_S = 5.0
# Long enough for what went wrong before session 44 to show (from 12 to 15 s
# after the loss, in three runs of 75 s, and not in any of 20 or 40 s).
HEAD_LOST_FOR_S = 75.0
BACK_WITHIN_S = 90.0
PURCHASING_AFTER_S = 5.0
READ_EVERY_S = 0.05
# A read or a purchase that waits for the lost head waits until the
# replacement, and one the ingress sent to the lost head's replica until
# its health checks mark that replica down (about 15 s): both are cut short
# here, and a purchase sent again. Answered reads take milliseconds, but a
# loaded host can stall one past a second (1 s cut 2 reads of 75 at the end
# of the outage in one run inside the full suite); a purchase whose chain
# was lost waits about 2 s before another chain takes it (serve/ring_writes.py).
ANSWER_TIMEOUT_S = 5.0
USER_CANDIDATES = 100  # each lands on a given one of 3 shards with odds 1 in 3
# A registration of a lost shard's user: about 2 s until the worker's
# replica finds that shard silent, and 2 s more until the worker's shard
# that makes it finds so too (serve/ring_writes.py, RayShardRouter); a
# payout: about 2 s until the replica finds the lost supervisor silent.
ANSWERED_WHILE_LOST_WITHIN_S = 15.0


def _actors() -> dict[str, dict]:
    """Every live named actor (the engine's, Serve's): its id, node, process and restarts."""
    return {a["Name"]: {"id": a["ActorID"], "node": a["Address"]["NodeID"], "pid": a["Pid"],
                        "restarts": a["NumRestarts"]}
            for a in ray_state.actors().values() if a["State"] == "ALIVE" and a["Name"]}


def _user_with_shard_on(node_id: str, placement: dict, prefix: str) -> str | None:
    """An id whose shard runs on `node_id`; None if no shard does."""
    for k in range(USER_CANDIDATES):
        user = f"{prefix}-{k}"
        if placement[shard_actor_name(actor_of_vshard(vshard_of(user), SHARD_ACTORS))] == node_id:
            return user
    return None


def _reader_with_shard_on(node_id: str, placement: dict, api: httpx.Client, namespace: str) -> str | None:
    """A user registered for reading whose shard runs on `node_id`; None if no shard does."""
    user = _user_with_shard_on(node_id, placement, f"{namespace}-reader")
    if user is not None:
        r = api.post("/v1/users", json={"user_id": user})
        assert r.status_code == 201, r.text
    return user


def _posted_timed(api: httpx.Client, path: str, body: dict) -> dict:
    """A POST's status (or the transport error that stopped it) and how long it took."""
    started = time.monotonic()
    try:
        status: int | str = api.post(path, json=body, timeout=ANSWERED_WHILE_LOST_WITHIN_S).status_code
    except httpx.TransportError as exc:
        status = type(exc).__name__
    return {"body": body, "status": status, "after_s": round(time.monotonic() - started, 2)}


def main(args: dict) -> dict:
    config = _hosts_config(args)
    # The worker's own node: a driver attaches to a raylet of its host, which
    # Ray finds by `ps`, and here the head's raylet is a process of the same machine.
    ray.init(address=args["ray_address"], namespace=config.namespace, log_to_driver=False,
             _node_ip_address=args["worker_ip"])
    try:
        worker_id = ray.get_runtime_context().get_node_id()
        # What `_placement` and `_supervisor_onto` ask of an EngineSystem.
        system = types.SimpleNamespace(supervisor=ray.get_actor(SUPERVISOR_NAME, namespace=config.namespace))
        before = _spread_over_both_hosts(system)
        head_id = next(node for node in before.values() if node != worker_id)
        # The supervisor is lost with the head, beside the writers there:
        # the case in which nothing but Ray's restored control store
        # brings it back.
        _supervisor_onto(system, head_id)
        before = _placement(system)
        # The worker's ingress (a load balancer in front of both hosts would
        # send a client there once the head's stops answering).
        api = _service_client(config, args["worker_ip"])
        head_api = _service_client(config, args["head_ip"], timeout_s=5)
        worker_ingress_before = _ready_within(api)
        api_replicas_before = _api_replica_nodes(config)
        actors_before = _actors()

        users = _register_chain(api, args["namespace"])
        readers = {"shard_kept": _reader_with_shard_on(worker_id, before, api, args["namespace"]),
                   "shard_lost": _reader_with_shard_on(head_id, before, api, args["namespace"])}
        # Every shard on the worker is possible (the supervisor deals them in
        # turn from where it stands): then no read depends on a lost shard.
        readers = {which: user for which, user in readers.items() if user is not None}
        assert "shard_kept" in readers, f"no shard on the worker: {before}"
        # Buyers give up on an answer as readers do, and send the purchase
        # again: with the client's 30 s, the scenario would show how long
        # the lost replica held what the ingress sent it, not the engine.
        buyers = _Buyers(_service_client(config, args["worker_ip"], timeout_s=ANSWER_TIMEOUT_S), args["namespace"],
                         users)
        time.sleep(PURCHASING_BEFORE_S)
        acknowledged_before_loss = len(buyers.acknowledged)
        lost_at = time.monotonic()
        # Unplugged first: the worker hears nothing, not even a connection close.
        set_switch_port(args["switch_netns"], args["head_port"], "0")
        kill_everything_on(args["head_netns"])
        # Balance reads through the worker's ingress, in turn of a user whose
        # shard the worker holds and of one whose shard was lost with the
        # head: each answer counted by the 5 s after the loss it came in.
        # A read that waits is cut short: one the ingress sent to the lost
        # head's replica waits until its health checks mark that replica down.
        reader = httpx.Client(base_url=api.base_url, headers=api.headers, timeout=ANSWER_TIMEOUT_S)
        reads_while_lost = {which: collections.defaultdict(collections.Counter) for which in readers}
        while time.monotonic() - lost_at < HEAD_LOST_FOR_S:
            for which, user in readers.items():
                answer = _answered(reader, f"/v1/users/{user}/balance")
                reads_while_lost[which][int((time.monotonic() - lost_at) // 5) * 5][str(answer)] += 1
            time.sleep(READ_EVERY_S)
        acknowledged_while_lost = len(buyers.acknowledged) - acknowledged_before_loss
        # A user whose shard was lost registers: a shard on the worker makes
        # the record, and leaves its delivery to the lost shard in a mailbox.
        newcomer = _user_with_shard_on(head_id, before, f"{args['namespace']}-newcomer")
        registered_while_lost = None if newcomer is None else _posted_timed(api, "/v1/users", {"user_id": newcomer})
        # A payout, the lost supervisor's to make: the worker's chain makes
        # it (nothing is approved, so it pays no one, and completes).
        admin = _service_client(config, args["worker_ip"], key="admin_api_key")
        paid_while_lost = _posted_timed(admin, "/v1/payouts", {"payout_id": f"{args['namespace']}-payout"})
        purchases_while_lost = collections.Counter(
            int((at - lost_at) // 5) * 5 for at in list(buyers.acknowledged_at) if 0 <= at - lost_at < HEAD_LOST_FOR_S)

        # The replacement head: the same address, the yaml's start command.
        set_switch_port(args["switch_netns"], args["head_port"], "3")
        replaced_at = time.monotonic()
        replacement = args["replacement_head_start"]
        started = subprocess.run(replacement["argv"], env=replacement["env"], capture_output=True, text=True,
                                 timeout=BACK_WITHIN_S)
        assert started.returncode == 0, f"the new head did not start: {started.stdout[-2000:]}{started.stderr[-2000:]}"
        back_after_s = None
        while time.monotonic() - replaced_at < BACK_WITHIN_S:
            placement = _placement(system)
            alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            if (placement is not None and set(placement.values()) <= alive and len(alive) == 2
                    and len(set(_api_replica_nodes(config))) == 2 and _answered(head_api, "/readyz") == 200):
                back_after_s = time.monotonic() - replaced_at
                break
            time.sleep(0.5)
        time.sleep(PURCHASING_AFTER_S)
        buyers.stop()
        return {
            "head": head_id, "worker": worker_id, "placement_before": before, "placement_after": _placement(system),
            "back_after_s": back_after_s, "api_replicas_before": api_replicas_before,
            "api_replicas_after": _api_replica_nodes(config), "worker_ingress_before": worker_ingress_before,
            "nodes_after": {n["NodeID"]: n["Alive"] for n in ray.nodes()},
            "actors_before": actors_before, "actors_after": _actors(),
            "reads_while_lost": reads_while_lost, "purchases_while_lost": purchases_while_lost,
            "acknowledged_before_loss": acknowledged_before_loss, "acknowledged_while_lost": acknowledged_while_lost,
            "registered_while_lost": registered_while_lost, "paid_while_lost": paid_while_lost,
            "newcomer_read_after": None if newcomer is None else _answered(api, f"/v1/users/{newcomer}"),
            **_purchases_outcome(buyers, _settled(api, config.postgres_url, users)),
            "ready": _readiness(api), "head_ready": _readiness(head_api),
            "chain_moves": ray.get(system.supervisor.chain_moves.remote()),
        }
    finally:
        ray.shutdown()


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
