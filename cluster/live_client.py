"""A live-updates client on anyio: the same code runs under asyncio and trio.

WebSocket framing is wsproto's (sans-IO), the live protocol is
protocol.live.LiveSession's (sans-IO); this module only moves bytes and
sleeps. Reconnects (with full-jitter backoff) and resumes by itself; a token
that expires is replaced by asking `token_provider` for a new one.
"""

from __future__ import annotations

from collections import deque
from typing import AsyncIterator, Awaitable, Callable, Literal
from urllib.parse import urlsplit

import anyio
from wsproto import ConnectionType, WSConnection
from wsproto.utilities import LocalProtocolError
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from dailydoco.protocol.live import (
    LIVE_PING_INTERVAL_S,
    LIVE_PONG_TIMEOUT_S,
    CloseCode,
    LiveProtocolError,
    LiveSession,
    Publication,
    StreamReset,
    VideoProgress,
)

RECEIVE_CHUNK_BYTES = 65_536
MESSAGE_BYTES_MAX = 1 << 20  # no server frame is near this; a bigger one is an attack or a bug
HANDSHAKE_TIMEOUT_S = 10.0
# Silence longer than a ping interval plus the pong timeout means the link is dead.
SILENCE_TIMEOUT_S = LIVE_PING_INTERVAL_S + LIVE_PONG_TIMEOUT_S


class ConnectionClosed(Exception):
    """The WebSocket ended: code is the close code, None when there was no close frame."""

    def __init__(self, code: int | None, reason: str = ""):
        super().__init__(f"connection closed ({code}): {reason}")
        self.code, self.reason = code, reason


class LiveStreamEnded(Exception):
    """The server refused this client for good (bad token, forbidden origin, bad frames)."""

    def __init__(self, code: int, reason: str):
        super().__init__(f"live stream ended ({code}): {reason}")
        self.code, self.reason = code, reason


class WebSocketConnection:
    """A client WebSocket over an anyio byte stream, framed by wsproto."""

    def __init__(self, stream: anyio.abc.ByteStream):
        self._stream = stream
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._parts: list[str | bytes] = []
        self._size = 0
        self._pending: deque = deque()  # events parsed but not yet consumed: one read may hold many

    @classmethod
    async def open(cls, url: str, origin: str | None = None) -> "WebSocketConnection":
        parts = urlsplit(url)
        if parts.scheme != "ws":
            raise ValueError(f"only ws:// URLs are supported (TLS ends in front of the gateway): {url!r}")
        port = parts.port or 80
        with anyio.fail_after(HANDSHAKE_TIMEOUT_S):
            stream = await anyio.connect_tcp(parts.hostname, port)
            self = cls(stream)
            headers = [(b"origin", origin.encode())] if origin else []
            await self._send(Request(host=f"{parts.hostname}:{port}", target=parts.path or "/", extra_headers=headers))
            while True:
                event = await self._next_event()
                if isinstance(event, AcceptConnection):
                    return self
                if isinstance(event, (RejectConnection, RejectData)):
                    await stream.aclose()
                    raise ConnectionClosed(None, f"handshake rejected ({getattr(event, 'status_code', '?')})")

    async def _send(self, event) -> None:
        await self._stream.send(self._ws.send(event))

    async def _next_event(self):
        while not self._pending:
            try:
                data = await self._stream.receive(RECEIVE_CHUNK_BYTES)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                raise ConnectionClosed(None, "connection lost") from exc
            self._ws.receive_data(data)
            self._pending.extend(self._ws.events())
        return self._pending.popleft()

    async def send(self, message: str | bytes) -> None:
        event = TextMessage(data=message) if isinstance(message, str) else BytesMessage(data=message)
        try:
            await self._send(event)
        except LocalProtocolError as exc:
            # The server closed first (say, right after the handshake): report its code.
            close = next((e for e in self._pending if isinstance(e, CloseConnection)), None)
            raise ConnectionClosed(close.code if close else None, close.reason or "" if close else "") from exc
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise ConnectionClosed(None, "connection lost") from exc

    async def receive(self) -> str | bytes:
        """The next whole message; raises ConnectionClosed."""
        while True:
            event = await self._next_event()
            if isinstance(event, (TextMessage, BytesMessage)):
                self._parts.append(event.data)
                self._size += len(event.data)
                if self._size > MESSAGE_BYTES_MAX:
                    await self.close(1009, "message too big")
                    raise ConnectionClosed(1009, "message too big")
                if event.message_finished:
                    parts, self._parts, self._size = self._parts, [], 0
                    return "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)
            elif isinstance(event, Ping):
                await self._send(event.response())
            elif isinstance(event, CloseConnection):
                try:
                    await self._send(event.response())
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    pass
                await self._stream.aclose()
                raise ConnectionClosed(event.code, event.reason or "")

    async def close(self, code: int = 1000, reason: str = "") -> None:
        try:
            await self._send(CloseConnection(code=code, reason=reason))
        except Exception:  # noqa: BLE001 - closing a socket that is already gone
            pass
        await self._stream.aclose()


class LiveClient:
    """One user's live stream: `async for item in client.events()` yields
    Publications in offset order, and a StreamReset whenever the stream could
    not be resumed (reload state over HTTP, then go on)."""

    def __init__(self, url: str, token_provider: Callable[[], Awaitable[str]], *,
                 encoding: Literal["json", "msgpack"] = "json", offset: int | None = None,
                 epoch: str | None = None, origin: str | None = None):
        self.url = url
        self.token_provider = token_provider
        self.origin = origin
        self.session = LiveSession("", encoding=encoding, offset=offset, epoch=epoch)
        self.connections = 0

    async def events(self) -> AsyncIterator[Publication | StreamReset | VideoProgress]:
        need_token = True
        while True:
            if need_token:
                self.session.token = await self.token_provider()
            code: int | None = None
            reason = ""
            ws: WebSocketConnection | None = None
            try:
                ws = await WebSocketConnection.open(self.url, self.origin)
                self.connections += 1
                await ws.send(self.session.connect_frame())
                while True:
                    message = await self._receive(ws)
                    outputs = self.session.receive(message)
                    for frame in self.session.data_to_send():
                        await ws.send(frame)
                    for output in outputs:
                        yield output
            except ConnectionClosed as closed:
                code, reason = closed.code, closed.reason
            except (LiveProtocolError, OSError, TimeoutError) as exc:
                reason = str(exc)
                if ws is not None:
                    await ws.close(1002 if isinstance(exc, LiveProtocolError) else 1000)
            except BaseException:
                if ws is not None:
                    await ws.close(1001, "client done")
                raise
            decision = self.session.connection_lost(code)
            if not decision.resume:
                raise LiveStreamEnded(code or 0, reason)
            need_token = code == CloseCode.TOKEN_EXPIRED
            await anyio.sleep(decision.delay_s)

    @staticmethod
    async def _receive(ws: WebSocketConnection) -> str | bytes:
        with anyio.fail_after(SILENCE_TIMEOUT_S):
            return await ws.receive()
