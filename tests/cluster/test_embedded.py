"""The embedded servers: `watch()` starts again, with its data, a server that
dies under a running engine, and leaves alone what `kill` and `stop` stopped;
one launcher at a time runs servers on a state directory."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import socket
import time

import asyncpg
import nats
import nats.js.errors
import psutil
import pytest
import redis

from dailydoco.cluster import embedded
from dailydoco.cluster.config import DEFAULT_REGIONS
from dailydoco.cluster.embedded import EmbeddedServers
from dailydoco.cluster.nats_io import PINGS_OUTSTANDING_MAX, SILENT_LINK_FOUND_S

BACK_WITHIN_S = 60  # a Postgres killed outright can take a few tries: its orphans hold its shared memory
KEPT_STREAM = "KEPT"
PINGS_SLACK_S = 5.0  # the server's first ping may come up to an interval late


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait_for(what: str, check) -> None:
    deadline = time.monotonic() + BACK_WITHIN_S
    while not check():
        assert time.monotonic() < deadline, f"{what} within {BACK_WITHIN_S} s"
        time.sleep(0.2)


async def _postgres_rows(url: str, write: bool) -> list[int]:
    conn = await asyncpg.connect(url)
    try:
        if write:
            await conn.execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (1), (2)")
        return [row["v"] for row in await conn.fetch("SELECT v FROM kept ORDER BY v")]
    finally:
        await conn.close()


async def _postgres_answers(url: str) -> bool:
    try:
        conn = await asyncpg.connect(url, timeout=2)
    except (OSError, asyncio.TimeoutError, asyncpg.CannotConnectNowError):
        return False
    await conn.close()
    return True


async def _stream_messages(url: str, write: bool) -> int:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + BACK_WITHIN_S
        while True:
            # Regions joined by gateways elect their JetStream leader some seconds after they start.
            try:
                if write:
                    await js.add_stream(name=KEPT_STREAM, subjects=["kept"])
                    await js.publish("kept", b"1")
                return (await js.stream_info(KEPT_STREAM)).state.messages
            except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
                assert time.monotonic() < deadline, f"JetStream answers within {BACK_WITHIN_S} s"
                await asyncio.sleep(0.5)
    finally:
        await nc.close()


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _is_new_and_answering(servers: EmbeddedServers, name: str, old_pid: int, port: int, region=None):
    def check() -> bool:
        try:
            pid = servers.nats_pid(region) if region else servers.pid(name)
        except LookupError:
            return False
        return pid != old_pid and _answers(port)
    return check


def test_a_server_that_dies_is_started_again_with_its_data_and_a_stopped_one_is_not(tmp_path):
    """Also: a second launcher on the same state directory is refused."""
    home, other = DEFAULT_REGIONS[:2]
    servers = EmbeddedServers(tmp_path)
    postgres_url, nats_url, redis_url = servers.resolve(None, None, None, (home, other))
    try:
        ports = {"postgres": servers.ports["postgres"], "redis": servers.ports["redis"],
                 "nats": servers.ports["nats-regions"][home]["client"]}
        assert asyncio.run(_postgres_rows(postgres_url, write=True)) == [1, 2]
        assert asyncio.run(_stream_messages(nats_url, write=True)) == 1
        cache = redis.Redis.from_url(redis_url)
        cache.config_set("appendfsync", "always")  # what a SIGKILL leaves on disk is all of it
        cache.set("kept", "1")
        postmaster = servers.pid("postgres")
        # A second launcher on the same state directory starts nothing, and stops nothing of the first's.
        with pytest.raises(RuntimeError, match=f"another dailydoco \\(pid {os.getpid()}\\)"):
            EmbeddedServers(tmp_path).resolve(None, None, None)
        assert servers.pid("postgres") == postmaster
        servers.watch()

        pids = {"postgres": servers.pid("postgres"), "redis": servers.pid("redis"), "nats": servers.nats_pid(home)}
        for pid in pids.values():
            os.kill(pid, signal.SIGKILL)
        _wait_for("Redis is back", _is_new_and_answering(servers, "redis", pids["redis"], ports["redis"]))
        _wait_for("NATS is back", _is_new_and_answering(servers, "nats", pids["nats"], ports["nats"], home))
        _wait_for("Postgres is back", _is_new_and_answering(servers, "postgres", pids["postgres"],
                                                            ports["postgres"]))
        # Its port answers from the start of each try; its queries, once the WAL is replayed.
        _wait_for("Postgres recovered", lambda: asyncio.run(_postgres_answers(postgres_url)))
        assert asyncio.run(_postgres_rows(postgres_url, write=False)) == [1, 2]
        assert asyncio.run(_stream_messages(nats_url, write=False)) == 1
        assert cache.get("kept") == b"1"

        # An outage a test makes on purpose lasts until it revives the server.
        servers.kill("redis")
        time.sleep(3)
        assert not _answers(ports["redis"])
        servers.revive("redis")
        assert cache.get("kept") == b"1"
        running = [servers.pid("postgres"), servers.pid("redis"), servers.nats_pid(home), servers.nats_pid(other)]
    finally:
        servers.stop()
    # `stop` stops the watch before the servers: nothing comes back.
    time.sleep(2)
    assert not [pid for pid in running if _running(pid)]
    assert not [name for name, port in ports.items() if _answers(port)]
    with open(tmp_path / "launcher.lock") as lock:  # and leaves the state directory to the next launcher
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_pid_says_when_no_postgres_runs(tmp_path):
    with pytest.raises(LookupError):
        EmbeddedServers(tmp_path).pid("postgres")


def test_free_ports_lie_outside_the_ephemeral_range_and_a_taken_one_is_not_given():
    ephemeral_min = embedded._ephemeral_port_min()
    if ephemeral_min <= embedded.ASSIGNED_PORT_MIN:
        pytest.skip(f"this kernel's ephemeral range starts at {ephemeral_min}: no room below it")
    ports = {embedded.free_port() for _ in range(50)}
    assert all(embedded.ASSIGNED_PORT_MIN <= port < ephemeral_min for port in ports), sorted(ports)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", ports.pop()))
        listening.listen()
        taken = listening.getsockname()[1]
        assert embedded.free_port(preferred=taken) != taken


def test_the_embedded_nats_drops_a_client_that_stops_answering_its_pings(tmp_path):
    """A client gone silent without closing (its machine lost power, a NAT
    dropped the link) is dropped within the engine's own bound, and its
    subscriptions with it; nats-server's default took up to 6 minutes."""
    servers = EmbeddedServers(tmp_path)
    try:
        [url] = servers.start_nats(DEFAULT_REGIONS[:1]).values()
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5) as silent:
            silent.recv(4096)  # INFO
            silent.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nSUB silent.client 1\r\n')
            silent.settimeout(SILENT_LINK_FOUND_S + PINGS_SLACK_S)
            connected_at, heard = time.monotonic(), b""
            while chunk := silent.recv(4096):  # PINGs, never answered; then the server hangs up
                heard += chunk
            dropped_after_s = time.monotonic() - connected_at
        assert b"Stale Connection" in heard
        assert heard.count(b"PING") >= PINGS_OUTSTANDING_MAX
        assert dropped_after_s <= SILENT_LINK_FOUND_S + PINGS_SLACK_S
    finally:
        servers.stop()
