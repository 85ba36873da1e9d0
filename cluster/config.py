"""The environment, read once into a frozen Struct.

Every setting has a default that runs the whole system on one machine with
embedded servers; the DD_* variables point it at external ones instead.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import msgspec

REGION_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
DEFAULT_REGIONS = ("us-east", "eu-west")
HOLD_PERIOD_S_DEFAULT = 30 * 24 * 3600  # commissions stay pending 30 days (refund window)


class EngineConfig(msgspec.Struct, frozen=True):
    state_dir: str
    postgres_url: str | None  # None: start embedded Postgres in state_dir
    nats_url: str | None  # the home region's NATS; None: start embedded NATS, one server per region
    redis_url: str | None
    ray_address: str | None  # None: start a local Ray
    http_host: str
    http_port: int
    shard_actors: int
    chain_actors: int
    serve_replicas: int  # per region, for the HTTP API
    live_replicas: int  # per region, for the live gateway's sockets
    hold_period_s: int
    clock_adjustable: bool  # lets POST /v1/admin/clock move engine time (tests, demos)
    haproxy: bool  # Serve's HAProxy ingress; False selects Serve's default Python proxy
    # Serve's access-log line and HAProxy's metrics datagram, per request. Off by
    # default: at 1,000 requests/s they cost about 7 % of a core here (the
    # datagrams are parsed in Python by Serve's HAProxyManager), and the
    # replicas' /metrics already count and time every request by route.
    request_logs: bool
    # Ray's own telemetry (its workers' metrics, per-call task events, the
    # node agent's per-process stats), for Ray's dashboard and Grafana. Off by
    # default: the engine starts Ray without the dashboard, and the node agent
    # took half a core for about half a second every 10 s ingesting it, stalling
    # every request in flight (cluster/system.py).
    ray_telemetry: bool
    namespace: str
    region: str  # the home region: its NATS carries the live events this deployment publishes
    live_origins: tuple[str, ...]  # browser Origins allowed on the live WebSocket, besides the API's own
    video_dir: str = ""  # videos the API may analyse, and uploads; "" means <state_dir>/videos
    # The regions with a live gateway, the home one among them. Embedded NATS
    # runs one server per region, joined by gateways; with nats_url set, a
    # region other than home has a gateway where region_nats_urls names its NATS.
    regions: tuple[str, ...] = DEFAULT_REGIONS
    region_nats_urls: dict[str, str] = {}


def _flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return raw.strip().lower() in ("1", "true", "yes", "on")


def load_config(**overrides) -> EngineConfig:
    env = os.environ
    cores = os.cpu_count() or 2
    regions = _regions(env.get("DD_REGIONS", ",".join(DEFAULT_REGIONS)))
    config = EngineConfig(
        state_dir=env.get("DD_STATE_DIR", str(Path.cwd() / ".dailydoco")),
        postgres_url=env.get("DD_POSTGRES_URL") or None,
        nats_url=env.get("DD_NATS_URL") or None,
        redis_url=env.get("DD_REDIS_URL") or None,
        ray_address=env.get("DD_RAY_ADDRESS") or None,
        http_host=env.get("DD_HTTP_HOST", "127.0.0.1"),
        http_port=int(env.get("DD_HTTP_PORT", "8000")),
        # One shard per core and a chain per two: on small machines every extra
        # process a request touches costs more in switching than it adds.
        shard_actors=int(env.get("DD_SHARD_ACTORS", str(max(2, cores)))),
        chain_actors=int(env.get("DD_CHAIN_ACTORS", str(max(1, cores // 2)))),
        # A Serve replica handles its requests on one thread, and Serve's own
        # per-request work is most of a request's cost there: one replica
        # saturated its thread at 1,000 balance reads/s, two spread them over
        # both cores (README, Benchmark). The live sockets have their own
        # deployment, so their frames never wait behind requests.
        serve_replicas=int(env.get("DD_SERVE_REPLICAS", "2")),
        live_replicas=int(env.get("DD_LIVE_REPLICAS", "1")),
        hold_period_s=int(env.get("DD_HOLD_PERIOD_S", str(HOLD_PERIOD_S_DEFAULT))),
        clock_adjustable=_flag("DD_CLOCK_ADJUSTABLE", False),
        haproxy=_flag("DD_HAPROXY", True),
        request_logs=_flag("DD_REQUEST_LOGS", False),
        ray_telemetry=_flag("DD_RAY_TELEMETRY", False),
        namespace=env.get("DD_RAY_NAMESPACE", "dailydoco"),
        region=env.get("DD_REGION", regions[0]),
        live_origins=tuple(o.strip() for o in env.get("DD_LIVE_ORIGINS", "").split(",") if o.strip()),
        regions=regions,
        region_nats_urls=_region_urls(env.get("DD_REGION_NATS_URLS", "")),
    )
    config = msgspec.structs.replace(config, **overrides) if overrides else config
    if not config.video_dir:
        config = msgspec.structs.replace(config, video_dir=env.get("DD_VIDEO_DIR") or str(Path(config.state_dir) / "videos"))
    for region in (config.region, *config.regions, *config.region_nats_urls):
        if not REGION_PATTERN.fullmatch(region):
            raise ValueError(f"region {region!r} must match {REGION_PATTERN.pattern} (it is a NATS subject token)")
    if config.region not in config.regions:
        raise ValueError(f"DD_REGION {config.region!r} must be one of DD_REGIONS {','.join(config.regions)}")
    for region in config.region_nats_urls:
        if region not in config.regions or region == config.region:
            raise ValueError(f"DD_REGION_NATS_URLS names {region!r}, which is not one of DD_REGIONS "
                             f"{','.join(config.regions)} besides the home region (whose NATS is DD_NATS_URL)")
    return config


def regions_home_first(config: EngineConfig) -> tuple[str, ...]:
    return (config.region, *(r for r in config.regions if r != config.region))


def _regions(raw: str) -> tuple[str, ...]:
    regions = tuple(dict.fromkeys(r.strip() for r in raw.split(",") if r.strip()))
    if not regions:
        raise ValueError("DD_REGIONS names no region")
    return regions


def _region_urls(raw: str) -> dict[str, str]:
    """`eu-west=nats://host:4222,ap-south=nats://...`"""
    urls = {}
    for item in filter(None, (i.strip() for i in raw.split(","))):
        region, sep, url = item.partition("=")
        if not sep or not url.strip():
            raise ValueError(f"DD_REGION_NATS_URLS item {item!r} is not REGION=URL")
        urls[region.strip()] = url.strip()
    return urls
