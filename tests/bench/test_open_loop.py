"""The benchmark's open-loop load generator: what it counts, and that a
server which cannot be reached fails requests without stopping the run."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
import open_loop as generator  # noqa: E402

HOST = "127.0.0.1"


async def _serve_answering_after(delay_s: float):
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                await asyncio.sleep(delay_s)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except asyncio.IncompleteReadError:
            writer.close()

    return await asyncio.start_server(answer, HOST, 0)


def _health(i: int) -> bytes:
    return generator.build_request(HOST, "GET", "/healthz", {})


def test_latency_counts_from_the_scheduled_send():
    async def run():
        server = await _serve_answering_after(0.05)
        async with server:
            port = server.sockets[0].getsockname()[1]
            return await generator.open_loop(HOST, port, 100, 0.5, _health, warmup_s=0.1)

    summary = asyncio.run(run())
    assert summary["requests"] == summary["ok"] == 50 and summary["errors"] == {}
    assert 50 <= summary["p50_ms"] <= summary["p99_ms"]


def test_a_refused_connection_is_a_failed_request():
    with socket.socket() as unused:
        unused.bind((HOST, 0))
        port = unused.getsockname()[1]  # bound, not listening: connections are refused
        summary = asyncio.run(generator.open_loop(HOST, port, 50, 0.2, _health, warmup_s=0.0))
    assert summary["ok"] == 0 and summary["errors"] == {"connection-error": 10}


def test_a_connect_that_never_completes_times_out(monkeypatch):
    """A server whose accept queue is full drops new connections' SYNs: the
    kernel retries for minutes. Such a connect ends at the request timeout
    (before, it crashed the generator)."""
    monkeypatch.setattr(generator, "REQUEST_TIMEOUT_S", 0.5)
    with socket.socket() as server:
        server.bind((HOST, 0))
        server.listen(0)  # never accepted: the queue fills with the first connections
        port = server.getsockname()[1]
        fillers = []
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex((HOST, port))
            fillers.append(filler)
        try:
            summary = asyncio.run(generator.open_loop(HOST, port, 20, 0.2, _health, warmup_s=0.0))
        finally:
            for filler in fillers:
                filler.close()
    assert summary["ok"] == 0 and summary["errors"] == {"timeout": 4}
