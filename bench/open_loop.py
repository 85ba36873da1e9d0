"""A lean open-loop HTTP/1.1 load generator on asyncio streams.

Requests leave at fixed times whatever the server does; each latency is
measured from the request's scheduled time, so queueing in the server (or in
this client) is counted, not hidden (no coordinated omission). Raw streams
instead of an HTTP library keep the client's own CPU small on a 2-core box
that it shares with the server.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Callable

WARMUP_S = 2.0
# A request still unanswered after this counts as failed: keeps a collapsing
# server from stretching the run, and shows up in the errors, not the percentiles.
REQUEST_TIMEOUT_S = 10.0


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    async def exchange(self, raw_request: bytes) -> int:
        self.writer.write(raw_request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length:
            await self.reader.readexactly(length)
        return status


def build_request(host: str, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"] + [f"{k}: {v}" for k, v in headers.items()]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def open_loop(host: str, port: int, rate_per_s: int, duration_s: float,
                    make_request: Callable[[int], bytes], warmup_s: float = WARMUP_S) -> dict:
    loop = asyncio.get_running_loop()
    idle: list[_Connection] = []
    latencies: list[float] = []
    statuses: collections.Counter = collections.Counter()
    opened = 0

    async def one(i: int, scheduled: float, record: bool) -> None:
        nonlocal opened
        conn = idle.pop() if idle else None
        try:
            # The timeout covers connecting too: an overloaded server's full
            # accept queue holds a connect for minutes (the kernel's SYN retries).
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                if conn is None:
                    opened += 1
                    conn = _Connection(*await asyncio.open_connection(host, port))
                status = await conn.exchange(make_request(i))
        except TimeoutError:  # ours, or the kernel giving up a connect (ETIMEDOUT): before OSError, its base
            statuses["timeout"] += 1
            if conn is not None:
                conn.writer.close()
            return
        except (OSError, asyncio.IncompleteReadError):  # refused or cut: a failed request, not a crash
            statuses["connection-error"] += 1
            if conn is not None:
                conn.writer.close()
            return
        idle.append(conn)
        if record:
            statuses[status] += 1
            latencies.append(loop.time() - scheduled)

    total = max(1, int(rate_per_s * (duration_s + warmup_s)))
    warmup = int(rate_per_s * warmup_s)
    start = loop.time() + 0.05
    async with asyncio.TaskGroup() as group:
        for i in range(total):
            scheduled = start + i / rate_per_s
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            group.create_task(one(i, scheduled, i >= warmup))
    for conn in idle:
        conn.writer.close()
    ms = sorted(1000 * x for x in latencies)

    def pct(q: float) -> float:
        return ms[min(len(ms) - 1, int(q * len(ms)))] if ms else float("nan")

    ok = sum(n for s, n in statuses.items() if isinstance(s, int) and s < 300)
    return {"rate_per_s": rate_per_s, "requests": len(ms), "ok": ok,
            "errors": {str(s): n for s, n in statuses.items() if not (isinstance(s, int) and s < 300)},
            "connections": opened, "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99)}
