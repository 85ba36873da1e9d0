"""NATS regions: one nats-server (a cluster of one) per region, joined by gateways.

`nats_region_configs` writes the configuration for N regions; `NatsRegions`
starts them on free loopback ports, and restarts one on demand (tests). With
JetStream on, the regions form one super-cluster: a stream lives in the
region that created it, and is read from every region through the gateways.
Gateways forward a subject to another region only while a subscriber there
wants it, so per-user subjects cost nothing where a user is not connected.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from .config import REGION_PATTERN
from .embedded import NATS_SERVER_PINGS, _nats_server_bin, _wait_for_port, free_port

REGION_STOP_TIMEOUT_S = 10


def nats_region_configs(regions: list[str], ports: dict[str, dict[str, int]], store_dir: Path) -> dict[str, str]:
    """The nats-server configuration of each region: client, cluster and gateway listeners."""
    for region in regions:
        if not REGION_PATTERN.fullmatch(region):
            raise ValueError(f"region {region!r} must match {REGION_PATTERN.pattern}")
    gateways = ", ".join(
        f'{{name: "{r}", urls: ["nats://127.0.0.1:{ports[r]["gateway"]}"]}}' for r in regions)
    configs = {}
    for region in regions:
        p = ports[region]
        configs[region] = f"""\
server_name: "{region}"
listen: "127.0.0.1:{p["client"]}"
jetstream {{
    store_dir: "{store_dir / region}"
}}
# JetStream across gateways needs each region to be a cluster with routes;
# a one-node region routes to itself (the server recognises and skips it).
cluster {{
    name: "{region}"
    listen: "127.0.0.1:{p["cluster"]}"
    routes: ["nats://127.0.0.1:{p["cluster"]}"]
}}
gateway {{
    name: "{region}"
    listen: "127.0.0.1:{p["gateway"]}"
    gateways: [{gateways}]
}}
{NATS_SERVER_PINGS}"""
    return configs


class NatsRegions:
    """`with NatsRegions(dir, ["us-east", "eu-west"]) as regions:` regions.url("eu-west")."""

    def __init__(self, state_dir: str | Path, regions: list[str],
                 preferred_ports: dict[str, dict[str, int]] | None = None):
        """`preferred_ports`: last start's `ports`, taken again where still free."""
        self.state_dir = Path(state_dir).resolve() / "nats-regions"
        self.regions = list(regions)
        preferred_ports = preferred_ports or {}
        self.ports = {r: {k: free_port(preferred_ports.get(r, {}).get(k)) for k in ("client", "cluster", "gateway")}
                      for r in self.regions}
        self._processes: dict[str, subprocess.Popen] = {}

    def url(self, region: str) -> str:
        return f"nats://127.0.0.1:{self.ports[region]['client']}"

    def pid(self, region: str) -> int:
        return self._processes[region].pid

    def start(self) -> "NatsRegions":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for region, text in nats_region_configs(self.regions, self.ports, self.state_dir).items():
            (self.state_dir / f"{region}.conf").write_text(text)
        for region in self.regions:
            self.start_region(region)
        return self

    def start_region(self, region: str) -> None:
        log = self.state_dir / f"{region}.log"
        with open(log, "ab") as out:
            process = subprocess.Popen([_nats_server_bin(), "-c", str(self.state_dir / f"{region}.conf")],
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._processes[region] = process
        _wait_for_port(self.ports[region]["client"], process, f"nats {region}", log)

    def exited(self) -> dict[str, int]:
        """region -> exit status, of each region's server that has exited unasked."""
        # A copy: the server watch calls this while tests kill and start regions.
        return {region: process.returncode for region, process in list(self._processes.items())
                if process.poll() is not None}

    def stop_region(self, region: str) -> None:
        process = self._processes.pop(region)
        process.terminate()
        try:
            process.wait(timeout=REGION_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()

    def kill_region(self, region: str) -> None:
        """As a crash would: SIGKILL."""
        process = self._processes.pop(region)
        process.kill()
        process.wait()

    def restart_region(self, region: str, down_s: float = 0.5) -> None:
        self.stop_region(region)
        time.sleep(down_s)
        self.start_region(region)

    def stop(self) -> None:
        for region in list(self._processes):
            self.stop_region(region)

    def __enter__(self) -> "NatsRegions":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
