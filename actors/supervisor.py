"""SupervisorActor: creates the engine's actors, watches them, restarts the dead.

A reconcile loop: the target is one live shard actor per index and one chain
actor per index; whatever is missing is created (and recovers its state from
the ledger itself). A death is noticed when Ray fails the supervisor's
standing call on that actor (actors/watch.py), a hang by a ping every few
seconds. After any restart every shard reloads, because a writer that died
between its commit and its delivery left a shard behind.

The supervisor itself is restarted by Ray (max_restarts=-1) and starts
itself, so that it comes back whole after a crash: nothing else would call
its start() then, and without it nothing would heal, sweep or checkpoint.
"""

from __future__ import annotations

import asyncio
import collections
import importlib.util
import logging

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from dailydoco.cluster.config import EngineConfig
from dailydoco.cluster.priority import run_as_background
from dailydoco.cluster.process_log import log_to_stderr
from dailydoco.protocol import (
    ClockLocked,
    ClockView,
    PayoutRequest,
    PayoutResult,
    RefundRequest,
    RefundResult,
    ServiceUnavailable,
)
from dailydoco.storage.ledger import Ledger
from dailydoco.storage.partitions import ensure_ledger_partitions
from dailydoco.storage.pool import REQUEST_COMMAND_TIMEOUT_S, open_pool
from dailydoco.storage.sharding import VSHARDS

from . import lifecycle
from .commission_chain import CommissionChainActor, PurchasesWire
from .commission_core import CommissionEngine
from .live_publisher import publishing_ledger
from .outbox_relay import OutboxRelayActor
from .recovery import checkpoint_all
from .refs import (
    RELAY_NAME,
    SUPERVISOR_NAME,
    VIDEO_PROCESSOR_NAME,
    RayShardRouter,
    chain_actor_name,
    shard_actor_name,
)
from .user_shard import UserShardActor
from .watch import LIVENESS_GROUPS, Pinged

# A death is seen at once (each actor's standing `watched` call fails); pings
# find an actor that lives but no longer answers. With pings twice a second
# as the only watch, the idle supervisor took 2.5 to 3.2 % of a core; 1.4 %
# now (one probe each, its sweeps and checkpoints included).
HANG_CHECK_INTERVAL_S = 5.0
PING_TIMEOUT_S = 5.0
APPROVAL_INTERVAL_S = 10.0
CHECKPOINT_INTERVAL_S = 30.0
# The ledger's partitions follow the clock as the approval sweep does; a
# check that finds nothing missing is two catalog reads.
PARTITION_CHECK_INTERVAL_S = 10.0
ACTOR_START_TIMEOUT_S = 120.0
START_RETRY_INTERVAL_S = 5.0
# A request that finds the supervisor restarting waits this long for it,
# then gets a 503 (retry with the same id): a start that adopts live actors
# takes about a second; one that must create them all can take minutes.
REQUEST_START_WAIT_S = 10.0

log = logging.getLogger("dailydoco.supervisor")


def video_processing_installed() -> bool:
    """The `video` extra (torch, PyAV) is optional: without it no processor runs."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "av"))


def live_cpu_nodes() -> list[str]:
    """The ids of the Ray nodes that are alive and offer CPUs, sorted: where
    the engine's actors and API replicas go."""
    return sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)


def dealt_node(position: int, chain_0_position: int, nodes: list[str], supervisor_node: str) -> str:
    """The node of the engine's actor at `position` of the deal (the order
    of the supervisor's specs), the actors dealt over `nodes` in turn from
    chain 0, which goes to the first node that is not the supervisor's.
    The supervisor writes purchases while every chain is silent
    (serve/ring_writes.py), so with one chain, the default on a head of 2
    or 3 cores, a lost host then leaves one of the two to write them; dealt
    from the first node, chain 0 shared the supervisor's host wherever Ray
    had put the supervisor there (it places it at random)."""
    ordered = [n for n in nodes if n != supervisor_node] + [n for n in nodes if n == supervisor_node]
    return ordered[(position - chain_0_position) % len(ordered)]


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=100, concurrency_groups=LIVENESS_GROUPS)
class SupervisorActor(Pinged):
    def __init__(self, config: EngineConfig, postgres_url: str, nats_url: str, redis_url: str):
        log_to_stderr()
        self.keep_loop_ticking()
        self.config = config
        self.postgres_url = postgres_url
        self.nats_url = nats_url
        self.redis_url = redis_url
        # Its periodic work (checkpoints, approval sweeps) can wait; requests cannot.
        run_as_background()
        self.restarts: dict[str, int] = {}
        self.moves = 0  # of chain 0, off the supervisor's node
        self.handles: dict[str, ray.actor.ActorHandle] = {}
        self.chain_nodes: dict[str, str | None] = {}  # where each chain was put, or found running (None: unknown)
        self.pool = None  # its own work's: the sweeps, checkpoints and partitions, whose statements run long
        # Requests' (payouts, and purchases and refunds while every chain is
        # silent): their statements give up on a stalled Postgres within
        # REQUEST_COMMAND_TIMEOUT_S, as the chains' do, not after the pool's 60 s.
        self.requests_ledger: Ledger | None = None
        self.router: RayShardRouter | None = None
        self._engine: CommissionEngine | None = None  # made at the first purchase or refund it writes
        self._purchases = PurchasesWire()
        self._loops: list[asyncio.Task] = []
        self._heal_lock = asyncio.Lock()
        self._payouts_in_hand: collections.Counter[str] = collections.Counter()
        self._payout_retries = lifecycle.PayoutRetries()
        self._start_tried = asyncio.Event()
        self._start_error: Exception | None = None
        # Ray runs an async actor's __init__ on the actor's event loop.
        self._starting = asyncio.get_running_loop().create_task(self._start_until_it_holds())

    def _specs(self):
        """(name, actor class, constructor arguments) of every actor the engine runs."""
        base = (self.config, self.postgres_url)
        for i in range(self.config.shard_actors):
            yield shard_actor_name(i), UserShardActor, (i, *base, self.redis_url, self.nats_url)
        for i in range(self.config.chain_actors):
            yield chain_actor_name(i), CommissionChainActor, (i, *base, self.nats_url)
        yield RELAY_NAME, OutboxRelayActor, (0, *base, self.nats_url)
        if video_processing_installed():
            from .video_processor import VideoProcessorActor

            yield VIDEO_PROCESSOR_NAME, VideoProcessorActor, (0, *base, self.nats_url)

    def _create(self, name, cls, args):
        # The video processor takes a GPU where the cluster has one: Ray then
        # places it on that node and gives it the device.
        gpus = 1 if name == VIDEO_PROCESSOR_NAME and ray.cluster_resources().get("GPU", 0) >= 1 else 0
        return cls.options(
            name=name, namespace=self.config.namespace, lifetime="detached", get_if_exists=True, num_gpus=gpus,
            scheduling_strategy="DEFAULT" if gpus else self._node_in_turn(name),
        ).remote(*args)

    def _lives(self, name: str) -> bool:
        """Whether an actor holds `name` now (a dead one no longer does)."""
        try:
            ray.get_actor(name, namespace=self.config.namespace)
        except ValueError:
            return False
        return True

    def _node_in_turn(self, name: str):
        """The node for `name`: the engine's actors dealt over the live nodes
        that offer CPUs, in turn, in the order of `_specs` (`dealt_node`:
        chain 0 off the supervisor's node). Ray places an actor that asks
        for no resources on a node at random, whatever the strategy but a
        hard node affinity (ray-project/ray#25360; SPREAD and a soft
        affinity were random here too, with two nodes): a machine could
        hold every shard and another none. Hard: should the node die
        before the actor is placed, its creation fails and the next heal
        deals it over the nodes left, as it does an actor whose node died
        under it. Actors stay where they are when nodes join, but for chain
        0 where every chain shares the supervisor's node (see
        _every_chain_beside_me)."""
        nodes = live_cpu_nodes()
        if len(nodes) < 2:
            self.chain_nodes.pop(name, None)
            return "DEFAULT"
        here = ray.get_runtime_context().get_node_id()
        names = [spec_name for spec_name, _, _ in self._specs()]
        position, chain_0_position = names.index(name), names.index(chain_actor_name(0))
        chains = set(self._chain_names())
        if name in chains and all(self.chain_nodes.get(chain) in (None, here) for chain in chains - {name}):
            # No other chain is known to run off the supervisor's node (a
            # supervisor that Ray restarted beside the chains it adopts,
            # the others lost): this one goes where the deal puts chain 0,
            # rather than beside them for _every_chain_beside_me to move one.
            position = chain_0_position
        node = dealt_node(position, chain_0_position, nodes, here)
        if name in chains:
            self.chain_nodes[name] = node
        return NodeAffinitySchedulingStrategy(node, soft=False)

    async def _start_until_it_holds(self) -> None:
        while True:
            try:
                await self._start()
                self._start_error = None
                return
            except Exception as exc:  # noqa: BLE001 - logged, kept for start(), and tried again
                self._start_error = exc
                log.exception("supervisor start failed; trying again in %.0f s", START_RETRY_INTERVAL_S)
            finally:
                self._start_tried.set()
            await asyncio.sleep(START_RETRY_INTERVAL_S)

    async def _start(self) -> None:
        """Create (or adopt) every actor, wait until each has recovered, then
        run the loops; each step is kept, so a retry goes on from where a
        failed try stopped."""
        if self.pool is None:
            self.pool = await open_pool(self.postgres_url, max_size=3)
            self.ledger = publishing_ledger(self.pool, self.config, self.nats_url, "dailydoco-supervisor")
            self.router = RayShardRouter(self.config.namespace, self.config.shard_actors)
        if self.requests_ledger is None:
            requests_pool = await open_pool(self.postgres_url, max_size=4, command_timeout_s=REQUEST_COMMAND_TIMEOUT_S)
            self.requests_ledger = Ledger(requests_pool, self.config.hold_period_s, self.ledger.publish_events)
        await self.keep_ledger_partitions()
        adopted = []
        for name, cls, args in self._specs():
            lives = self._lives(name)
            self.handles[name] = self._create(name, cls, args)
            if lives:
                adopted.append(name)
                if name in self._chain_names():
                    # Where it runs, not where the deal would have put it:
                    # the chains created after it are placed by it.
                    self.chain_nodes[name] = await self._node_of(name)
        await asyncio.wait_for(
            asyncio.gather(*(h.ready.remote() for h in self.handles.values())), ACTOR_START_TIMEOUT_S
        )
        # A shard that outlived the supervisor before this start may have
        # missed a delivery for good: a writer that died between its commit
        # and its delivery while no supervisor watched (heal would have
        # reloaded the survivors), or the last supervisor itself, which
        # writes approvals and payouts. Before session 38 only heal reloaded,
        # and a host lost with the supervisor and a chain on it left the
        # shards on other hosts short of the chain's last commit.
        shards = {shard_actor_name(i) for i in range(self.config.shard_actors)}
        await asyncio.gather(*(self.handles[name].reload.remote() for name in adopted if name in shards))
        self._loops = [asyncio.create_task(self._watch(name)) for name in self.handles] + [
            asyncio.create_task(self._every(HANG_CHECK_INTERVAL_S, self.heal)),
            asyncio.create_task(self._every(APPROVAL_INTERVAL_S, self.approve_due)),
            asyncio.create_task(self._every(APPROVAL_INTERVAL_S, self.finish_cut_short_payouts)),
            asyncio.create_task(self._every(CHECKPOINT_INTERVAL_S, self.checkpoint)),
            asyncio.create_task(self._every(PARTITION_CHECK_INTERVAL_S, self.keep_ledger_partitions)),
        ]

    async def start(self) -> list[str]:
        """Wait for the supervisor's first try at starting (it starts itself),
        and raise what failed it: `up` then fails at once rather than wait.
        The supervisor goes on trying meanwhile."""
        await self._start_tried.wait()
        if self._start_error is not None:
            raise self._start_error
        return list(self.handles)

    async def _started(self) -> None:
        """For requests: wait a little for a supervisor that is (re)starting."""
        try:
            await asyncio.wait_for(asyncio.shield(self._starting), REQUEST_START_WAIT_S)
        except asyncio.TimeoutError:
            raise ServiceUnavailable("the supervisor is starting; retry with the same id") from None

    async def _every(self, interval_s: float, step) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await step()
            except Exception:  # noqa: BLE001 - a failed step is retried next tick
                log.exception("supervisor step %s failed", step.__name__)

    async def _watch(self, name: str) -> None:
        """Heal the moment Ray reports `name` gone, whichever actor holds the name now."""
        while True:
            try:
                await self.handles[name].watched.remote()
                return  # a newer watcher took over (see Watched.watched)
            except RayActorError:
                pass  # dead, or out of reach for a moment: heal() restarts only what does not answer
            except Exception:  # noqa: BLE001 - watched again after a pause; the hang check runs meanwhile
                log.exception("watching %s failed", name)
                await asyncio.sleep(HANG_CHECK_INTERVAL_S)
                continue
            try:
                await self.heal()
            except Exception:  # noqa: BLE001 - as in _every: the next check retries
                log.exception("healing after %s went failed", name)
                await asyncio.sleep(HANG_CHECK_INTERVAL_S)

    async def heal(self) -> list[str]:
        """Recreate every actor that does not answer, and chain 0 where it
        must leave the supervisor's node (`_every_chain_beside_me`); return
        their names."""
        async with self._heal_lock:
            remade = []
            for name, cls, args in self._specs():
                try:
                    await asyncio.wait_for(self.handles[name].ping.remote(), PING_TIMEOUT_S)
                except (RayActorError, GetTimeoutError, asyncio.TimeoutError):
                    self.restarts[name] = self.restarts.get(name, 0) + 1
                    log.warning("actor %s is dead; restarting (restart #%d)", name, self.restarts[name])
                else:
                    if name != chain_actor_name(0) or not await self._every_chain_beside_me():
                        continue
                    self.moves += 1
                    log.warning("every chain runs on the supervisor's node while another node offers CPUs;"
                                " moving %s off it (move #%d)", name, self.moves)
                remade.append(name)
                try:
                    ray.kill(self.handles[name], no_restart=True)
                except Exception:  # noqa: BLE001 - it may be gone already
                    pass
                self.handles[name] = self._create(name, cls, args)
            if remade:
                await asyncio.gather(*(self.handles[n].ready.remote() for n in remade))
                # A writer that died (or was moved) mid-delivery left shards
                # behind the ledger.
                survivors = [
                    self.handles[shard_actor_name(i)]
                    for i in range(self.config.shard_actors)
                    if shard_actor_name(i) not in remade
                ]
                await asyncio.gather(*(h.reload.remote() for h in survivors))
            return remade

    async def _every_chain_beside_me(self) -> bool:
        """Whether every chain runs on the supervisor's node while another
        live node offers CPUs. The deal puts chain 0 off the supervisor's
        node (`dealt_node`), but a supervisor that Ray restarts lands where
        Ray chooses, and a node that joins later (a replacement host, or
        one back from a loss that left every actor on the head) is given
        nothing: with one chain, the default on a head of 2 or 3 cores,
        that host then held both writers of purchases, and its loss lost
        both. Moving chain 0 is a chain crash on purpose: its callers retry
        by name, and the ledger records each transaction id once."""
        here = ray.get_runtime_context().get_node_id()
        chain_nodes = await asyncio.gather(*(self._node_of(chain) for chain in self._chain_names()))
        # A chain that does not answer (None) is heal's to make again first.
        if set(chain_nodes) != {here}:
            return False
        # Off the event loop: with the head lost, ray.nodes() waits for its
        # control store, and the supervisor's requests would wait with it.
        nodes = await asyncio.to_thread(live_cpu_nodes)
        return len(nodes) >= 2 and here in nodes

    def _chain_names(self) -> list[str]:
        return [chain_actor_name(i) for i in range(self.config.chain_actors)]

    async def _node_of(self, name: str) -> str | None:
        """The node `name` runs on, by its own answer; None if it gives none in time."""
        try:
            return await asyncio.wait_for(self.handles[name].node_id.remote(), PING_TIMEOUT_S)
        except (RayActorError, GetTimeoutError, asyncio.TimeoutError):
            return None

    async def approve_due(self) -> int:
        return await lifecycle.approve_due(self.ledger, self.router)

    async def keep_ledger_partitions(self, ahead_s: int = 0) -> list[str]:
        async with self.pool.acquire() as conn:
            return await ensure_ledger_partitions(conn, ahead_s)

    async def checkpoint(self) -> int:
        return await checkpoint_all(self.pool, list(range(VSHARDS)))

    async def payout(self, request: PayoutRequest) -> PayoutResult:
        await self._started()
        self._payouts_in_hand[request.payout_id] += 1
        try:
            return await lifecycle.payout(self.requests_ledger, self.router, request)
        finally:
            self._payouts_in_hand[request.payout_id] -= 1
            if not self._payouts_in_hand[request.payout_id]:
                del self._payouts_in_hand[request.payout_id]

    async def _commission_engine(self) -> CommissionEngine:
        """Purchases and refunds are the chains' to write, and the
        supervisor's while every chain is silent (serve/ring_writes.py): with
        one chain, the default on two or three cores, there is no other. An
        engine over the supervisor's requests ledger and shard router; the
        ledger records a transaction id once, whichever actor writes it."""
        await self._started()
        if self._engine is None:
            self._engine = CommissionEngine(self.requests_ledger, self.router)
        return self._engine

    async def submit(self, encoded_requests: bytes) -> bytes:
        return await self._purchases.submit(await self._commission_engine(), encoded_requests)

    async def refund(self, transaction_id: str, request: RefundRequest) -> RefundResult:
        return await (await self._commission_engine()).refund(transaction_id, request)

    async def drained(self) -> bool:
        """Wait until every shard delivery it has posted so far has landed (tests)."""
        if self.router is not None:
            await self.router.drained()
        return True

    async def finish_cut_short_payouts(self) -> list[str]:
        # Those in hand are left to their deliveries: taking slices in turns
        # with one would only slow it, and turn its "created" into "replayed".
        return await lifecycle.finish_cut_short_payouts(
            self.ledger, self.router, self._payouts_in_hand, self._payout_retries)

    async def advance_clock(self, seconds: int) -> ClockView:
        await self._started()
        if not self.config.clock_adjustable:
            raise ClockLocked("this deployment runs on wall-clock time (set DD_CLOCK_ADJUSTABLE=1 to allow moves)")
        # Made before the move, so that no purchase after it lands in the
        # default partition.
        await self.keep_ledger_partitions(ahead_s=seconds)
        await self.ledger.advance_clock(seconds)
        await self.approve_due()
        now, offset_s = await self.ledger.engine_now()
        return ClockView(now=now, offset_s=offset_s)

    async def placement(self) -> dict[str, str]:
        """The Ray node of each of the engine's actors, by actor name, the
        supervisor's own included."""
        await self._started()
        names = list(self.handles)
        nodes = await asyncio.gather(*(self.handles[name].node_id.remote() for name in names))
        return {SUPERVISOR_NAME: ray.get_runtime_context().get_node_id(), **dict(zip(names, nodes, strict=True))}

    def restart_counts(self) -> dict[str, int]:
        return dict(self.restarts)

    def chain_moves(self) -> int:
        return self.moves

    async def ready(self) -> bool:
        """Once started, for a replica that found it silent (SilenceWatch)."""
        await self._started()
        return True
