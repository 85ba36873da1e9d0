"""OutboxRelay: publishes the live events their writers did not.

Each writing process publishes its own rows as it commits them
(actors/live_publisher.py); the relay takes the rows still in the outbox
after RELAY_GRACE_S: their writer was killed before the ack, NATS was down
or slow, or the process has no publisher. So every outbox row reaches the
stream at least once, and the stream keeps it once: each message carries
`Nats-Msg-Id` = epoch.user.first offset, so a row published again (by its
writer and the relay, after a crash between the ack and the delete, or by
two relays at once) is dropped by JetStream's duplicate window, and clients
drop any offset they hold already. While NATS is down rows wait in Postgres
and flow, in order, when it returns.

Rounds overlap: a round publishes and returns; its acks are awaited, and its
rows deleted, in the background while the next round reads what committed
meanwhile, so a row waits for one read, not for the previous round's acks and
delete. A user's rows keep their order on the wire (a later offset's row has
a higher id and goes in a later or the same round); if a round's acks fail its
rows are published again after later ones, and readers fill such gaps from
the stream's history (serve/live.py).
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import nats
import ray

from dailydoco.cluster import nats_io
from dailydoco.cluster.config import EngineConfig
from dailydoco.cluster.heap import freeze_startup_heap
from dailydoco.cluster.process_log import log_to_stderr
from dailydoco.storage.outbox import delete_relayed, pending_batches, stream_epoch
from dailydoco.storage.pool import DATABASE_ERRORS, open_pool

from .batching import wait_until_set
from .live_publisher import PUBLISH_ACK_TIMEOUT_S, PublishedRound, StreamPublisher
from .watch import LIVENESS_GROUPS, Watched

RELAY_ROWS_MAX = 2_000  # per round: one SELECT, that many publishes
RELAY_ROWS_IN_FLIGHT_MAX = 4_000  # published, awaiting acks and delete; the next read skips them
# A row's writer publishes it within milliseconds and deletes it once acked;
# one still here after this is the relay's (published twice at worst, and
# kept once). Counted from `written_at`, which precedes the commit: under the
# ledger benchmark's bulk load a group commits up to a second or so after
# its outbox rows, and its writer's loop is busy; with 1 s the relay published
# 10,000 to 15,000 rows a second time in each 120,000-purchase run (a fifth of
# all rows; 5 to 10 % of a core), with 3 s none.
RELAY_GRACE_S = 3.0
RELAY_POLL_S = 0.25  # so an orphaned row goes out within about 3.25 s
RELAY_RETRY_BACKOFF_S = 0.5  # NATS or Postgres unreachable: wait, keep the rows, try again
RELAY_POOL_SIZE = 3  # a round's read, and the deletes of earlier rounds beside it

log = logging.getLogger("dailydoco.relay")


class OutboxRelay:
    def __init__(self, pool: asyncpg.Pool, nc: nats.NATS, region: str, grace_s: float = RELAY_GRACE_S):
        self.pool = pool
        self.grace_s = grace_s
        self.nc = nc
        # Room for every row in flight plus a full round: publishing never stalls on it.
        self.publisher = StreamPublisher(nc, region, RELAY_ROWS_IN_FLIGHT_MAX + RELAY_ROWS_MAX)
        self.epoch: str | None = None
        self.relayed_rows = 0  # acknowledged by JetStream and deleted
        self._wake = asyncio.Event()
        self._in_flight: set[int] = set()  # outbox ids published and not yet deleted
        # Deleted while the current read ran: that read's snapshot may still hold them.
        self._deleted_during_read: set[int] = set()
        self._settling: set[asyncio.Task] = set()  # held so the loop does not drop them

    async def relay_once(self) -> int:
        """Publish one round of outbox rows; returns how many. Their acks and
        delete follow in the background (`_settle`)."""
        if self.epoch is None:
            self.epoch = await stream_epoch(self.pool)
        # Rows still in flight come back first (outbox order): read past them.
        self._deleted_during_read = set()
        read = await pending_batches(self.pool, RELAY_ROWS_MAX + len(self._in_flight), self.grace_s)
        taken = self._in_flight | self._deleted_during_read
        rows = [r for r in read if r.outbox_id not in taken][:RELAY_ROWS_MAX]
        if not rows:
            return 0
        published = await self.publisher.publish(self.epoch, rows)  # in outbox order
        ids = [r.outbox_id for r in rows]
        self._in_flight.update(ids)
        task = asyncio.get_running_loop().create_task(self._settle(published, ids))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return len(rows)

    async def _settle(self, published: PublishedRound, ids: list[int]) -> None:
        """Delete a round's rows once JetStream holds them all; if it does not
        say so in time, leave them to be published again."""
        try:
            await self.publisher.stored(published, PUBLISH_ACK_TIMEOUT_S)
            await delete_relayed(self.pool, ids)
            self.relayed_rows += len(ids)
            self._deleted_during_read.update(ids)
        except (*DATABASE_ERRORS, nats.errors.Error) as exc:
            log.warning("relay round of %d rows unconfirmed (%s); they stay in the outbox", len(ids), exc)
        finally:
            self._in_flight.difference_update(ids)
            self._wake.set()  # room for another round, or rows to take again

    async def run(self) -> None:
        while True:
            # Cleared before reading: a wake-up that lands during the round starts the next one.
            self._wake.clear()
            if len(self._in_flight) < RELAY_ROWS_IN_FLIGHT_MAX:
                try:
                    relayed = await self.relay_once()
                except (*DATABASE_ERRORS, nats.errors.Error) as exc:
                    log.warning("relay round failed (%s); rows stay in the outbox", exc)
                    await asyncio.sleep(RELAY_RETRY_BACKOFF_S)
                    continue
                if relayed == RELAY_ROWS_MAX:
                    continue  # more are waiting
            await wait_until_set(self._wake, RELAY_POLL_S)


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=10, concurrency_groups=LIVENESS_GROUPS)
class OutboxRelayActor(Watched):
    """The Ray shell: one per deployment, watched by the supervisor."""

    def __init__(self, index: int, config: EngineConfig, postgres_url: str, nats_url: str):
        log_to_stderr()
        self.keep_loop_ticking()
        self.config = config
        self.postgres_url = postgres_url
        self.nats_url = nats_url
        self.relay: OutboxRelay | None = None
        self._task: asyncio.Task | None = None

    async def ready(self) -> bool:
        if self._task is None:
            pool = await open_pool(self.postgres_url, min_size=1, max_size=RELAY_POOL_SIZE)
            self._task = asyncio.get_running_loop().create_task(self._run(pool))
            freeze_startup_heap()
        return True

    async def _run(self, pool: asyncpg.Pool) -> None:
        # Connects in the loop, not in ready(): the engine comes up while NATS
        # is down, and events wait in the outbox meanwhile.
        nc = await nats_io.connect(self.nats_url, name="dailydoco-relay")
        await nats_io.ensure_event_stream(nc)
        self.relay = OutboxRelay(pool, nc, self.config.region)
        await self.relay.run()

    def relayed_rows(self) -> int:
        return self.relay.relayed_rows if self.relay else 0

    def raise_if_broken(self) -> None:
        if self._task is not None and self._task.done():
            raise RuntimeError("relay loop ended") from self._task.exception()
