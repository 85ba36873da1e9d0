"""Starts and stops the whole engine: servers, Ray, actors, Serve."""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import tempfile
from pathlib import Path

import asyncpg
import msgspec

from .config import EngineConfig, regions_home_first
from .embedded import EmbeddedServers, free_port
from .ingress_errors import install_wrapper, real_haproxy_binary

SERVE_APP_NAME = "dailydoco"
LIVE_PATH = "/v1/live"  # the live gateway's socket, under each region's prefix


def serve_app_name(config: EngineConfig, region: str) -> str:
    return SERVE_APP_NAME if region == config.region else f"{SERVE_APP_NAME}-{region}"


def live_app_name(config: EngineConfig, region: str) -> str:
    """The Serve application of a region's live gateway: the API's name, `-live`."""
    return serve_app_name(config, region) + "-live"


def region_route_prefix(config: EngineConfig, region: str) -> str:
    """Where a region's API answers: the home region's at the root."""
    return "/" if region == config.region else f"/regions/{region}"


def live_route_prefix(config: EngineConfig, region: str) -> str:
    """Where a region's live gateway answers: HAProxy and Serve's proxy send
    a path to the application with the longest prefix of it, so this one
    takes the socket's path from the region's API."""
    return region_route_prefix(config, region).rstrip("/") + LIVE_PATH


def _haproxy_dir(config: EngineConfig) -> Path:
    # Short: HAProxy caps socket paths at 97 bytes and Ray nests a 56-byte hash.
    state_key = hashlib.blake2b(str(Path(config.state_dir).resolve()).encode(), digest_size=4).hexdigest()
    return Path(tempfile.gettempdir()) / f"dd-hap-{state_key}"


def haproxy_processes(marker: str) -> list:
    """The running HAProxy processes with `marker` in their command line:
    Ray names each node's config in a folder of the node's id, below the
    deployment's folder (`_haproxy_dir`)."""
    import psutil

    return [process for process in psutil.process_iter(["name", "cmdline"])
            if process.info["name"] == "haproxy" and any(marker in arg for arg in process.info["cmdline"] or ())]


def _reap_haproxy(config: EngineConfig) -> None:
    for process in haproxy_processes(str(_haproxy_dir(config))):
        process.terminate()


# What Ray records for its dashboard and Grafana, none of which the engine
# reads (its /metrics has its own registry). Measured here with the local Ray
# that `up` starts: the node agent's periodic ingest of every worker's metrics
# and its per-process stats (psutil, smaps) took 40 to 70 % of a core for about
# half a second every 10 s, and every request in flight then waited (balance
# reads at 1,000/s stalled 0.3 to 0.5 s, all of them); with the engine idle,
# this machine's processes took 31 % of a core with it, 23 % without (one
# probe each).
RAY_TELEMETRY_OFF = {
    "RAY_enable_metrics_collection": "0",  # workers' metrics, which the node agent ingests
    "RAY_task_events_report_interval_ms": "0",  # a task event per actor call, sent on to the GCS
    "RAY_event_stats": "0",  # timing of every handler in Ray's C++ event loops
    "REPORTER_UPDATE_INTERVAL_MS": str(600_000),  # the agent's node stats, for a dashboard that is off
}

SERVE_SETTINGS = {
    # Serve's controller reconciles its deployments every 0.1 s by default:
    # 4.4 % of a core on an idle engine here, 1.6 % at 0.5 s. Its deployments
    # change only when the engine starts, stops or loses a replica; 0.4 s
    # more to react then is nothing against a replica's start.
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    # A replica that failed its health checks is killed at once. Serve would
    # stop it gracefully, which behind HAProxy means at least 30 s of
    # draining, and a replica that answers no health check drains nothing:
    # the requests it holds just wait longer (serve/deployment.py).
    "RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS": "1",
}


def ray_env(config: EngineConfig) -> None:
    """Serve and Ray read these at start, in every process Ray starts: set them
    first. A variable already set (by an operator) is left as it is."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for name, value in SERVE_SETTINGS.items():
        os.environ.setdefault(name, value)
    if not config.ray_telemetry:
        for name, value in RAY_TELEMETRY_OFF.items():
            os.environ.setdefault(name, value)
    if not config.haproxy:
        os.environ.pop("RAY_SERVE_ENABLE_HA_PROXY", None)
        os.environ.pop("RAY_SERVE_THROUGHPUT_OPTIMIZED", None)
        return
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    os.environ["RAY_SERVE_HAPROXY_METRICS_ENABLED"] = "1" if config.request_logs else "0"
    # Serve starts 4 HAProxy threads; on 2 cores they cost 13 % of a core at
    # 1,000 requests/s against 9 % for one (which alone serves tens of thousands).
    os.environ.setdefault("RAY_SERVE_HAPROXY_NBTHREAD", str(max(1, min(4, (os.cpu_count() or 2) // 2))))
    # HAProxy's files and side ports default to fixed paths and ports
    # (/tmp/haproxy-serve, 8404, 9101): two deployments on one machine would
    # collide. Give this one its own.
    haproxy_dir = _haproxy_dir(config)
    haproxy_dir.mkdir(parents=True, exist_ok=True)
    os.environ["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"] = str(haproxy_dir / "haproxy.cfg")
    os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(install_wrapper(haproxy_dir, real_haproxy_binary()))
    os.environ["RAY_SERVE_HAPROXY_SOCKET_PATH"] = str(haproxy_dir / "admin.sock")
    os.environ["RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH"] = str(haproxy_dir / "metrics.sock")
    os.environ["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] = str(haproxy_dir)
    os.environ["RAY_SERVE_HAPROXY_SERVER_STATE_FILE"] = str(haproxy_dir / "server-state")
    os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(free_port())
    os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] = str(free_port())


def _replica_logging(config: EngineConfig) -> dict:
    """Serve's logging in our replicas. A replica logs every request at INFO
    and drops the line in a filter when access logs are off, after building
    the record (the caller's frame looked up, a LogRecord made): 3 % of the
    replica's samples at 500 POSTs/s (py-spy). Below WARNING only with
    request logs on, so the call returns at its level check."""
    if config.request_logs:
        return {"enable_access_log": True, "log_level": "INFO"}
    return {"enable_access_log": False, "log_level": "WARNING"}


async def _migrate(postgres_url: str) -> list[str]:
    from dailydoco.storage.migrations import apply_migrations
    from dailydoco.storage.partitions import ensure_ledger_partitions

    conn = await asyncpg.connect(postgres_url)
    try:
        applied = await apply_migrations(conn)
        await ensure_ledger_partitions(conn)
        return applied
    finally:
        await conn.close()


class EngineSystem:
    """`with EngineSystem(config) as system:` runs everything; `system.url` is the API."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.servers = EmbeddedServers(config.state_dir)
        self.url = f"http://{config.http_host}:{config.http_port}"
        self._ray_started_here = False

    def start(self) -> "EngineSystem":
        from dailydoco.serve.auth import load_or_create_secrets

        cfg = self.config
        self.postgres_url, self.nats_url, self.redis_url = self.servers.resolve(
            cfg.postgres_url, cfg.nats_url, cfg.redis_url, regions_home_first(cfg))
        # region -> its NATS: the embedded servers', or the external ones named.
        self.region_nats_urls = self.servers.nats_urls or {cfg.region: self.nats_url, **cfg.region_nats_urls}
        # region -> where its gateway (and the whole API) answers; home at the root.
        self.region_urls = {region: self.url + region_route_prefix(cfg, region).rstrip("/")
                            for region in self.region_nats_urls}
        try:
            self.migrations_applied = asyncio.run(_migrate(self.postgres_url))
            self.secrets = load_or_create_secrets(cfg.state_dir)
            self._start_ray()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_ray(self) -> None:
        ray_env(self.config)
        import ray
        from ray import serve

        from dailydoco.actors.refs import SUPERVISOR_NAME
        from dailydoco.actors.supervisor import SupervisorActor, live_cpu_nodes
        from dailydoco.serve.deployment import EngineIngress, LiveIngress

        cfg = self.config
        if not ray.is_initialized():
            local = {"_node_ip_address": "127.0.0.1"} if cfg.ray_address is None else {}
            # "local": a new cluster even when another one runs on this machine
            # (ray.init would otherwise attach to it and replace its Serve app).
            ray.init(address=cfg.ray_address or "local", namespace=cfg.namespace, include_dashboard=False,
                     log_to_driver=False, configure_logging=False, **local)
            self._ray_started_here = cfg.ray_address is None
        self.supervisor = SupervisorActor.options(
            name=SUPERVISOR_NAME, namespace=cfg.namespace, lifetime="detached", get_if_exists=True
        ).remote(cfg, self.postgres_url, self.nats_url, self.redis_url)
        ray.get(self.supervisor.start.remote())
        serve.start(http_options={"host": cfg.http_host, "port": cfg.http_port})
        # Two Serve applications per region, each with its own replicas on its
        # region's NATS: the API, and the live gateway at LIVE_PATH. A client
        # connects to the gateway of its region, and the events (published in
        # the home region) reach it through the NATS gateways. Every region
        # serves the whole API. All start together: their replicas come up at once.
        logging_config = _replica_logging(cfg)
        # The API replicas spread over the nodes, as the supervisor deals its
        # actors, so that a lost host leaves the others' replicas serving: Ray
        # places a replica that asks for no CPU on a node at random. One a lost
        # node held is made again where a node has room for it; with as many
        # replicas as nodes, once the node is back or another joins.
        api_replicas_per_node = math.ceil(cfg.serve_replicas / max(1, len(live_cpu_nodes())))
        targets = []
        for region, nats_url in self.region_nats_urls.items():
            args = (msgspec.structs.replace(cfg, region=region), self.postgres_url, self.redis_url, nats_url,
                    self.secrets)
            targets += [
                serve.RunTarget(EngineIngress.options(num_replicas=cfg.serve_replicas,
                                                      max_replicas_per_node=api_replicas_per_node).bind(*args),
                                name=serve_app_name(cfg, region), route_prefix=region_route_prefix(cfg, region),
                                logging_config=logging_config),
                serve.RunTarget(LiveIngress.options(num_replicas=cfg.live_replicas).bind(*args),
                                name=live_app_name(cfg, region), route_prefix=live_route_prefix(cfg, region),
                                logging_config=logging_config),
            ]
        serve.run_many(targets)

    def stop(self) -> None:
        try:
            self._stop_ray()
        finally:
            self.servers.stop()

    def _stop_ray(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        if self._ray_started_here:
            # Shutting the local cluster down ends every actor at once; Serve's
            # own graceful shutdown would wait 30 s for nothing. Only HAProxy,
            # a grandchild, outlives it.
            ray.shutdown()
            _reap_haproxy(self.config)
            return
        from ray import serve

        from dailydoco.actors.refs import RELAY_NAME, SUPERVISOR_NAME, chain_actor_name, shard_actor_name

        for region in self.region_nats_urls:
            serve.delete(serve_app_name(self.config, region))
            serve.delete(live_app_name(self.config, region))
        names = [SUPERVISOR_NAME, RELAY_NAME] + [shard_actor_name(i) for i in range(self.config.shard_actors)] + [
            chain_actor_name(i) for i in range(self.config.chain_actors)]
        for name in names:
            try:
                ray.kill(ray.get_actor(name, namespace=self.config.namespace), no_restart=True)
            except ValueError:
                pass

    def __enter__(self) -> "EngineSystem":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
