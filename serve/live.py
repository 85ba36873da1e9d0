"""The live WebSocket gateway: each user's event stream from NATS to their sockets.

Guarantees, per connection:
- it carries one user's stream, chosen by the token in the first frame, never
  by anything else the client sends;
- publications go out in offset order with no gap and no duplicate: live NATS
  messages and JetStream history are merged by offset, a gap (a message lost
  across a NATS reconnect) is filled from history before anything after it
  is sent;
- a client resuming from (offset, epoch) gets exactly what it missed, or
  `recovered: false` when history no longer holds it;
- outbound bytes waiting for a slow client are capped; past the cap only
  that connection is closed (4009). Tokens are enforced until they expire.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import Callable

import asyncpg
import msgspec
import nats
from nats.js.errors import NotFoundError
from starlette.websockets import WebSocket, WebSocketState

from dailydoco.cluster import nats_interest
from dailydoco.protocol import Unauthorized
from dailydoco.protocol.live import (
    VIDEO_SUBJECT_ROOT,
    VideoProgress,
    video_subject,
    EVENT_STREAM_NAME,
    LIVE_AUTH_DEADLINE_S,
    LIVE_OUTBOUND_BYTES_MAX,
    LIVE_PING_INTERVAL_S,
    LIVE_PONG_TIMEOUT_S,
    CloseCode,
    Connect,
    Connected,
    EventBatch,
    Ping,
    Pong,
    decode_client_frame,
    decode_event_batch,
    encode_frame,
    user_subject_all_regions,
)
from dailydoco.storage.outbox import stream_epoch, stream_positions
from dailydoco.storage.pool import DATABASE_ERRORS, answered_within, connection_lost, out_of_resources

from .auth import TokenAuthority, TokenEnded

CLOSE_REASON_BYTES_MAX = 123  # RFC 6455: a close frame's reason fits in 123 bytes
# A gap is filled from history, read again and again: the message may still
# be in flight, or JetStream may be electing a leader after a restart.
GAP_FILL_DEADLINE_S = 20.0  # then the socket closes and the client resumes
GAP_FILL_BACKOFF_S = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5)
HISTORY_READ_TIMEOUT_S = 2.0
# A socket's reads of where its stream stands: a Postgres that does not
# answer closes it, saying so, before a client gives up on the handshake by
# itself (where it would learn nothing) and as NATS_WAIT_S does.
LIVE_DATABASE_ANSWER_WAIT_S = 3.0
# A socket opened while the replica (re)connects to NATS waits this long for
# it: longer than a start or a reconnect (RECONNECT_WAIT_S) takes, well inside
# the client's own connect timeout.
NATS_WAIT_S = 3.0
NATS_WAIT_POLL_S = 0.02

_video_progress_decoder = msgspec.msgpack.Decoder(VideoProgress)
log = logging.getLogger("dailydoco.live")


def _reason(text: str) -> str:
    return text.encode()[:CLOSE_REASON_BYTES_MAX].decode(errors="ignore")


class _Closed(Exception):
    def __init__(self, code: int, reason: str):
        self.code, self.reason = code, reason


class LiveConnection:
    """One authenticated socket: its outbound queue and its stream position."""

    # Slots: an instance dict costs ~1 KiB, and 10,000 sockets on one replica
    # must fit in 50 KiB each (bench/live_bench.py).
    __slots__ = ("gateway", "ws", "user_id", "issued_at", "expires_at", "encoding", "epoch", "sent_offset",
                 "waiting", "live_ready", "outbound", "outbound_bytes", "_writer_waiting", "closing", "last_pong",
                 "ping_sent_at", "_filling")

    def __init__(self, gateway: "LiveGateway", ws: WebSocket, user_id: str, encoding: str, epoch: str,
                 issued_at: dt.datetime, expires_at: dt.datetime):
        self.gateway = gateway
        self.ws = ws
        self.user_id = user_id
        self.issued_at = issued_at  # of its token: a revocation closes it when it covers this instant
        self.expires_at = expires_at
        self.encoding = encoding
        self.epoch = epoch
        self.sent_offset = 0  # the last offset queued for this client
        self.waiting: dict[int, EventBatch] = {}  # batches after a gap, by first offset
        self.live_ready = False  # history replayed: live batches may be sent
        # A list the writer takes whole, and a future made only while it
        # waits: an asyncio.Queue costs ~3 KiB a socket.
        self.outbound: list[bytes] = []
        self.outbound_bytes = 0
        self._writer_waiting: asyncio.Future | None = None
        self.closing: _Closed | None = None
        self.last_pong = time.monotonic()
        self.ping_sent_at: float | None = None
        self._filling = False

    # --- outbound ------------------------------------------------------------

    def send_frame(self, frame: msgspec.Struct) -> None:
        data = encode_frame(frame, self.encoding)
        if self.outbound_bytes + len(data) > LIVE_OUTBOUND_BYTES_MAX:
            self.close(CloseCode.SLOW_CONSUMER, f"outbound queue over {LIVE_OUTBOUND_BYTES_MAX} bytes; resume to go on")
            return
        self.outbound_bytes += len(data)
        self.outbound.append(data)
        self.wake_writer()

    def close(self, code: int, reason: str) -> None:
        if self.closing is None:
            self.closing = _Closed(code, _reason(reason))
            self.wake_writer()  # it stops, and the socket is closed with this code

    def wake_writer(self) -> None:
        if self._writer_waiting is not None and not self._writer_waiting.done():
            self._writer_waiting.set_result(None)

    async def write_loop(self, reader: asyncio.Task) -> None:
        """Send queued frames until the connection is closing or `reader` ended."""
        text = self.encoding == "json"
        while True:
            while not self.outbound and self.closing is None and not reader.done():
                self._writer_waiting = asyncio.get_running_loop().create_future()
                await self._writer_waiting
                self._writer_waiting = None
            if self.closing is not None or reader.done():
                return
            frames, self.outbound = self.outbound, []
            for data in frames:
                if self.closing is not None or reader.done():
                    return
                self.outbound_bytes -= len(data)
                if text:
                    await self.ws.send_text(data.decode())
                else:
                    await self.ws.send_bytes(data)

    # --- the stream ----------------------------------------------------------

    def offer(self, batch: EventBatch) -> None:
        """A batch from NATS or history: send what is next, hold what is early."""
        if batch.epoch != self.epoch or batch.last_offset <= self.sent_offset or self.closing is not None:
            return
        self.waiting[batch.first_offset] = batch
        if not self.live_ready:
            return
        self._drain()
        if self.waiting and not self._filling:
            self._filling = True
            self.gateway.spawn(self._fill_gap())

    def _drain(self) -> None:
        while self.waiting and self.closing is None:
            # A batch may overlap what was sent (history and live both had it).
            usable = [b for b in self.waiting.values() if b.first_offset <= self.sent_offset + 1]
            stale = [k for k, b in self.waiting.items() if b.last_offset <= self.sent_offset]
            for k in stale:
                del self.waiting[k]
            usable = [b for b in usable if b.last_offset > self.sent_offset]
            if not usable:
                return
            batch = max(usable, key=lambda b: b.last_offset)
            for publication in batch.publications():
                if publication.offset > self.sent_offset:
                    self.send_frame(publication)
                    self.sent_offset = publication.offset
            del self.waiting[batch.first_offset]

    async def _fill_gap(self, target_offset: int = 0) -> None:
        """Read history until nothing waits behind a gap and `target_offset` was sent."""
        try:
            deadline = time.monotonic() + GAP_FILL_DEADLINE_S
            attempt = 0
            while time.monotonic() < deadline:
                for batch in await self.gateway.history(self.user_id, self.sent_offset):
                    self.offer(batch)
                if self.closing is not None or not self.waiting and self.sent_offset >= target_offset:
                    return
                await asyncio.sleep(GAP_FILL_BACKOFF_S[min(attempt, len(GAP_FILL_BACKOFF_S) - 1)])
                attempt += 1
            if not self.waiting:
                return  # the target is still in the outbox: it will come live
            self.close(CloseCode.INTERNAL_ERROR, f"events after offset {self.sent_offset} are missing; resume")
        finally:
            self._filling = False

    def catch_up(self, target_offset: int = 0) -> None:
        """After a NATS reconnect: what was published meanwhile is only in
        history, which may itself be unreachable for a while: read it until
        the stream's head (as Postgres knew it) was sent."""
        if self.live_ready and not self._filling and self.closing is None:
            self._filling = True
            self.gateway.spawn(self._fill_gap(target_offset))


class LiveGateway:
    def __init__(self, auth: TokenAuthority, allowed_origins: tuple[str, ...],
                 nats_client: Callable[[], nats.NATS | None], pool: Callable[[], asyncpg.Pool]):
        self.auth = auth
        self.allowed_origins = frozenset(allowed_origins)
        self._nats = nats_client
        self._pool = pool
        self.connections: set[LiveConnection] = set()
        self._subscriptions: dict[str, tuple[nats_interest.Interest | None, set[LiveConnection]]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._epoch: str | None = None
        self._pinger: asyncio.Task | None = None

    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def on_nats_reconnected(self) -> None:
        connections = list(self.connections)
        if not connections:
            return
        heads = await stream_positions(self._pool(), sorted({c.user_id for c in connections}))
        for connection in connections:
            connection.catch_up(heads[connection.user_id])

    # --- history ---------------------------------------------------------------

    async def history(self, user_id: str, after_offset: int) -> list[EventBatch]:
        """The user's batches in JetStream holding offsets after `after_offset`, in order."""
        nc = self._nats()
        if nc is None or not nc.is_connected:
            return []
        js = nc.jetstream(timeout=HISTORY_READ_TIMEOUT_S)
        subject = user_subject_all_regions(user_id)
        batches, seq = [], 1
        while True:
            try:
                msg = await js.get_msg(EVENT_STREAM_NAME, seq=seq, subject=subject, direct=True, next=True)
            except NotFoundError:
                break
            except (nats.errors.Error, asyncio.TimeoutError) as exc:
                # JetStream unreachable for now (a restart, an election): the
                # caller reads again; what was read so far is still good.
                log.warning("history of %s unavailable: %s", user_id, exc)
                break
            batch = decode_event_batch(msg.data)
            if batch.last_offset > after_offset:
                batches.append(batch)
            seq = msg.seq + 1
        batches.sort(key=lambda b: b.first_offset)
        return batches

    # --- a connection ------------------------------------------------------------

    def _origin_allowed(self, ws: WebSocket) -> bool:
        origin = ws.headers.get("origin")
        if origin is None:
            return True  # not a browser: Origin protects browsers' ambient credentials
        host = ws.headers.get("host", "")
        return origin in self.allowed_origins or origin in (f"http://{host}", f"https://{host}")

    async def handle(self, ws: WebSocket) -> None:
        await ws.accept()
        connection: LiveConnection | None = None
        try:
            if not self._origin_allowed(ws):
                raise _Closed(CloseCode.FORBIDDEN_ORIGIN, f"origin {ws.headers.get('origin')!r} is not allowed")
            # The token and its claims are not kept: the connection copies what it needs.
            connection = await self._open(ws, *await self._authenticate(ws))
            await self._serve(connection)
        except _Closed as closed:
            await self._close(ws, closed)
        except Exception:
            log.exception("live connection failed")
            await self._close(ws, _Closed(CloseCode.INTERNAL_ERROR, "internal error; resume"))
        finally:
            if connection is not None:
                self._forget(connection)

    async def _close(self, ws: WebSocket, closed: _Closed) -> None:
        if ws.application_state == WebSocketState.CONNECTED and ws.client_state == WebSocketState.CONNECTED:
            try:
                await ws.close(closed.code, closed.reason)
            except (RuntimeError, OSError):
                pass  # the client went first

    async def _receive(self, ws: WebSocket, timeout_s: float | None) -> bytes | str:
        try:
            # No wait_for without a deadline: its frame would stay for the socket's life.
            message = await (ws.receive() if timeout_s is None else asyncio.wait_for(ws.receive(), timeout_s))
        except asyncio.TimeoutError:
            raise _Closed(CloseCode.AUTH_TIMEOUT, f"no connect frame within {LIVE_AUTH_DEADLINE_S:g} s") from None
        if message["type"] == "websocket.disconnect":
            raise _Closed(1000, "")
        data = message.get("text")
        return data if data is not None else message.get("bytes") or b""

    async def _authenticate(self, ws: WebSocket):
        data = await self._receive(ws, LIVE_AUTH_DEADLINE_S)
        try:
            hello = decode_client_frame(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise _Closed(CloseCode.BAD_FRAME, f"bad connect frame: {exc}") from None
        if not isinstance(hello, Connect):
            raise _Closed(CloseCode.BAD_FRAME, "the first frame must be a connect frame")
        try:
            claims = self.auth.verify(hello.token)
        except TokenEnded as exc:
            raise _Closed(CloseCode.TOKEN_EXPIRED, exc.detail) from None
        except Unauthorized as exc:
            raise _Closed(CloseCode.UNAUTHORIZED, exc.detail) from None
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise _Closed(CloseCode.UNAUTHORIZED, "token claims are malformed") from None
        return hello, claims

    async def _open(self, ws: WebSocket, hello: Connect, claims) -> LiveConnection:
        pool = self._pool()
        if self._epoch is None:
            self._epoch = await _from_database(stream_epoch(pool))
        connection = LiveConnection(self, ws, claims.sub, hello.encoding, self._epoch, claims.iat, claims.exp)
        try:
            return await self._start(connection, hello, claims, pool)
        except BaseException:
            # The caller never gets it, so cannot forget it: its subscription
            # and its place among the pinged connections would stay for good.
            self._forget(connection)
            raise

    async def _start(self, connection: LiveConnection, hello: Connect, claims, pool) -> LiveConnection:
        # Subscribe before reading where the stream stands: anything published
        # from here on is caught live, anything before it is in history.
        await self._subscribe(connection)
        self.connections.add(connection)
        head = (await _from_database(stream_positions(pool, [claims.sub])))[claims.sub]
        history: list[EventBatch] = []
        recovered = hello.epoch == self._epoch and hello.offset is not None and hello.offset <= head
        if recovered and hello.offset < head:
            history = await self.history(claims.sub, hello.offset)
            # Only when history starts right after the client's offset. Events
            # still in the outbox count as missing: the client reloads over
            # HTTP, which is never wrong, only slower.
            recovered = bool(history) and history[0].first_offset <= hello.offset + 1
        connection.sent_offset = hello.offset if recovered else head
        connection.send_frame(Connected(
            user_id=claims.sub, epoch=self._epoch, offset=connection.sent_offset, recovered=recovered,
            ping_interval_s=LIVE_PING_INTERVAL_S, expires_at=claims.exp))
        for batch in history:
            connection.offer(batch)
        connection.live_ready = True
        connection._drain()
        if connection.waiting:
            connection.catch_up()
        if self.auth.is_revoked(claims):  # revoked while this socket was opening
            connection.close(CloseCode.TOKEN_EXPIRED, "token has been revoked")
        return connection

    async def follow_video_progress(self, nc: nats.NATS) -> None:
        """One subscription for every user's video progress (rare, small
        messages): cheaper than a second subscription per connected user."""

        async def deliver(msg) -> None:
            try:
                frame = _video_progress_decoder.decode(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.error("undecodable video progress on %s", msg.subject)
                return
            entry = self._subscriptions.get(frame.user_id)
            # The subject names the user too: a frame is sent only where both agree.
            if entry is None or msg.subject != video_subject(frame.user_id):
                return
            for member in list(entry[1]):
                if member.live_ready:
                    member.send_frame(frame)

        await nc.subscribe(f"{VIDEO_SUBJECT_ROOT}.*", cb=deliver)

    def close_revoked(self, user_id: str, revoked_before: dt.datetime) -> int:
        """Close the user's sockets whose tokens a revocation covers; returns how many."""
        entry = self._subscriptions.get(user_id)
        closed = 0
        for connection in list(entry[1]) if entry else ():
            if connection.issued_at <= revoked_before:
                connection.close(CloseCode.TOKEN_EXPIRED, "token has been revoked; connect with a new one")
                closed += 1
        return closed

    async def _serve(self, connection: LiveConnection) -> None:
        if self._pinger is None or self._pinger.done():
            self._pinger = asyncio.get_running_loop().create_task(self._ping_loop())
        expires_in_s = (connection.expires_at - dt.datetime.now(dt.timezone.utc)).total_seconds()
        expiry = asyncio.get_running_loop().call_later(
            max(0.0, expires_in_s), connection.close, CloseCode.TOKEN_EXPIRED, "token expired; connect with a new one")
        # The reader is a task; this handler is the writer (one task a socket
        # fewer), woken when the reader ends.
        reader = asyncio.get_running_loop().create_task(self._read_loop(connection))
        reader.add_done_callback(lambda _: connection.wake_writer())
        try:
            await connection.write_loop(reader)
        except (OSError, RuntimeError):
            pass  # the client is gone mid-send: nothing left to close
        finally:
            expiry.cancel()
            reader.cancel()
        if reader.done() and not reader.cancelled() and reader.exception() is not None:
            raise reader.exception()
        if connection.closing is not None:
            raise connection.closing

    async def _read_loop(self, connection: LiveConnection) -> None:
        while connection.closing is None:
            data = await self._receive(connection.ws, None)
            try:
                frame = decode_client_frame(data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                connection.close(CloseCode.BAD_FRAME, f"bad frame: {exc}")
                return
            if isinstance(frame, Pong):
                connection.last_pong = time.monotonic()
                connection.ping_sent_at = None
            else:
                connection.close(CloseCode.BAD_FRAME, "already connected: only pong frames may follow")
                return

    async def _ping_loop(self) -> None:
        while self.connections:
            await asyncio.sleep(min(LIVE_PING_INTERVAL_S, LIVE_PONG_TIMEOUT_S) / 2)
            now = time.monotonic()
            for connection in list(self.connections):
                if connection.ping_sent_at is not None:
                    if now - connection.ping_sent_at > LIVE_PONG_TIMEOUT_S:
                        connection.close(CloseCode.PONG_TIMEOUT, f"no pong within {LIVE_PONG_TIMEOUT_S:g} s")
                elif now - connection.last_pong >= LIVE_PING_INTERVAL_S:
                    connection.ping_sent_at = now
                    connection.send_frame(Ping())

    # --- NATS interest, shared by a user's connections ----------------------------

    async def _connected_nats(self):
        """The NATS connection, waiting a little for one: a replica connects
        as it starts and again after a blip of NATS, and a client arriving in
        that moment should be served, not sent away."""
        deadline = time.monotonic() + NATS_WAIT_S
        while (nc := self._nats()) is None or not nc.is_connected:
            if time.monotonic() >= deadline:
                raise _Closed(CloseCode.INTERNAL_ERROR, "live events are unavailable (NATS down); retry")
            await asyncio.sleep(NATS_WAIT_POLL_S)
        return nc

    async def _subscribe(self, connection: LiveConnection) -> None:
        nc = await self._connected_nats()
        entry = self._subscriptions.get(connection.user_id)
        if entry is not None:
            entry[1].add(connection)
            return
        members: set[LiveConnection] = {connection}
        self._subscriptions[connection.user_id] = (None, members)  # later connections join while we subscribe

        def deliver(msg) -> None:
            try:
                batch = decode_event_batch(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.error("undecodable event batch on %s", msg.subject)
                return
            for member in list(members):
                member.offer(batch)

        try:
            # One interest per user, not a nats-py Subscription: ~4 KiB less per user (see nats_interest).
            subscription = await nats_interest.subscribe(nc, user_subject_all_regions(connection.user_id), deliver)
        except BaseException:
            del self._subscriptions[connection.user_id]
            raise
        self._subscriptions[connection.user_id] = (subscription, members)

    def _forget(self, connection: LiveConnection) -> None:
        self.connections.discard(connection)
        entry = self._subscriptions.get(connection.user_id)
        if entry is None:
            return
        subscription, members = entry
        members.discard(connection)
        if not members:
            del self._subscriptions[connection.user_id]
            if subscription is not None:
                self.spawn(_unsubscribe(subscription))


async def _from_database(query):
    """`await query`; Postgres unreachable, or out of room (no connection
    slot free, say), closes the socket, to be resumed, saying so (a client
    reconnects with backoff), instead of as an internal error with a
    traceback in the log."""
    try:
        return await answered_within(query, LIVE_DATABASE_ANSWER_WAIT_S)
    except DATABASE_ERRORS as exc:
        if connection_lost(exc):
            why = "database unreachable"
        elif out_of_resources(exc):
            why = "database out of room"
        else:
            raise
        log.warning("a live socket was refused: %s (%r)", why, exc)
        raise _Closed(CloseCode.INTERNAL_ERROR, f"live events are unavailable ({why}); resume") from None


async def _unsubscribe(subscription) -> None:
    try:
        await subscription.unsubscribe()
    except nats.errors.Error:
        pass  # the connection is gone; so is the interest
