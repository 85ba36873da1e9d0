"""LivePublisher: a write's events go to NATS from the process that wrote them.

The outbox (storage/outbox.py) makes events durable with the write that
causes them. The process that wrote them then publishes the rows it appended
the moment the write commits, in commit order, and deletes them once
JetStream acknowledges them: a frame follows its write by one NATS hop, with
no Postgres notification and no relay read in between (measured in
bench/live_bench.py). Publishing never delays the write: `publish` only
queues, and a NATS that is down or slow only leaves rows in the outbox.

What a process fails to publish (NATS down, the process killed between its
commit and the ack, a full queue) the relay (actors/outbox_relay.py) finds in
the outbox after its grace period and publishes. Both set `Nats-Msg-Id` =
epoch.user.first offset, so a row published by both is kept once by
JetStream's duplicate window, and clients drop an offset they hold already.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import msgspec
import nats
import nats.js.errors

from dailydoco.cluster import nats_io
from dailydoco.cluster.config import EngineConfig
from dailydoco.protocol.live import EVENT_STREAM_NAME, encode_event_batch, user_subject, user_token
from dailydoco.storage.ledger import Ledger
from dailydoco.storage.outbox import OutboxRow, delete_relayed, stream_epoch
from dailydoco.storage.pool import DATABASE_ERRORS

PUBLISH_ACK_TIMEOUT_S = 5.0  # unacknowledged by then: left in the outbox, for the relay
PUBLISH_PENDING_MAX = 20_000  # rows awaiting their acks before publishing waits
QUEUED_ROWS_MAX = 50_000  # past this (NATS stalled), new rows are left to the relay
DELETE_GATHER_S = 0.005  # acknowledged rows gather this long into one DELETE
START_RETRY_S = 0.5

log = logging.getLogger("dailydoco.live_publisher")


class StreamRefused(nats.errors.Error):
    """JetStream did not store a published row: its answer was an error, or
    no stream took the subject (NATS's no-responders status)."""


class _PubAck(msgspec.Struct):
    """What JetStream answers a publish with: the stream that stored it, or an error."""

    stream: str = ""
    error: dict | None = None


_PUB_ACK = msgspec.json.Decoder(_PubAck)


class PublishedRound:
    """Rows published together; `StreamPublisher.stored` waits until
    JetStream holds every one of them."""

    __slots__ = ("reply_subjects", "waiting", "sealed", "acked")

    def __init__(self, acked: asyncio.Future):
        self.reply_subjects: list[str] = []
        self.waiting = 0  # published and not yet acknowledged
        self.sealed = False  # every row published: the round is stored once none waits
        self.acked = acked


class StreamPublisher:
    """Outbox rows onto the event stream, each with `Nats-Msg-Id` =
    epoch.user.first offset, in the order given; a round is stored once
    JetStream has acknowledged all of its rows.

    Why not nats-py's `publish_async`: it makes each message a request of its
    own (a semaphore, a token from os.urandom, a future with a callback, its
    ack parsed as JSON into a dataclass), 25 µs of CPU a message here against
    9 µs for a plain publish whose ack one shared subscription counts (20,000
    publishes, session 32). Here each row's reply subject names it, and the
    subscription finds its round by that name and counts it off. In the
    ledger benchmark's bulk load the commission chain then spent 64 to 69 µs
    of CPU a purchase against 77 to 80, and (b) ran 9,361 to 9,871
    purchases/s against 8,555 to 9,289 (three runs each of 60,000, session
    32). At 500 single purchases a second the chain's CPU did not move
    measurably: there its time goes to small groups' fixed costs."""

    def __init__(self, nc: nats.NATS, region: str, pending_max: int):
        self.nc = nc
        self.region = region
        self.pending_max = pending_max  # rows awaiting their acks before publishing waits
        self._inbox = nc.new_inbox()
        self._subscription = None
        self._round_of: dict[str, PublishedRound] = {}  # reply subject -> its round, until acked
        self._next_reply = 0
        self._room = asyncio.Event()  # set while fewer than pending_max rows await acks
        self._room.set()

    async def publish(self, epoch: str, rows: list[OutboxRow]) -> PublishedRound:
        """Publish rows, one after another so the wire keeps their order;
        pass the round to `stored`."""
        if self._subscription is None:
            self._subscription = await self.nc.subscribe(self._inbox + ".*", cb=self._on_ack)
        while len(self._round_of) >= self.pending_max:
            self._room.clear()
            await self._room.wait()
        published = PublishedRound(asyncio.get_running_loop().create_future())
        try:
            for r in rows:
                reply = f"{self._inbox}.{self._next_reply}"
                self._next_reply += 1
                self._round_of[reply] = published
                published.reply_subjects.append(reply)
                published.waiting += 1  # before the publish: its ack may come while a later one waits
                await self.nc.publish(
                    user_subject(self.region, r.user_id),
                    encode_event_batch(epoch, r.first_seq, r.created_at, r.events),
                    reply=reply,
                    headers={"Nats-Msg-Id": f"{epoch}.{user_token(r.user_id)}.{r.first_seq}",
                             "Nats-Expected-Stream": EVENT_STREAM_NAME},
                )
        except BaseException:
            self._forget(published)
            raise
        published.sealed = True
        if published.waiting == 0:
            published.acked.set_result(None)
        return published

    async def stored(self, published: PublishedRound, timeout_s: float) -> None:
        """Return once JetStream holds every row of the round; raises
        TimeoutError past `timeout_s` (acks lost with a connection, or a slow
        server) and StreamRefused if it refused one."""
        try:
            await asyncio.wait_for(published.acked, timeout_s)
        finally:
            self._forget(published)

    def _forget(self, published: PublishedRound) -> None:
        for reply in published.reply_subjects:
            self._round_of.pop(reply, None)
        self._note_room()

    def _note_room(self) -> None:
        if len(self._round_of) < self.pending_max:
            self._room.set()

    async def _on_ack(self, msg) -> None:
        published = self._round_of.pop(msg.subject, None)
        if published is None or published.acked.done():
            return  # its round timed out or failed already
        try:
            ack = _PUB_ACK.decode(msg.data)  # a no-responders status has no body, so fails here
            refused = ack.error or (None if ack.stream else "no stream named in the ack")
        except msgspec.DecodeError:
            refused = f"no stream took it ({msg.headers})"
        if refused is not None:
            published.acked.set_exception(StreamRefused(f"JetStream did not store a row: {refused}"))
            self._forget(published)
            return
        published.waiting -= 1
        if published.waiting == 0 and published.sealed:
            published.acked.set_result(None)
        self._note_room()


def publishing_ledger(pool: asyncpg.Pool, config: EngineConfig, nats_url: str, name: str) -> Ledger:
    """The Ledger of a writing actor, whose committed events it publishes itself."""
    live = LivePublisher(pool, nats_url, config.region, name)
    live.start()
    return Ledger(pool, config.hold_period_s, live.publish)


class LivePublisher:
    """One per process that writes the ledger; `publish` is the Ledger's
    `publish_events`."""

    def __init__(self, pool: asyncpg.Pool, nats_url: str, region: str, name: str):
        self.pool = pool
        self.nats_url = nats_url
        self.region = region
        self.name = name
        self.published_rows = 0  # acknowledged by JetStream
        self._queue: list[OutboxRow] = []
        self._queued = asyncio.Event()
        self._acked_ids: list[int] = []
        self._acked = asyncio.Event()
        self.ready = asyncio.Event()  # connected, stream and epoch known: publish() takes rows
        self._nc: nats.NATS | None = None
        self._tasks: set[asyncio.Task] = set()  # held so the loop does not drop them

    def start(self) -> None:
        """Connect and publish in the background: the process comes up while
        NATS is down, and its rows wait in the outbox meanwhile."""
        self._spawn(self._run())

    def publish(self, rows: list[OutboxRow]) -> None:
        """Queue a committed write's rows; call in commit order."""
        if not self.ready.is_set() or len(self._queue) >= QUEUED_ROWS_MAX:
            return  # the relay publishes them
        self._queue.extend(rows)
        self._queued.set()

    async def close(self) -> None:
        """Stop publishing (rows not yet acknowledged stay for the relay)."""
        self.ready.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._nc is not None:
            await self._nc.close()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Publishing stops, not the writes: from here the relay publishes
            # this process's rows, a grace period late.
            self.ready.clear()
            log.error("%s: live publishing stopped", self.name, exc_info=task.exception())

    async def _run(self) -> None:
        nc = self._nc = await nats_io.connect(self.nats_url, name=self.name)
        js = nc.jetstream()
        while True:
            try:
                # The relay creates the stream and owns its settings: wait for it, do not write them again.
                await js.stream_info(EVENT_STREAM_NAME)
                epoch = await stream_epoch(self.pool)
                break
            except nats.js.errors.NotFoundError:
                await asyncio.sleep(START_RETRY_S)  # at a first start, the relay is creating it
            except (*DATABASE_ERRORS, nats.errors.Error) as exc:
                log.warning("%s: live publishing waits (%s)", self.name, exc)
                await asyncio.sleep(START_RETRY_S)
        publisher = StreamPublisher(nc, self.region, PUBLISH_PENDING_MAX)
        self._spawn(self._delete_acknowledged())
        self.ready.set()
        while True:
            await self._queued.wait()
            self._queued.clear()
            rows, self._queue = self._queue, []
            try:
                published = await publisher.publish(epoch, rows)
            except (OSError, asyncio.TimeoutError, nats.errors.Error) as exc:
                log.warning("%s: %d rows not published (%s); the relay takes them", self.name, len(rows), exc)
                continue
            self._spawn(self._settle(publisher, published, [r.outbox_id for r in rows]))

    async def _settle(self, publisher: StreamPublisher, published: PublishedRound, ids: list[int]) -> None:
        try:
            await publisher.stored(published, PUBLISH_ACK_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError, nats.errors.Error) as exc:
            log.warning("%s: %d rows unconfirmed (%s); the relay takes them", self.name, len(ids), exc)
            return
        self.published_rows += len(ids)
        self._acked_ids.extend(ids)
        self._acked.set()

    async def _delete_acknowledged(self) -> None:
        """One DELETE for what was acknowledged meanwhile: not one per write."""
        while True:
            await self._acked.wait()
            await asyncio.sleep(DELETE_GATHER_S)
            self._acked.clear()
            ids, self._acked_ids = self._acked_ids, []
            try:
                await delete_relayed(self.pool, ids)
            except DATABASE_ERRORS as exc:
                # Left in the outbox: the relay publishes them again, and JetStream drops the copies.
                log.warning("%s: deleting %d published rows failed (%s)", self.name, len(ids), exc)
