"""NATS connections and the JetStream event stream, with the project's settings."""

from __future__ import annotations

import asyncio
import logging

import nats
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from dailydoco.protocol.live import EVENT_STREAM_NAME, EVENT_SUBJECT_ROOT, LIVE_HISTORY_PER_USER_MAX

CONNECT_TIMEOUT_S = 2.0
RECONNECT_WAIT_S = 0.25  # a restarted server is found again within this
FIRST_CONNECT_RETRY_S = 0.5
EVENT_HISTORY_AGE_S = 7 * 24 * 3600  # a client away longer reloads over HTTP
DUPLICATE_WINDOW_S = 120  # a republished outbox row is dropped within this (JetStream's default)
# nats-py pings the server every 120 s and gives a connection up as stale at
# the third unanswered ping: a link that goes silent without closing (a NAT or
# firewall that dropped its state, a frozen peer) went unnoticed for up to 6
# minutes, and live updates and event publishing stopped that long. With these
# it is found 10 to 15 s after it went silent, and the client reconnects; a
# ping every 5 s per connection costs nothing.
PING_INTERVAL_S = 5
PINGS_OUTSTANDING_MAX = 2
SILENT_LINK_FOUND_S = (PINGS_OUTSTANDING_MAX + 1) * PING_INTERVAL_S

log = logging.getLogger("dailydoco.nats")


class Client(nats.NATS):
    """nats-py's client, with a flush that times out left harmless.

    A flush waits for the PONG to its PING; on a timeout nats-py 2.16 cancels
    that wait's future but leaves it first in line, and when the PONG comes
    its reader fails setting the cancelled future's result and stops for
    good, while `is_connected` stays True: the connection silently delivers
    nothing more. Any flush that times out (a readiness check under load,
    say) is enough. Here a PONG still takes its place in line, and a
    cancelled future is skipped.
    """

    async def _process_pong(self) -> None:
        if self._pongs:
            future = self._pongs.pop(0)
            if not future.done():
                future.set_result(True)
            self._pongs_received += 1
            self._pings_outstanding = 0


async def connect(url: str, name: str, **callbacks) -> nats.NATS:
    """Connect, retrying until the server answers; then reconnect forever.

    nats-py gives up on a first connection that fails; a component started
    while NATS is down must still come up and wait for it. Losing and
    regaining the connection is logged (nats-py logs neither when the server
    closes the connection), then passed to the caller's callbacks, if any.
    The caller's `reconnected_cb` runs as a task of its own, its failure
    logged: nats-py awaits it inside its reconnect loop, where an OSError
    (a database refusing connections, in a callback that reloads from it)
    counts as a failed reconnect, so it connects again without closing the
    connection it had, and any other exception ends that loop.
    """
    given_disconnected = callbacks.pop("disconnected_cb", None)
    given_reconnected = callbacks.pop("reconnected_cb", None)
    client: Client | None = None
    callback_tasks: set[asyncio.Task] = set()  # held: the loop keeps only weak references

    def report(task: asyncio.Task) -> None:
        callback_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: what follows a NATS reconnect failed: %r", name, task.exception())

    async def disconnected() -> None:
        if not (client is not None and client.is_closed):  # closing on purpose is no news
            log.warning("%s: lost its NATS connection to %s; reconnecting", name, url)
        if given_disconnected is not None:
            await given_disconnected()

    async def reconnected() -> None:
        log.warning("%s: reconnected to NATS at %s", name, url)
        if given_reconnected is not None:
            task = asyncio.get_running_loop().create_task(given_reconnected())
            callback_tasks.add(task)
            task.add_done_callback(report)

    while True:
        try:
            client = Client()
            await client.connect(
                url, name=name, allow_reconnect=True, max_reconnect_attempts=-1,
                reconnect_time_wait=RECONNECT_WAIT_S, connect_timeout=CONNECT_TIMEOUT_S,
                ping_interval=PING_INTERVAL_S, max_outstanding_pings=PINGS_OUTSTANDING_MAX,
                disconnected_cb=disconnected, reconnected_cb=reconnected, **callbacks)
            return client
        except (OSError, asyncio.TimeoutError, nats.errors.Error) as exc:
            log.warning("NATS at %s unreachable (%s); retrying", url, exc)
            await asyncio.sleep(FIRST_CONNECT_RETRY_S)


def event_stream_config() -> StreamConfig:
    return StreamConfig(
        name=EVENT_STREAM_NAME,
        subjects=[f"{EVENT_SUBJECT_ROOT}.>"],
        max_msgs_per_subject=LIVE_HISTORY_PER_USER_MAX,
        max_age=EVENT_HISTORY_AGE_S,
        duplicate_window=DUPLICATE_WINDOW_S,
        discard=DiscardPolicy.OLD,
        storage=StorageType.FILE,
        allow_direct=True,  # history is read by direct get, without creating consumers
    )


async def ensure_event_stream(nc: nats.NATS) -> None:
    """Create the event stream, or bring an existing one to our settings.

    Waits while JetStream cannot answer yet: regions joined by gateways elect
    their JetStream meta leader a few seconds after they start.
    """
    js = nc.jetstream()
    while True:
        try:
            try:
                await js.add_stream(event_stream_config())
            except BadRequestError:
                await js.update_stream(event_stream_config())  # exists with other settings: bring it to ours
            return
        except BadRequestError:
            raise  # our settings are refused: waiting cannot help
        except (nats.errors.Error, asyncio.TimeoutError) as exc:
            log.warning("JetStream not ready to create %s (%r); retrying", EVENT_STREAM_NAME, exc)
            await asyncio.sleep(FIRST_CONNECT_RETRY_S)
