"""The live-updates protocol: events, frames, close codes, and the client's session.

A user's events form one stream: each event gets the next offset of that
user's stream (1, 2, 3, ...), assigned in the same Postgres transaction as the
ledger rows that cause it, and the stream has an epoch that changes only when
its offsets start over (a new database). A client that remembers
(offset, epoch) resumes exactly where it stopped, or is told
`recovered: false` and reloads its state over HTTP.

Frames are msgspec-encoded tagged Structs: JSON text frames by default,
msgpack binary frames when the client asks for them in its first frame.
`LiveSession` is the client side as a pure state machine (bytes in, events
out); the asyncio and trio client, the CLI and the tests drive the same code.
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import functools
import random
from typing import Annotated, Callable, Literal, Union

import msgspec
from msgspec import Meta, Struct


# --- limits --------------------------------------------------------------------

LIVE_AUTH_DEADLINE_S = 5.0  # the first frame (with the token) must arrive by then
LIVE_PING_INTERVAL_S = 20.0  # server pings this often; browsers cannot send WebSocket pings
LIVE_PONG_TIMEOUT_S = 10.0  # a connection that does not answer a ping in time is dead
LIVE_CLIENT_FRAME_BYTES_MAX = 8 * 1024  # clients send only small control frames
LIVE_OUTBOUND_BYTES_MAX = 256 * 1024  # per connection; a consumer this far behind is closed
LIVE_HISTORY_PER_USER_MAX = 1_000  # events per user kept by JetStream for resume
NETWORK_MILESTONES = (10, 100, 1_000, 10_000, 100_000, 1_000_000)  # network sizes worth an event
RECONNECT_DELAY_S_MIN = 0.1
RECONNECT_DELAY_S_MAX = 15.0


class CloseCode(enum.IntEnum):
    """WebSocket close codes the server uses, each with its reason text."""

    GOING_AWAY = 1001  # server shutting down: reconnect and resume
    INTERNAL_ERROR = 1011  # reconnect and resume
    BAD_FRAME = 4000  # the client sent something that is not a valid frame
    UNAUTHORIZED = 4001  # the token did not verify: do not retry with it
    AUTH_TIMEOUT = 4002  # no Connect frame within the deadline
    TOKEN_EXPIRED = 4003  # the token expired or was revoked: get a new one
    FORBIDDEN_ORIGIN = 4004  # the page's Origin is not allowed
    PONG_TIMEOUT = 4008  # no Pong for a Ping in time
    SLOW_CONSUMER = 4009  # outbound queue over its byte limit: reconnect and resume
    NO_ROUTE = 4404  # no live endpoint at that path: only /v1/live is one


# Reconnecting with the same token cannot help after these.
FATAL_CLOSE_CODES = frozenset({CloseCode.UNAUTHORIZED, CloseCode.FORBIDDEN_ORIGIN, CloseCode.BAD_FRAME,
                               CloseCode.NO_ROUTE})


# --- events --------------------------------------------------------------------


class _Event(Struct, frozen=True, forbid_unknown_fields=True, tag_field="type"):
    pass


class CommissionEarned(_Event, tag="commission.earned"):
    transaction_id: str
    level: int
    rate_bp: int
    amount_micros: int
    currency: str


class CommissionApproved(_Event, tag="commission.approved"):
    currency: str
    amount_micros: int  # net of the approved reversals
    entries: int


class CommissionPaid(_Event, tag="commission.paid"):
    payout_id: str
    currency: str
    amount_micros: int


class CommissionReversed(_Event, tag="commission.reversed"):
    transaction_id: str
    refund_id: str
    level: int
    kind: Literal["refund", "clawback"]
    amount_micros: int  # negative: what the commission lost
    currency: str


class ReferralJoined(_Event, tag="referral.joined"):
    member_id: str
    level: int  # 1: referred by this user directly


class NetworkMilestone(_Event, tag="network.milestone"):
    network_size: int  # members at levels 1-7, one of NETWORK_MILESTONES


class BalanceChanged(_Event, tag="balance.changed"):
    currency: str
    pending_delta_micros: int
    approved_delta_micros: int
    paid_delta_micros: int


LiveEvent = Union[
    CommissionEarned, CommissionApproved, CommissionPaid, CommissionReversed, ReferralJoined, NetworkMilestone,
    BalanceChanged,
]


# --- frames --------------------------------------------------------------------


class _Frame(Struct, frozen=True, forbid_unknown_fields=True, tag_field="type"):
    pass


class Publication(_Frame, tag="pub"):
    offset: int  # position in the user's stream, from 1, no gaps
    epoch: str
    id: str  # stable event id: "<epoch>:<offset>" within the user's stream
    at: dt.datetime  # engine time of the write that caused it
    event: LiveEvent


class Connected(_Frame, tag="connected"):
    user_id: str
    epoch: str
    offset: int  # the stream position after what this frame's recovery replays
    recovered: bool  # False: the client must reload its state over HTTP
    ping_interval_s: float
    expires_at: dt.datetime


class Ping(_Frame, tag="ping"):
    pass


class VideoProgress(_Frame, tag="video"):
    """A video job of this user moved on. Outside the stream (no offset): a
    frame lost to a reconnect is not replayed, as GET /v1/videos/{id} holds
    the job's state; progress only says how far it got."""

    job_id: str
    user_id: str
    status: Literal["running", "done", "failed"]
    progress: float  # 0..1


class Connect(_Frame, tag="connect"):
    """The client's first frame: who it is, and where its stream stopped."""

    token: Annotated[str, Meta(max_length=2048)]
    offset: Annotated[int, Meta(ge=0)] | None = None
    epoch: Annotated[str, Meta(max_length=64)] | None = None
    encoding: Literal["json", "msgpack"] = "json"


class Pong(_Frame, tag="pong"):
    pass


ServerFrame = Union[Publication, Connected, Ping, VideoProgress]
ClientFrame = Union[Connect, Pong]

_event_list_decoder = msgspec.msgpack.Decoder(list[LiveEvent])
_server_json_decoder = msgspec.json.Decoder(ServerFrame)
_server_msgpack_decoder = msgspec.msgpack.Decoder(ServerFrame)
_client_json_decoder = msgspec.json.Decoder(ClientFrame)
_client_msgpack_decoder = msgspec.msgpack.Decoder(ClientFrame)


# --- NATS subjects and messages ------------------------------------------------

EVENT_SUBJECT_ROOT = "dd.ev"  # dd.ev.<region>.<user token>: one subject per user per producing region
EVENT_STREAM_NAME = "DD_EVENTS"


@functools.lru_cache(maxsize=1 << 16)  # every published row names its user twice (subject, message id)
def user_token(user_id: str) -> str:
    """The user id as one NATS subject token: lower-case base32, so it is
    injective (ids differing in case or by a prefix map to different tokens)
    and holds no '.', '*' or '>'."""
    return base64.b32encode(user_id.encode()).decode().rstrip("=").lower()


TOKEN_REVOCATION_SUBJECT = "dd.auth.revoked"  # every API replica of every region listens


class TokenRevoked(Struct, frozen=True, array_like=True):
    """A revocation notice between API replicas (the durable record is in Postgres)."""

    user_id: str
    revoked_before: dt.datetime


VIDEO_SUBJECT_ROOT = "dd.video"  # dd.video.<user token>: progress of the user's video jobs, not kept


def video_subject(user_id: str) -> str:
    return f"{VIDEO_SUBJECT_ROOT}.{user_token(user_id)}"


def user_subject(region: str, user_id: str) -> str:
    return f"{EVENT_SUBJECT_ROOT}.{region}.{user_token(user_id)}"


def user_subject_all_regions(user_id: str) -> str:
    return f"{EVENT_SUBJECT_ROOT}.*.{user_token(user_id)}"


class EventBatch(Struct, frozen=True, array_like=True):
    """One NATS message: one user's events of one write, offsets first_offset..."""

    epoch: str
    first_offset: int
    at: dt.datetime
    events: list[LiveEvent]

    def publications(self) -> list[Publication]:
        return [
            Publication(offset=offset, epoch=self.epoch, id=event_id(self.epoch, offset), at=self.at, event=event)
            for offset, event in enumerate(self.events, start=self.first_offset)
        ]

    @property
    def last_offset(self) -> int:
        return self.first_offset + len(self.events) - 1


def encode_event_batch(epoch: str, first_offset: int, at: dt.datetime, encoded_events: bytes) -> bytes:
    """The relay forwards the outbox's encoded events as they are."""
    return msgspec.msgpack.encode((epoch, first_offset, at, msgspec.Raw(encoded_events)))


def decode_event_batch(data: bytes) -> EventBatch:
    return _event_batch_decoder.decode(data)


def encode_events(events: list[LiveEvent]) -> bytes:
    """The outbox's form of one user's events of one write."""
    return msgspec.msgpack.encode(events)


def decode_events(data: bytes) -> list[LiveEvent]:
    return _event_list_decoder.decode(data)


def event_id(epoch: str, offset: int) -> str:
    return f"{epoch}:{offset}"


def encode_frame(frame: Struct, encoding: str) -> bytes:
    return msgspec.msgpack.encode(frame) if encoding == "msgpack" else msgspec.json.encode(frame)


def decode_client_frame(data: bytes | str) -> Connect | Pong:
    """Text frames are JSON, binary frames msgpack; raises msgspec errors on bad input."""
    if len(data) > LIVE_CLIENT_FRAME_BYTES_MAX:
        raise msgspec.ValidationError(f"frame of {len(data)} bytes is over {LIVE_CLIENT_FRAME_BYTES_MAX}")
    if isinstance(data, str):
        return _client_json_decoder.decode(data)
    return _client_msgpack_decoder.decode(data)


def decode_server_frame(data: bytes | str) -> ServerFrame:
    if isinstance(data, str):
        return _server_json_decoder.decode(data)
    return _server_msgpack_decoder.decode(data)


# --- the client's session --------------------------------------------------------


class LiveProtocolError(Exception):
    """The server broke the protocol (a gap, a frame out of place); reconnect and resume."""


class StreamReset(Struct, frozen=True):
    """The stream could not be resumed: reload state over HTTP, then go on from offset."""

    epoch: str
    offset: int


class Reconnect(Struct, frozen=True):
    delay_s: float
    resume: bool  # False: the failure is fatal; do not reconnect with this token


class LiveSession:
    """Client side of one user's live stream across any number of connections.

    Guarantees to its caller: every Publication it returns is the next offset
    of the stream (no gap, no duplicate) within an epoch, or is preceded by a
    StreamReset when the server could not recover the stream.
    """

    def __init__(self, token: str, *, encoding: Literal["json", "msgpack"] = "json",
                 offset: int | None = None, epoch: str | None = None,
                 rng: Callable[[], float] = random.random):
        self.token = token
        self.encoding = encoding
        self.offset = offset
        self.epoch = epoch
        self.connected = False
        self._failures = 0
        self._rng = rng
        self._outgoing: list[bytes] = []

    # events in -> bytes out

    def connect_frame(self) -> bytes | str:
        """The first frame of a new connection: the token and the resume position."""
        self.connected = False
        frame = Connect(token=self.token, offset=self.offset, epoch=self.epoch, encoding=self.encoding)
        return msgspec.json.encode(frame).decode()

    def data_to_send(self) -> list[bytes | str]:
        out, self._outgoing = self._outgoing, []
        return out

    # bytes in -> events out

    def receive(self, data: bytes | str) -> list[Publication | StreamReset | VideoProgress]:
        frame = decode_server_frame(data)
        if isinstance(frame, VideoProgress):
            return [frame]  # not part of the stream: no offset to check
        if isinstance(frame, Ping):
            pong = encode_frame(Pong(), self.encoding)
            self._outgoing.append(pong if self.encoding == "msgpack" else pong.decode())
            return []
        if isinstance(frame, Connected):
            self.connected = True
            self._failures = 0
            if frame.recovered and frame.epoch == self.epoch:
                return []
            self.epoch, self.offset = frame.epoch, frame.offset
            return [StreamReset(frame.epoch, frame.offset)]
        if not self.connected:
            raise LiveProtocolError("publication before the Connected frame")
        if frame.epoch != self.epoch:
            raise LiveProtocolError(f"publication of epoch {frame.epoch!r} in stream of epoch {self.epoch!r}")
        if frame.offset <= (self.offset or 0):
            return []  # delivered before: resent across a reconnect
        if frame.offset != (self.offset or 0) + 1:
            raise LiveProtocolError(f"gap: offset {frame.offset} after {self.offset}")
        self.offset = frame.offset
        return [frame]

    def connection_lost(self, close_code: int | None) -> Reconnect:
        """What to do after the connection ended with `close_code` (None: no close frame)."""
        self.connected = False
        if close_code in FATAL_CLOSE_CODES:
            return Reconnect(0.0, resume=False)
        self._failures += 1
        # Full jitter: a region's clients reconnecting after a restart spread out.
        ceiling = min(RECONNECT_DELAY_S_MAX, RECONNECT_DELAY_S_MIN * 2 ** (self._failures - 1))
        return Reconnect(self._rng() * ceiling, resume=True)


_event_batch_decoder = msgspec.msgpack.Decoder(EventBatch)
