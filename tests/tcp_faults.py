"""A TCP proxy that holds what clients send, for faults a server alone cannot make.

A request can reach a server long after its client gave up on it: the
server was stalled (a fork, a slow command, a paused VM), or the network
held the packets. Meanwhile the client has moved on, on a new connection,
and its later requests are served first. `HoldingProxy` makes that
reordering on demand: `hold()` buffers everything the connections open at
that moment send from then on, while connections opened later pass through;
`release()` delivers what was held, even for a client that has hung up.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse

RELEASE_ANSWER_WAIT_S = 5.0  # how long `release` waits for the server to answer what it delivered


class _Link:
    """One client connection and its own connection to the server."""

    def __init__(self, server_writer: asyncio.StreamWriter):
        self.server_writer = server_writer
        self.held = False
        self.buffer = bytearray()
        self.released = asyncio.Event()
        self.answered = asyncio.Event()


class HoldingProxy:
    def __init__(self, url: str):
        """`url`: the server to forward to; `self.url` (after start) reaches it through the proxy."""
        self._parts = urllib.parse.urlsplit(url)
        self.url: str | None = None
        self._links: set[_Link] = set()
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        credentials = self._parts.netloc.rpartition("@")[0]
        self.url = urllib.parse.urlunsplit(self._parts._replace(
            netloc=f"{credentials}@127.0.0.1:{port}" if credentials else f"127.0.0.1:{port}"))
        return self.url

    async def close(self) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def __aenter__(self) -> "HoldingProxy":
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        """Deliver what is still held (so each connection's handler can end), then close."""
        with contextlib.suppress(asyncio.TimeoutError):
            await self.release()
        await self.close()

    def hold(self) -> None:
        """Buffer, from now on, what every connection open now sends."""
        for link in self._links:
            link.held = True

    async def release(self) -> int:
        """Deliver what was held; return once the server answered each
        connection that had sent something. Returns how many had."""
        delivered = []
        for link in [link for link in self._links if link.held]:
            link.held = False
            if link.buffer:
                link.answered.clear()
                link.server_writer.write(bytes(link.buffer))
                link.buffer.clear()
                delivered.append(link)
            link.released.set()
        await asyncio.wait_for(asyncio.gather(*(link.answered.wait() for link in delivered)), RELEASE_ANSWER_WAIT_S)
        return len(delivered)

    async def _connection(self, client_reader, client_writer) -> None:
        server_reader, server_writer = await asyncio.open_connection(self._parts.hostname, self._parts.port)
        link = _Link(server_writer)
        self._links.add(link)
        answers = asyncio.create_task(self._server_to_client(server_reader, client_writer, link))
        try:
            await self._client_to_server(client_reader, link)
            # A client that hung up while held: its requests still reach the
            # server (release), and the connection stays until it answered.
            if link.released.is_set():
                await asyncio.wait_for(link.answered.wait(), RELEASE_ANSWER_WAIT_S)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            self._links.discard(link)
            answers.cancel()
            await asyncio.gather(answers, return_exceptions=True)
            for writer in (client_writer, server_writer):
                writer.close()

    async def _client_to_server(self, reader: asyncio.StreamReader, link: _Link) -> None:
        while data := await reader.read(65536):
            if link.held:
                link.buffer += data
            else:
                link.server_writer.write(data)
                await link.server_writer.drain()
        if link.held:
            await link.released.wait()

    async def _server_to_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                link: _Link) -> None:
        while data := await reader.read(65536):
            link.answered.set()
            if not writer.is_closing():
                writer.write(data)
