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
HOLD_PERIOD_S_DEFAULT = 30 * 24 * 3600  # commissions stay pending 30 days (refund window)


class EngineConfig(msgspec.Struct, frozen=True):
    state_dir: str
    postgres_url: str | None  # None: start embedded Postgres in state_dir
    nats_url: str | None
    redis_url: str | None
    ray_address: str | None  # None: start a local Ray
    http_host: str
    http_port: int
    shard_actors: int
    chain_actors: int
    serve_replicas: int
    hold_period_s: int
    clock_adjustable: bool  # lets POST /v1/admin/clock move engine time (tests, demos)
    haproxy: bool  # Serve's HAProxy ingress; False selects Serve's default Python proxy
    namespace: str
    region: str  # the NATS region this deployment publishes its live events in
    live_origins: tuple[str, ...]  # browser Origins allowed on the live WebSocket, besides the API's own
    video_dir: str = ""  # videos the API may analyse, and uploads; "" means <state_dir>/videos


def _flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return raw.strip().lower() in ("1", "true", "yes", "on")


def load_config(**overrides) -> EngineConfig:
    env = os.environ
    cores = os.cpu_count() or 2
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
        serve_replicas=int(env.get("DD_SERVE_REPLICAS", "1")),
        hold_period_s=int(env.get("DD_HOLD_PERIOD_S", str(HOLD_PERIOD_S_DEFAULT))),
        clock_adjustable=_flag("DD_CLOCK_ADJUSTABLE", False),
        haproxy=_flag("DD_HAPROXY", True),
        namespace=env.get("DD_RAY_NAMESPACE", "dailydoco"),
        region=env.get("DD_REGION", "us-east"),
        live_origins=tuple(o.strip() for o in env.get("DD_LIVE_ORIGINS", "").split(",") if o.strip()),
    )
    config = msgspec.structs.replace(config, **overrides) if overrides else config
    if not config.video_dir:
        config = msgspec.structs.replace(config, video_dir=env.get("DD_VIDEO_DIR") or str(Path(config.state_dir) / "videos"))
    if not REGION_PATTERN.fullmatch(config.region):
        raise ValueError(f"DD_REGION {config.region!r} must match {REGION_PATTERN.pattern} (it is a NATS subject token)")
    return config
