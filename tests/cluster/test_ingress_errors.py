"""How the HAProxy ingress fails, the real HAProxy started through the
wrapper the engine gives Ray: its own answers are problem+json 503s, over
Ray's plain-text page, and a replica it marks down keeps no request."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil

from dailydoco.cluster.embedded import free_port
from dailydoco.cluster.ingress_errors import (
    CUT_HELD_REQUESTS_WHEN_DOWN,
    LOOPBACK,
    RAY_ERROR_PAGE,
    install_wrapper,
    real_haproxy_binary,
)
from dailydoco.cluster.system import _haproxy_dir, haproxy_processes

RAY_PAGE = (b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nContent-Length: 21\r\n\r\n"
            b"Internal Server Error")
HAPROXY_START_WAIT_S = 10.0
CONFIG_COMPLETED_WITHIN_S = 5.0


def _listening(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex((host, port)) == 0


@contextlib.contextmanager
def _haproxy(tmp_path: Path, port: int, config_body: str) -> Iterator[None]:
    """The real HAProxy through the wrapper, on a config laid out as Ray lays
    it out (in a folder of its own, beside Ray's plain-text page), once it
    listens on `port`."""
    ray_dir = tmp_path / "0123abcd"
    ray_dir.mkdir()
    (ray_dir / RAY_ERROR_PAGE).write_bytes(RAY_PAGE)  # as Ray leaves it when Serve starts
    config = ray_dir / "haproxy.cfg"
    # The directives Ray's template puts in `defaults`.
    config.write_text(f"""
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    errorfile 502 {ray_dir / RAY_ERROR_PAGE}
    errorfile 503 {ray_dir / RAY_ERROR_PAGE}
    errorfile 504 {ray_dir / RAY_ERROR_PAGE}
frontend api
    bind 127.0.0.1:{port}
    default_backend replicas
{config_body}""")
    wrapper = install_wrapper(tmp_path, real_haproxy_binary())
    haproxy = subprocess.Popen([str(wrapper), "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + HAPROXY_START_WAIT_S
        while not _listening(port):
            assert haproxy.poll() is None, haproxy.stderr.read().decode()
            assert time.monotonic() < deadline, "HAProxy did not start listening"
            time.sleep(0.05)
        yield
    finally:
        haproxy.terminate()
        haproxy.wait(timeout=10)


def test_an_ingress_with_no_replica_answers_503_problem_json(tmp_path):
    port, no_replica = free_port(), free_port()
    with _haproxy(tmp_path, port, f"""
backend replicas
    timeout server 5s
    server replica 127.0.0.1:{no_replica}
"""):
        response = httpx.post(f"http://127.0.0.1:{port}/v1/transactions", json={})
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "1"
    problem = response.json()
    assert problem["status"] == 503 and "retry with the same body is safe" in problem["detail"]


# Another address of the loopback interface: reached by a socket bound to
# every interface, not by one bound to 127.0.0.1.
OTHER_LOOPBACK_ADDRESS = "127.0.0.2"


def test_the_stats_page_and_the_exporter_listen_on_loopback_only(tmp_path):
    """Ray's template binds them to every interface of the node, whatever
    host the API binds; the wrapper binds them to 127.0.0.1."""
    port, stats_port, metrics_port, no_replica = free_port(), free_port(), free_port(), free_port()
    with socket.socket() as every_interface:  # the check below can tell the two apart here
        every_interface.bind(("0.0.0.0", 0))
        every_interface.listen(1)
        assert _listening(every_interface.getsockname()[1], OTHER_LOOPBACK_ADDRESS)
    # The two sections as Ray's template writes them.
    with _haproxy(tmp_path, port, f"""
backend replicas
    server replica 127.0.0.1:{no_replica}
frontend prometheus
    bind :{metrics_port}
    mode http
    http-request use-service prometheus-exporter if {{ path /metrics }}
    no log
listen stats
  bind *:{stats_port}
  stats enable
  stats uri /stats
"""):
        assert httpx.get(f"http://{LOOPBACK}:{stats_port}/stats").status_code == 200
        assert httpx.get(f"http://{LOOPBACK}:{metrics_port}/metrics").status_code == 200
        assert not _listening(stats_port, OTHER_LOOPBACK_ADDRESS)
        assert not _listening(metrics_port, OTHER_LOOPBACK_ADDRESS)


# Health checks as Ray's template writes them, faster: the replica is marked
# down after two checks of CHECK_INTERVAL_S unanswered.
CHECK_INTERVAL_S = 1.0
HELD_REQUEST_TIMEOUT_S = 15.0


def test_a_replica_marked_down_keeps_no_request(tmp_path):
    """A replica that stops answering (here a socket whose process never
    reads it: the kernel still accepts connections, as for a stopped
    process) holds the request HAProxy gave it. With no server timeout, as
    in Ray's template, that request would wait for ever; once the health
    checks mark the replica down, it is cut, and the client can retry."""
    port = free_port()
    with socket.socket() as stopped_replica:
        stopped_replica.bind(("127.0.0.1", 0))
        stopped_replica.listen(16)
        with _haproxy(tmp_path, port, f"""
backend replicas
    option httpchk GET /-/healthz
    http-check expect status 200
    default-server fastinter 100ms downinter 100ms fall 2 rise 2 inter {int(CHECK_INTERVAL_S * 1000)}ms check
    server replica 127.0.0.1:{stopped_replica.getsockname()[1]} check
"""):
            started = time.monotonic()
            try:
                answer = httpx.post(f"http://127.0.0.1:{port}/v1/transactions", json={},
                                    timeout=HELD_REQUEST_TIMEOUT_S).status_code
            except httpx.RemoteProtocolError:  # cut before any answer: the client retries it as a 503
                answer = "cut"
            held_s = time.monotonic() - started
    assert answer in (503, "cut"), answer
    # It reached the replica (not refused at once, the replica already down)
    # and was cut by the health checks' verdict, not by the client's timeout.
    assert CHECK_INTERVAL_S / 2 < held_s < HELD_REQUEST_TIMEOUT_S / 2, held_s


def _config_as_started(config: str) -> list[str]:
    """The config's lines once the wrapper has added its line. Ray writes the
    file anew before each reload of HAProxy, and the wrapper adds the line
    as it starts the new one: a read between the two (a reload of the
    session's engine, seen once in CI's second pass) finds the file without
    it, or half written. One the wrapper never completes fails the test."""
    until = time.monotonic() + CONFIG_COMPLETED_WITHIN_S
    while True:
        lines = open(config).read().splitlines()
        if any(line.strip() == CUT_HELD_REQUESTS_WHEN_DOWN for line in lines) or time.monotonic() > until:
            return lines
        time.sleep(0.1)


def test_the_engines_haproxy_runs_with_our_page_and_cuts_what_a_down_replica_holds(engine):
    """The page each running HAProxy of the engine's names in its config is
    ours, its config has the wrapper's line in `defaults`, and it listens on
    loopback alone (the engine's API binds 127.0.0.1 here)."""
    haproxy_dir = str(_haproxy_dir(engine.config))
    configs, listening = set(), set()
    for process in haproxy_processes(haproxy_dir):
        cmdline = process.info["cmdline"]
        if "-f" in cmdline and haproxy_dir in cmdline[cmdline.index("-f") + 1]:
            configs.add(cmdline[cmdline.index("-f") + 1])
            # An old HAProxy that still drains after a reload has handed its
            # listeners to the new one, and may exit meanwhile: only the
            # union is sure to hold some.
            with contextlib.suppress(psutil.NoSuchProcess):
                listening |= {c.laddr for c in process.net_connections(kind="inet") if c.status == "LISTEN"}
    assert configs, f"no HAProxy runs with a config under {haproxy_dir}"
    assert listening and {address.ip for address in listening} == {LOOPBACK}, listening
    for config in configs:
        lines = _config_as_started(config)
        assert lines[lines.index("defaults") + 1].strip() == CUT_HELD_REQUESTS_WHEN_DOWN, config
        assert sum(line.strip() == CUT_HELD_REQUESTS_WHEN_DOWN for line in lines) == 1, config
        pages = {line.split()[2] for line in open(config) if line.split()[:1] == ["errorfile"]}
        assert pages, config
        for page in pages:
            with open(page, "rb") as served:
                assert served.read().startswith(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/problem+json"), page


def test_a_second_start_in_one_process_still_runs_the_real_haproxy(tmp_path, monkeypatch):
    """`ray_env` installs the wrapper at each start, and the first leaves the
    variable naming it: the second must not make it a wrapper of itself."""
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    first = install_wrapper(tmp_path, real_haproxy_binary())
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(first))
    second = install_wrapper(tmp_path, real_haproxy_binary())
    assert second == first
    version = subprocess.run([str(second), "-v"], capture_output=True, text=True, timeout=10)
    assert version.returncode == 0 and "HAProxy version" in version.stdout, version
