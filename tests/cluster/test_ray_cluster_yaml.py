"""ray_cluster.yaml is valid against the schema that ships in the Ray wheel."""

import json
import os
import pathlib
import subprocess
import sys

import jsonschema
import ray
import yaml

from dailydoco.cluster.ingress_errors import WRAPPER_NAME
from dailydoco.cluster.system import RAY_TELEMETRY_OFF, SERVE_SETTINGS

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_cluster_yaml_matches_rays_schema():
    schema = json.loads((pathlib.Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    setup = " ".join(config["setup_commands"]).split()
    installed_in = setup[setup.index("dailydoco.cluster.ingress_errors") + 1]
    assert config["provider"]["type"] == "local" and "available_node_types" not in config
    for commands in ("head_start_ray_commands", "worker_start_ray_commands"):
        started = " ".join(config[commands])
        assert "RAY_SERVE_ENABLE_HA_PROXY=1" in started and "RAY_SERVE_THROUGHPUT_OPTIMIZED=1" in started
        # The same Ray settings as the local Ray that `dailydoco up` starts.
        expected = RAY_TELEMETRY_OFF | SERVE_SETTINGS
        for name, value in expected.items():
            assert f"{name}={value}" in started.split(), (commands, name)
        # HAProxy through the wrapper that the setup commands install.
        wrapper = next(arg.split("=", 1)[1] for arg in started.split()
                       if arg.startswith("RAY_SERVE_HAPROXY_BINARY_PATH="))
        assert wrapper == f"{installed_in}/{WRAPPER_NAME}", commands
        # Every node authenticates with the one token: a worker left at
        # Ray's default could not join a head that has it on.
        assert "RAY_AUTH_MODE=token" in started.split(), commands
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # The head keeps Ray's control store in Redis, so that a replacement
    # head takes the cluster over (test_head_node_loss.py where it can run).
    head = " ".join(config["head_start_ray_commands"]).split()
    assert any(arg.startswith("RAY_REDIS_ADDRESS=") for arg in head)
    assert "RAY_external_storage_namespace=dailydoco" in head


def test_the_setup_command_installs_the_haproxy_wrapper(tmp_path):
    setup = " ".join(yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())["setup_commands"]).split()
    assert setup[setup.index("dailydoco.cluster.ingress_errors") - 1] == "-m"
    installed = subprocess.run([sys.executable, "-m", "dailydoco.cluster.ingress_errors", str(tmp_path / "haproxy")],
                               check=True, capture_output=True, text=True).stdout.strip()
    assert installed == str(tmp_path / "haproxy" / WRAPPER_NAME) and os.access(installed, os.X_OK)
