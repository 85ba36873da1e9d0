"""A lane: one method of an actor, bytes in and bytes out, called over a
loopback TCP connection by callers on the actor's own Ray node, instead of
as a Ray call.

Why: a Ray actor call costs CPU on both sides far beyond its bytes. Timed
on this 2-core machine (an async actor echoing 300 bytes, calls sent at a
fixed rate): 0.9 ms of CPU to the caller and 0.9 to the actor a call at
300 calls/s, 0.7 and 0.7 at 1,000/s; the same round trip on a loopback
socket, 0.05 and 0.04 ms. The API replicas' calls to a commission chain
(`submit`, one for every group of single purchases) are the hottest calls
in the system, over two hundred a second at 500 purchases/s.

What a lane does not change: the method, its idempotency (a purchase's
id), and its callers' handling of a silent actor (refs.SilenceWatch pings
it by Ray). A call whose lane is lost before its answer came (the actor's
process died, the connection was cut) goes by Ray instead, as a retry
does now: its outcome was unknown, and its id makes the second delivery
a replay of the first if that one landed. A caller on another node, or one
whose lane is not up yet, calls by Ray.

Only a caller that has the lane's token, which the actor hands out over
Ray (`LaneAddress`), is served: the port is on loopback, and any local
process can reach it.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import secrets
import struct
import time
from typing import AsyncIterator, Awaitable, Callable

import msgspec
import ray

from dailydoco.protocol import EngineError, EngineErrorWire, InternalError, error_named
from dailydoco.storage.pool import unavailable_for

from .batching import outcome_unread, start_shared_task
from .refs import ACTOR_RETRY_DEADLINE_S, ActorRef

LANE_HOST = "127.0.0.1"  # a lane is for callers on the actor's own node
LANE_TOKEN_BYTES = 32
# A frame's body: a chain's largest call is 4,000 purchases (about 0.8 MB
# of msgpack) and its answer about as much; more is a confused peer.
LANE_BODY_BYTES_MAX = 16 * 1024 * 1024
LANE_HELLO_WAIT_S = 5.0  # for the token, from a connection just accepted
# After a lane is lost, calls go by Ray for this long before the lane is
# looked for again: an actor being made again has no lane to give yet.
LANE_LOOKUP_AFTER_LOSS_S = 1.0
# A frame: body bytes, request id, kind.
_HEADER = struct.Struct("!IQB")
_REQUEST, _ANSWER, _FAILED = 0, 1, 2
_FAILURE_ENCODER = msgspec.msgpack.Encoder()
_FAILURE_DECODER = msgspec.msgpack.Decoder(EngineErrorWire)
log = logging.getLogger("dailydoco.lane")


class LaneAddress(msgspec.Struct, frozen=True):
    """Where an actor's lane listens, and the token it asks of a caller."""

    node_id: str
    port: int
    token: bytes


class LaneLost(ConnectionError):
    """The lane closed before a call's answer came: the call's outcome is unknown."""


def _as_engine_error(exc: Exception) -> EngineError:
    """What a caller is told of `exc`, raised by the method: an EngineError
    as it is; a failed service's as the 503 the API would answer for it; a
    bug logged here, where its traceback is, and reported as internal."""
    if isinstance(exc, EngineError):
        return exc
    unavailable = unavailable_for(exc)
    if unavailable is not None:
        return unavailable
    log.error("a lane's call failed", exc_info=exc)
    return InternalError("the server failed to handle this request; it is logged")


class LaneServer:
    """Serves `method` (bytes in, bytes out) to callers holding the token,
    each connection's calls concurrently, as Ray would serve them."""

    def __init__(self, method: Callable[[bytes], Awaitable[bytes]], node_id: str):
        self._method = method
        self._node_id = node_id  # the Ray node it runs on: only callers there use it
        self._token = secrets.token_bytes(LANE_TOKEN_BYTES)
        self._server: asyncio.Server | None = None
        self._opening = asyncio.Lock()

    async def address(self) -> LaneAddress:
        """The lane's address, listening from the first time it is asked."""
        async with self._opening:
            if self._server is None:
                # Outside the asking call's context: Ray cancels what a call
                # started with the call (see start_shared_task).
                self._server = await start_shared_task(asyncio.start_server(self._serve, LANE_HOST, 0))
        port = self._server.sockets[0].getsockname()[1]
        return LaneAddress(self._node_id, port, self._token)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.TaskGroup() as calls:  # a caller that leaves still has its calls finished
                async for request_id, body in self._requests(reader):
                    calls.create_task(self._answer(writer, request_id, body))
        finally:
            writer.close()

    async def _requests(self, reader: asyncio.StreamReader) -> AsyncIterator[tuple[int, bytes]]:
        """A connection's calls, once its caller has shown the token, until it
        leaves, breaks the protocol, or never shows it."""
        try:
            async with asyncio.timeout(LANE_HELLO_WAIT_S):
                token = await reader.readexactly(LANE_TOKEN_BYTES)
            if not hmac.compare_digest(token, self._token):
                log.warning("a lane's caller did not show its token; hanging up")
                return
            while True:
                length, request_id, kind = _HEADER.unpack(await reader.readexactly(_HEADER.size))
                if kind != _REQUEST or length > LANE_BODY_BYTES_MAX:
                    log.warning("a lane's caller sent a frame of kind %d, %d bytes; hanging up", kind, length)
                    return
                yield request_id, await reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            return  # the caller went away, or never said who it was

    async def _answer(self, writer: asyncio.StreamWriter, request_id: int, body: bytes) -> None:
        try:
            answer, kind = await self._method(body), _ANSWER
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller
            error = _as_engine_error(exc)
            answer, kind = _FAILURE_ENCODER.encode(
                EngineErrorWire(type(error).__name__, error.detail, error.retry_after_s)), _FAILED
        if writer.is_closing():
            return  # its caller is gone; should it retry by Ray, the retry replays it
        writer.write(_HEADER.pack(len(answer), request_id, kind) + answer)
        try:
            await writer.drain()
        except ConnectionError:
            pass


class LaneConnection:
    """One caller's connection to a lane: calls in flight matched to their
    answers by id."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count()
        self._waiting: dict[int, asyncio.Future] = {}
        self.lost = False
        self._reading = start_shared_task(self._read())

    @classmethod
    async def open(cls, address: LaneAddress) -> LaneConnection:
        reader, writer = await asyncio.open_connection(LANE_HOST, address.port)
        writer.write(address.token)
        return cls(reader, writer)

    async def call(self, body: bytes) -> bytes:
        if self.lost:
            raise LaneLost("the lane is closed")
        request_id = next(self._ids)
        answer = self._waiting[request_id] = asyncio.get_running_loop().create_future()
        try:
            self._writer.write(_HEADER.pack(len(body), request_id, _REQUEST) + body)
            await self._writer.drain()
            return await answer
        finally:
            self._waiting.pop(request_id, None)

    async def _read(self) -> None:
        try:
            while True:
                length, request_id, kind = _HEADER.unpack(await self._reader.readexactly(_HEADER.size))
                if length > LANE_BODY_BYTES_MAX or kind not in (_ANSWER, _FAILED):
                    log.warning("a lane answered a frame of kind %d, %d bytes; closing it", kind, length)
                    break
                body = await self._reader.readexactly(length)
                answer = self._waiting.get(request_id)
                if answer is None or answer.done():
                    continue  # its caller gave up on it
                if kind == _ANSWER:
                    answer.set_result(body)
                else:
                    failure = _FAILURE_DECODER.decode(body)
                    answer.set_exception(error_named(failure.error, failure.detail, failure.retry_after_s))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        self.lost = True
        self._writer.close()
        for answer in self._waiting.values():
            if not answer.done():
                answer.set_exception(LaneLost("the lane closed before the call's answer came"))


class LanedActorRef(ActorRef):
    """An ActorRef whose `lane_method` goes over the actor's lane where it
    has one on this node (the actor's `lane` method says where), and by Ray
    otherwise or once the lane is lost."""

    def __init__(self, name: str, namespace: str, lane_method: str,
                 counted: Callable[[str], None] = lambda way: None):
        super().__init__(name, namespace)
        self.lane_method = lane_method
        self._counted = counted  # each call of lane_method, by the way it went: "lane" or "ray"
        self._lane: LaneConnection | None = None
        self._lane_lookup: asyncio.Task | None = None
        self._lane_lookup_after = 0.0  # monotonic time
        self._lane_for_handle = None  # the handle the lane was looked up through

    async def call(self, method: str, *args, deadline_s: float = ACTOR_RETRY_DEADLINE_S):
        if method == self.lane_method:
            lane = self._lane_now()
            if lane is not None:
                try:
                    answer = await lane.call(*args)
                    self._counted("lane")
                    return answer
                except ConnectionError as exc:  # LaneLost, or the write's
                    log.info("%s: lane lost (%r); its call goes by Ray", self.name, exc)
                    self._drop_lane()
                    # Its outcome is unknown: by Ray, its id replays it if it landed.
            self._counted("ray")
        return await super().call(method, *args, deadline_s=deadline_s)

    def _lane_now(self) -> LaneConnection | None:
        """The lane, if it is up; else, unless one was looked up for this
        handle (the actor is on another node) or a lookup is under way or
        not due yet, start one, for the calls after this one."""
        if self._lane is not None and not self._lane.lost and self._lane_for_handle is self._handle:
            return self._lane
        if self._lane is not None:
            self._drop_lane()  # lost, or the actor's handle changed: it was made again
        looked_up = self._handle is not None and self._lane_for_handle is self._handle
        if (not looked_up and (self._lane_lookup is None or self._lane_lookup.done())
                and time.monotonic() >= self._lane_lookup_after):
            self._lane_lookup = outcome_unread(start_shared_task(self._look_up_lane()))
        return None

    async def _look_up_lane(self) -> None:
        self._lane_lookup_after = time.monotonic() + LANE_LOOKUP_AFTER_LOSS_S
        try:
            address: LaneAddress = await super().call("lane")
            if address.node_id != ray.get_runtime_context().get_node_id():
                self._lane_for_handle = self._handle  # elsewhere: by Ray, until this actor is made again
                return
            lane = await LaneConnection.open(address)
        except Exception as exc:  # noqa: BLE001 - calls go by Ray meanwhile
            log.info("%s: no lane (%r); calls go by Ray", self.name, exc)
            return
        self._lane, self._lane_for_handle = lane, self._handle

    def _drop_lane(self) -> None:
        if self._lane is not None:
            self._lane.close()
        self._lane, self._lane_for_handle = None, None
        self._lane_lookup_after = time.monotonic() + LANE_LOOKUP_AFTER_LOSS_S
