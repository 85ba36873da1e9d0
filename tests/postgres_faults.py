"""A TCP proxy in front of a real Postgres that loses one reply on demand.

It makes the fault no test against the server alone can: the database
executes (and commits) a statement, and the writer never hears of it,
because the connection is cut after the request reached the server and
before its reply came back. The proxy reads the wire protocol just far
enough to recognise the statement: asyncpg prepares a statement once per
connection (Parse, carrying its text) and then only binds it by name.
"""

from __future__ import annotations

import asyncio
import struct
import urllib.parse

SERVER_REPLY_WAIT_S = 10.0  # a doomed connection is cut once the server has answered, or after this


class ReplyLosingProxy:
    """Forwards every connection to `upstream`; `lose_reply_to(marker)` arms it
    to swallow the reply to the next execution of a statement whose text
    contains `marker`, then close both sides of that connection."""

    def __init__(self, url: str):
        """`url`: the Postgres to forward to; `self.url` (after start) reaches it through the proxy."""
        parts = urllib.parse.urlsplit(url)
        self.upstream = (parts.hostname, parts.port or 5432)
        self._url = parts
        self.url: str | None = None
        self._marker: bytes | None = None
        self.fired = asyncio.Event()
        self._server: asyncio.base_events.Server | None = None
        self._pumps: set[asyncio.Task] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        credentials = self._url.netloc.rpartition("@")[0]
        # Without TLS, which the proxy could not read.
        self.url = urllib.parse.urlunsplit(self._url._replace(
            netloc=f"{credentials}@127.0.0.1:{port}" if credentials else f"127.0.0.1:{port}",
            query="sslmode=disable"))
        return self.url

    def lose_reply_to(self, marker: str) -> None:
        self._marker = marker.encode()
        self.fired.clear()

    async def close(self) -> None:
        self._server.close()
        for task in self._pumps:
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _connection(self, client_reader, client_writer) -> None:
        server_reader, server_writer = await asyncio.open_connection(*self.upstream)
        doomed = asyncio.Event()
        pumps = [asyncio.create_task(self._client_to_server(client_reader, server_writer, doomed)),
                 asyncio.create_task(self._server_to_client(server_reader, client_writer, doomed))]
        self._pumps.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._pumps.difference_update(pumps)
            for writer in (client_writer, server_writer):
                writer.close()

    async def _client_to_server(self, reader, writer, doomed: asyncio.Event) -> None:
        statements: dict[bytes, bytes] = {}  # prepared statement name -> its text
        # The startup message has no type byte; every later one does.
        length = struct.unpack("!i", await reader.readexactly(4))[0]
        writer.write(struct.pack("!i", length) + await reader.readexactly(length - 4))
        while True:
            kind = await reader.readexactly(1)
            length = struct.unpack("!i", await reader.readexactly(4))[0]
            body = await reader.readexactly(length - 4)
            if kind == b"P":
                name, text = body.split(b"\0", 2)[:2]
                statements[name] = text
            elif self._marker is not None and not doomed.is_set():
                text = None
                if kind == b"B":
                    text = statements.get(body.split(b"\0", 2)[1], b"")
                elif kind == b"Q":
                    text = body
                if text is not None and self._marker in text:
                    self._marker = None
                    doomed.set()
                    self.fired.set()
            writer.write(kind + struct.pack("!i", length) + body)
            await writer.drain()

    async def _server_to_client(self, reader, writer, doomed: asyncio.Event) -> None:
        while True:
            try:
                kind = await asyncio.wait_for(reader.readexactly(1), SERVER_REPLY_WAIT_S if doomed.is_set() else None)
            except asyncio.TimeoutError:
                return
            length = struct.unpack("!i", await reader.readexactly(4))[0]
            body = await reader.readexactly(length - 4)
            if doomed.is_set():
                if kind == b"Z":  # ReadyForQuery: the server is done with the statement, and its transaction
                    return
                continue
            writer.write(kind + struct.pack("!i", length) + body)
            await writer.drain()
