"""CommissionChainActor: the Ray shell around one CommissionEngine."""

from __future__ import annotations

import asyncio

import msgspec
import ray

from dailydoco.cluster.config import EngineConfig
from dailydoco.cluster.heap import freeze_startup_heap
from dailydoco.cluster.process_log import log_to_stderr
from dailydoco.protocol import (
    PayoutRequest,
    PayoutResult,
    PurchaseOutcomeWire,
    RefundRequest,
    RefundResult,
    TransactionRequest,
)
from dailydoco.storage.pool import REQUEST_COMMAND_TIMEOUT_S, open_pool

from . import lifecycle
from .commission_core import CommissionEngine
from .lane import LaneAddress, LaneServer
from .live_publisher import publishing_ledger
from .refs import RayShardRouter
from .watch import LIVENESS_GROUPS, Watched


class PurchasesWire:
    """An engine's purchases across Ray: msgpack list[TransactionRequest] in,
    msgpack list[PurchaseOutcomeWire] out, for msgspec bytes cost a fraction
    of pickled Structs. One per actor instance: Ray pickles actor classes by
    value, and Decoders do not pickle."""

    def __init__(self):
        self._requests = msgspec.msgpack.Decoder(list[TransactionRequest])
        self._outcomes = msgspec.msgpack.Encoder()

    async def submit(self, engine: CommissionEngine, encoded_requests: bytes) -> bytes:
        outcomes = await engine.submit(self._requests.decode(encoded_requests))
        return self._outcomes.encode([
            PurchaseOutcomeWire(o.result) if o.error is None
            else PurchaseOutcomeWire(None, type(o.error).__name__, o.error.detail)
            for o in outcomes
        ])


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=1_000, concurrency_groups=LIVENESS_GROUPS)
class CommissionChainActor(Watched):
    """Writes purchases for the transaction ids that hash to it (see
    storage/sharding.py), so concurrent deliveries of one id meet here."""

    def __init__(self, index: int, config: EngineConfig, postgres_url: str, nats_url: str):
        log_to_stderr()
        self.keep_loop_ticking()
        self.index = index
        self.config = config
        self.postgres_url = postgres_url
        self.nats_url = nats_url
        self.engine: CommissionEngine | None = None
        self._init_lock = asyncio.Lock()
        self._purchases = PurchasesWire()
        self._lane = LaneServer(self.submit, ray.get_runtime_context().get_node_id())

    async def _engine(self) -> CommissionEngine:
        async with self._init_lock:
            if self.engine is None:
                pool = await open_pool(self.postgres_url, min_size=2, max_size=4,
                                       command_timeout_s=REQUEST_COMMAND_TIMEOUT_S)
                self.engine = CommissionEngine(
                    publishing_ledger(pool, self.config, self.nats_url, f"dailydoco-chain-{self.index}"),
                    RayShardRouter(self.config.namespace, self.config.shard_actors),
                )
                freeze_startup_heap()
        return self.engine

    async def submit(self, encoded_requests: bytes) -> bytes:
        return await self._purchases.submit(await self._engine(), encoded_requests)

    async def lane(self) -> LaneAddress:
        """Where the API replicas on this node call `submit` without Ray (actors/lane.py)."""
        await self._engine()
        return await self._lane.address()

    async def refund(self, transaction_id: str, request: RefundRequest) -> RefundResult:
        return await (await self._engine()).refund(transaction_id, request)

    async def payout(self, request: PayoutRequest) -> PayoutResult:
        """A payout, made here while the supervisor, which makes payouts, is
        silent (serve/ring_writes.py). The ledger takes a payout's slices
        one delivery at a time, whoever delivers it."""
        engine = await self._engine()
        return await lifecycle.payout(engine.ledger, engine.router, request)

    async def drained(self) -> bool:
        """Wait until every shard delivery posted so far has landed (tests, shutdown)."""
        await (await self._engine()).router.drained()
        return True

    async def ready(self) -> bool:
        await self._engine()
        return True
