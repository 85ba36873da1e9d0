"""The engine spread over two Ray nodes, one of them lost under purchases,
and a third joining.

The scenario runs in a process of its own (`two_node_engine.py` says why and
how); this judges what it saw.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import subprocess
import sys

import pytest

from dailydoco.actors.refs import SUPERVISOR_NAME, chain_actor_name, shard_actor_name

from .two_node_engine import LOOPBACK_ENV, SHARD_ACTORS

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCENARIO_TIMEOUT_S = 400


@pytest.mark.parametrize("haproxy", [True, False], ids=["haproxy", "serve-proxy"])
def test_the_engine_spans_two_nodes_and_losing_one_loses_nothing(servers, tmp_path, haproxy):
    postgres_url, nats_url, redis_url = servers
    ingress = "haproxy" if haproxy else "serve_proxy"
    args = {"postgres_server_url": postgres_url, "nats_url": nats_url, "redis_url": redis_url,
            "state_dir": str(tmp_path), "namespace": f"dd-two-nodes-{ingress}-{os.getpid()}",
            "database": f"dailydoco_two_nodes_{ingress}_{os.getpid()}", "haproxy": haproxy}
    run = subprocess.run([sys.executable, "-m", "tests.integration.two_node_engine", json.dumps(args)],
                         cwd=ROOT, env=os.environ | LOOPBACK_ENV, capture_output=True, text=True,
                         timeout=SCENARIO_TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-6000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    head, worker = seen["head"], seen["worker"]
    # Shown with the failure, and with `-s`: what a reader of the README's figures needs.
    print({key: seen[key] for key in ("healed_after_s", "chain_moved_after_s", "longest_unacknowledged_after_join_s",
                                      "acknowledged_before_loss", "acknowledged_after_move", "unacknowledged")},
          "purchases:", len(seen["acknowledged"]))

    # Dealt over both nodes in turn, shards on each: not Ray's random choice.
    # (The scenario puts the supervisor on the node it then loses.)
    before = dict(seen["placement_before"])
    before.pop(SUPERVISOR_NAME)
    per_node = collections.Counter(before.values())
    assert set(per_node) == {head, worker} and abs(per_node[head] - per_node[worker]) <= 1, before
    assert {before[shard_actor_name(i)] for i in range(SHARD_ACTORS)} == {head, worker}, before
    # The API replicas too, one a node; the head's outlived the loss. Each
    # node ran an HAProxy on the API's port; the head's still does.
    assert sorted(seen["api_replicas_before"]) == sorted([head, worker])
    assert seen["api_replicas_after"] == [head]
    if haproxy:
        assert seen["ingress_before"] == {head: True, worker: True}
        assert seen["ingress_after"] == {head: True, worker: False}

    # The lost node's actors were made again on the node left.
    assert seen["healed_after_s"] is not None, seen["placement_after"]
    assert set(seen["placement_after"].values()) == {head}
    assert seen["errors"] == []
    assert 0 < seen["acknowledged_before_loss"] < len(seen["acknowledged"]), "purchases went on after the loss"

    # The node that joined took chain 0 off the supervisor's node, and
    # nothing else: the loss had left every actor on the head.
    assert seen["chain_moved_after_s"] is not None, seen["placement_joined"]
    joined = dict(seen["placement_joined"])
    assert joined.pop(chain_actor_name(0)) == seen["joined"]
    assert set(joined.values()) == {head}, joined
    assert seen["chain_moves"] == 1
    assert seen["acknowledged_after_move"] > 0, "purchases went on after the move"

    # Nothing acknowledged was lost or written twice, and what the shards
    # serve is the ledger: the shards that outlived the supervisor reloaded
    # (a chain on the lost node had died between a commit and its delivery
    # in 4 of 5 runs without that: the served balances fell short of it).
    assert set(seen["ledger_counts"].values()) == {1}
    assert seen["transactions_in_ledger"] == len(seen["acknowledged"])
    assert seen["served_balances"] == seen["ledger_balances"]
    assert seen["ready"] == 200, seen["ready"]
