"""The environment the engine gives the Ray it starts (cluster/system.py)."""

import json
import os
import subprocess
import sys

import pytest

from dailydoco.cluster.system import RAY_TELEMETRY_OFF
from tests.conftest import may_raise_priority

PROBE = """
import json, os
from dailydoco.cluster.config import load_config
from dailydoco.cluster.system import ray_env
ray_env(load_config(state_dir="/tmp/unused"))
print(json.dumps({k: v for k, v in os.environ.items() if k.startswith(("RAY_", "REPORTER_"))}))
"""


def _ray_env_of(**env) -> dict[str, str]:
    # In a child process: ray_env writes os.environ, which this session's Ray shares.
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "REPORTER_", "DD_"))}
    out = subprocess.run([sys.executable, "-c", PROBE], env=clean | env, check=True, capture_output=True, text=True,
                         timeout=60).stdout
    return json.loads(out.splitlines()[-1])


def test_ray_telemetry_is_off_by_default():
    env = _ray_env_of()
    assert {k: env.get(k) for k in RAY_TELEMETRY_OFF} == RAY_TELEMETRY_OFF


def test_an_operators_own_setting_is_kept():
    env = _ray_env_of(RAY_enable_metrics_collection="1", REPORTER_UPDATE_INTERVAL_MS="5000")
    assert env["RAY_enable_metrics_collection"] == "1" and env["REPORTER_UPDATE_INTERVAL_MS"] == "5000"
    assert env["RAY_task_events_report_interval_ms"] == "0"


def test_dd_ray_telemetry_leaves_rays_defaults():
    env = _ray_env_of(DD_RAY_TELEMETRY="1")
    assert not set(RAY_TELEMETRY_OFF) & set(env)


def test_the_engines_ray_workers_run_with_telemetry_off(engine):
    """What the setting is for: the processes Ray starts (the node agent,
    the actors' workers) inherit it from the process that started Ray."""
    import ray

    if engine.config.ray_telemetry:
        pytest.skip("DD_RAY_TELEMETRY=1 keeps Ray's telemetry on")

    @ray.remote(num_cpus=0)
    def worker_env() -> dict:
        return {k: os.environ.get(k) for k in RAY_TELEMETRY_OFF}

    assert ray.get(worker_env.remote(), timeout=60) == RAY_TELEMETRY_OFF


def test_the_live_gateway_runs_ahead_of_the_api_replicas(engine):
    """Each region's live replica raised its priority as it started, where the
    machine lets it (CAP_SYS_NICE); the API replicas keep the one Ray gave them."""
    import psutil

    from dailydoco.cluster.priority import LIVE_GATEWAY_NICENESS
    from dailydoco.cluster.system import live_app_name, serve_app_name

    def replica_niceness(app_name: str) -> int:
        title = f"ServeReplica:{app_name}:"
        found = {p.nice() for p in psutil.process_iter(["cmdline"]) if any(title in a for a in p.info["cmdline"] or ())}
        assert len(found) == 1, (app_name, found)
        return found.pop()

    for region in engine.region_nats_urls:  # the regions it started: only the home one on an external NATS
        live = replica_niceness(live_app_name(engine.config, region))
        api = replica_niceness(serve_app_name(engine.config, region))
        if may_raise_priority():
            assert (live, api > live) == (LIVE_GATEWAY_NICENESS, True), (region, live, api)
        else:
            assert live == api, (region, live, api)
