"""Interest in a subject for a few hundred bytes: the gateway's one per user.

A nats-py `Subscription` always holds an asyncio.Queue and, with a callback,
a task: about 4 KiB, which at 10,000 connected users is most of the gap to
the gateway's memory budget per socket. Those queues would stay empty here:
the gateway hands each message to its sockets at once, and their own byte-
bounded buffers are where anything waits.

`Interest` is the smallest object nats-py's client accepts in its table of
subscriptions (`NATS._subs`): the client hands each message to
`_pending_queue.put_nowait`, resends `SUB <_subject> <_id>` after a reconnect
and reads the constants below on the way. That table is nats-py's internals,
so pyproject pins nats-py's minor version and tests/cluster/test_nats_interest.py
checks delivery, unsubscribe and reconnect against a real server.
"""

from __future__ import annotations

import logging
from typing import Callable

import nats
from nats.aio.msg import Msg

log = logging.getLogger("dailydoco.nats")


class _IgnoredCounter:
    """A counter the client bumps per message and nothing here reads: reads 0,
    and keeps no per-interest slot."""

    def __get__(self, obj, owner=None) -> int:
        return 0

    def __set__(self, obj, value: int) -> None:
        pass


class Interest:
    __slots__ = ("_id", "_subject", "_deliver", "_nc")

    # What nats-py's client reads of a subscription, and our constant answers.
    _queue = ""  # no queue group
    _max_msgs = 0  # no auto-unsubscribe
    _jsi = None  # not a JetStream consumer
    _future = None  # not a request's reply
    _pending_bytes_limit = 0  # nothing is held here, so no slow-consumer accounting
    _wait_for_msgs_task = None
    _message_iterator = None
    _pending_next_msgs_calls = None

    def __init__(self, nc: nats.NATS, sid: int, subject: str, deliver: Callable[[Msg], None]):
        self._nc = nc
        self._id = sid
        self._subject = subject
        self._deliver = deliver

    _received = _pending_size = _IgnoredCounter()

    @property
    def _pending_queue(self) -> Interest:
        return self

    def put_nowait(self, msg: Msg) -> None:
        """Called by the client's reader for each message: deliver it now. An
        exception here would end the client's read loop, so none leaves."""
        try:
            self._deliver(msg)
        except Exception:
            log.exception("delivering a message on %s failed", msg.subject)

    async def unsubscribe(self) -> None:
        self._nc._remove_sub(self._id)
        if self._nc.is_connected:  # otherwise the interest ends with the connection, or is not resent
            await self._nc._send_unsubscribe(self._id)

    async def _drain(self) -> None:
        """The client drains every subscription before closing: nothing is pending here."""
        await self.unsubscribe()


async def subscribe(nc: nats.NATS, subject: str, deliver: Callable[[Msg], None]) -> Interest:
    """Register interest in `subject`; `deliver` runs in the client's reader,
    synchronously, for each message (it must not block)."""
    if nc.is_closed:
        raise nats.errors.ConnectionClosedError
    nc._sid += 1
    interest = Interest(nc, nc._sid, subject, deliver)
    nc._subs[interest._id] = interest
    await nc._send_subscribe(interest)
    return interest
