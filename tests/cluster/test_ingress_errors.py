"""HAProxy's own answers are problem+json 503s: the real HAProxy, started
through the wrapper the engine gives Ray, over Ray's plain-text page."""

from __future__ import annotations

import socket
import subprocess
import time

import httpx

from dailydoco.cluster.embedded import free_port
from dailydoco.cluster.ingress_errors import RAY_ERROR_PAGE, install_wrapper, real_haproxy_binary
from dailydoco.cluster.system import _haproxy_dir, haproxy_processes

RAY_PAGE = (b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nContent-Length: 21\r\n\r\n"
            b"Internal Server Error")
HAPROXY_START_WAIT_S = 10.0


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_an_ingress_with_no_replica_answers_503_problem_json(tmp_path):
    ray_dir = tmp_path / "0123abcd"  # Ray writes its files in a folder of its own, below the one it is given
    ray_dir.mkdir()
    (ray_dir / RAY_ERROR_PAGE).write_bytes(RAY_PAGE)  # as Ray leaves it when Serve starts
    port, no_replica = free_port(), free_port()
    config = ray_dir / "haproxy.cfg"
    # The directives Ray's template puts in `defaults`, and a backend whose one
    # server refuses connections.
    config.write_text(f"""
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
    errorfile 502 {ray_dir / RAY_ERROR_PAGE}
    errorfile 503 {ray_dir / RAY_ERROR_PAGE}
    errorfile 504 {ray_dir / RAY_ERROR_PAGE}
frontend api
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    server replica 127.0.0.1:{no_replica}
""")
    wrapper = install_wrapper(tmp_path, real_haproxy_binary())
    haproxy = subprocess.Popen([str(wrapper), "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + HAPROXY_START_WAIT_S
        while not _listening(port):
            assert haproxy.poll() is None, haproxy.stderr.read().decode()
            assert time.monotonic() < deadline, "HAProxy did not start listening"
            time.sleep(0.05)
        response = httpx.post(f"http://127.0.0.1:{port}/v1/transactions", json={})
    finally:
        haproxy.terminate()
        haproxy.wait(timeout=10)
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "1"
    problem = response.json()
    assert problem["status"] == 503 and "retry with the same body is safe" in problem["detail"]


def test_the_engines_haproxy_has_read_the_problem_page(engine):
    """The page each running HAProxy of the engine's names in its config is ours."""
    haproxy_dir = str(_haproxy_dir(engine.config))
    configs = set()
    for process in haproxy_processes(haproxy_dir):
        cmdline = process.info["cmdline"]
        if "-f" in cmdline and haproxy_dir in cmdline[cmdline.index("-f") + 1]:
            configs.add(cmdline[cmdline.index("-f") + 1])
    assert configs, f"no HAProxy runs with a config under {haproxy_dir}"
    for config in configs:
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
