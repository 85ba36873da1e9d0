"""The HTTP API: an ASGI app over the engine's actors.

Reads of one user go to that user's shard actor (memory); writes go to the
commission chain or shard actors, which acknowledge only after commit. Every
error leaves as RFC 9457 problem+json, and nothing is written for a rejected
request.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import operator
import time
from collections.abc import Mapping

import asyncpg
import msgspec
import nats
import redis.asyncio as redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from ray.exceptions import RayTaskError, TaskCancelledError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, Router
from starlette.websockets import WebSocket

from dailydoco import protocol as p
from dailydoco.actors.batching import MicroBatcher
from dailydoco.actors.lane import LanedActorRef
from dailydoco.actors.refs import SUPERVISOR_NAME, ActorRef, SilenceWatch, chain_actor_name, shard_actor_name
from dailydoco.cluster import nats_io
from dailydoco.cluster.config import EngineConfig
from dailydoco.cluster.heap import freeze_startup_heap
from dailydoco.protocol.live import TOKEN_REVOCATION_SUBJECT, CloseCode, TokenRevoked
from dailydoco.storage.balance_views import BalanceViewReader
from dailydoco.storage.ledger import Ledger
from dailydoco.storage.outbox import BACKLOG_COUNT_MAX, backlog as outbox_backlog, stream_epoch
from dailydoco.storage.partitions import partition_backlog
from dailydoco.storage.pool import (
    DATABASE_ERRORS,
    REQUEST_COMMAND_TIMEOUT_S,
    answered_within,
    connection_lost,
    open_pool,
    unavailable_for,
)
from dailydoco.storage.revocations import revocations_since, revoke_tokens
from dailydoco.storage.sharding import actor_of_vshard, chain_of_transaction, vshard_of

from .bodies import ascii_decimal, json_response, path_id, read_body
from .auth import Secrets, TokenAuthority, require_admin, require_reader_of, require_service
from .openapi import openapi_document
from .live import CLOSE_REASON_BYTES_MAX, LiveGateway
from .live_page import live_page_routes
from .metrics import (
    CONTENT_TYPE as METRICS_CONTENT_TYPE,
    EngineBacklog,
    EngineBacklogReader,
    ReplicaMetrics,
    backlog_exposition,
)
from .videos import VideoJobs
from .rate_limit import LocalRateLimiter, RateLimiter
from .ring_writes import RingWrites
from .shard_reads import ShardReads

BATCH_BODY_BYTES_MAX = 4 * 1024 * 1024  # 5,000 purchases at ~200 bytes each, with room
# GCRA limits (requests per second, burst): per user token across the cluster;
# per API key in each replica.
RATE_LIMIT_SERVICE_PER_REPLICA = (5_000, 10_000)
RATE_LIMIT_USER = (50, 100)
DEPENDENCY_CHECK_TIMEOUT_S = 2.0
AFTER_NATS_RECONNECT_RETRY_S = 0.5  # reloading what a NATS outage hid, while Postgres is away too
REDIS_CONNECTIONS_MAX = 32  # per replica: a round trip takes well under a millisecond
POSTGRES_CONNECTIONS_MAX = 4  # per replica: its own reads (commission pages, graphs) and revocations
CHAIN_CALL_TRANSACTIONS_MAX = 4_000  # matches the chain's group-commit size
CHAIN_CALLS_IN_FLIGHT_MAX = 4  # per chain: bulk calls overlap, so one commits while others compute
# Single purchases gather behind the call in flight rather than overlap it:
# on this 2-core machine that halved POST latency at 500/s (p50 33 -> 11-15 ms).
CHAIN_CALL_OVERLAP_ITEMS_MIN = CHAIN_CALL_TRANSACTIONS_MAX // 4
# But not for longer than this: a call in flight so long is stuck (its chain
# lost, Postgres stalled; a call takes milliseconds), and what gathered
# behind it goes in a call of its own, to be made or given up on by its own
# bounds. Before session 51, a purchase gathered behind a call stuck in a
# Postgres stall waited for that call to fail (20 s), then for Postgres.
CHAIN_CALL_OVERLAP_AFTER_S = 1.0
ACTOR_LOOKUP_AT_START_WAIT_S = 10.0  # each; the supervisor makes the actors before the API starts

_ENCODER = msgspec.json.Encoder()
_REQUESTS_ENCODER = msgspec.msgpack.Encoder()
_OUTCOMES_DECODER = msgspec.msgpack.Decoder(list[p.PurchaseOutcomeWire])
_REVOCATION_DECODER = msgspec.msgpack.Decoder(TokenRevoked)
log = logging.getLogger("dailydoco.serve")


def _problem(error: p.EngineError, instance: str, headers: Mapping[str, str] | None = None) -> Response:
    headers = dict(headers or {})
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    return Response(
        _ENCODER.encode(error.problem(instance=instance)),
        status_code=error.status,
        media_type=p.PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


def _raised(exc: BaseException) -> BaseException:
    """What was raised, here or in an actor (through Ray's wrapping)."""
    return getattr(exc, "cause", exc) if isinstance(exc, RayTaskError) else exc


def _engine_error(exc: BaseException) -> p.EngineError | None:
    """The EngineError raised, here or in an actor."""
    raised = _raised(exc)
    return raised if isinstance(raised, p.EngineError) else None


# What the API serves: (method, path, the EngineApi handler, the route's name
# in metrics). The hottest first: Starlette, and Serve naming the route,
# each try the patterns in order on every request. serve/openapi.py documents
# each (a test holds the two to each other).
API_ROUTES = [
    ("POST", "/v1/transactions", "transaction", "transaction"),
    ("GET", "/v1/users/{user_id}/balance", "balance", "balance"),
    ("POST", "/v1/transactions:batch", "transaction_batch", "transaction_batch"),
    ("POST", "/v1/users", "register", "register"),
    ("GET", "/v1/users/{user_id}", "get_user", "get_user"),
    ("POST", "/v1/users/{user_id}/tokens", "issue_token", "issue_token"),
    ("POST", "/v1/users/{user_id}/tokens:revoke", "revoke_user_tokens", "revoke_tokens"),
    ("GET", "/v1/users/{user_id}/network", "network", "network"),
    ("GET", "/v1/users/{user_id}/commissions", "commissions", "commissions"),
    ("POST", "/v1/transactions/{transaction_id}/refunds", "refund", "refund"),
    ("POST", "/v1/payouts", "payout", "payout"),
    ("GET", "/v1/payouts/{payout_id}", "get_payout", "get_payout"),
    ("POST", "/v1/admin/clock", "advance_clock", "advance_clock"),
    ("GET", "/v1/admin/house", "house", "house"),
    ("POST", "/v1/videos", "videos.create", "create_video_job"),
    ("GET", "/v1/videos/{job_id}", "videos.get", "get_video_job"),
    ("GET", "/v1/videos/{job_id}/files/{path:path}", "videos.file", "get_video_job_file"),
    ("GET", "/healthz", "healthz", "healthz"),
    ("GET", "/readyz", "readyz", "readyz"),
    ("GET", "/metrics", "metrics", "metrics"),
    ("GET", "/openapi.json", "openapi", "openapi"),
]


class EngineApi:
    """One Serve replica's state and handlers. A replica serves either the
    HTTP API (`asgi`) or the live gateway's sockets (`live_asgi`,
    `live_gateway=True`), never both: on this machine's two cores a frame
    queued behind requests in a busy API loop, so the sockets have a
    deployment of their own and the API can run several replicas
    (cluster/system.py)."""

    def __init__(self, config: EngineConfig, postgres_url: str, redis_url: str, nats_url: str, secrets: Secrets,
                 live_gateway: bool = False):
        self.config = config
        self.live_gateway = live_gateway
        self.postgres_url = postgres_url
        self.redis_url = redis_url
        self.nats_url = nats_url
        self.auth = TokenAuthority(secrets)
        ns = config.namespace
        self.shards = [ActorRef(shard_actor_name(i), ns) for i in range(config.shard_actors)]
        # One watch per shard for its reads and its registrations: a shard
        # that either finds silent is silent to both.
        shard_silences = [SilenceWatch(shard, "its reads go to the ledger, its registrations to the next shard")
                          for shard in self.shards]
        self.shard_reads = [ShardReads(silence, lambda: self.pool) for silence in shard_silences]
        self.supervisor = ActorRef(SUPERVISOR_NAME, ns)
        self.live = LiveGateway(self.auth, config.live_origins, lambda: self.nats, lambda: self.pool)
        self.videos = VideoJobs(self, config.video_dir)
        self._deps_lock = asyncio.Lock()
        self._deps_ready = False
        self.pool: asyncpg.Pool | None = None
        self.redis: redis.Redis | None = None
        self.registry = CollectorRegistry()
        self.requests_total = Counter(
            "dailydoco_http_requests_total", "HTTP requests", ["route", "status"], registry=self.registry)
        self.latency = Histogram(
            "dailydoco_http_request_seconds", "HTTP request latency", ["route"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.purchases_total = Counter(
            "dailydoco_purchases_total", "Purchases by outcome", ["outcome"], registry=self.registry)
        # How often balance reads find a live view in Redis (else the shard
        # answers, or the ledger where the shard does not in time).
        balance_reads = Counter("dailydoco_balance_reads_total", "Balance reads by where the answer came from",
                                ["source"], registry=self.registry)
        self.backlog = EngineBacklogReader(self._read_backlog, DEPENDENCY_CHECK_TIMEOUT_S)
        self.balance_reads = {source: balance_reads.labels(source) for source in ("redis_view", "shard", "ledger")}
        # Writes of a silent actor that another made (serve/ring_writes.py).
        rerouted = Counter("dailydoco_writes_rerouted_total",
                           "Writes sent to another actor, theirs silent: purchases or a refund to another chain"
                           " or the supervisor, a registration to another shard, a payout to a chain", ["actors"],
                           registry=self.registry)
        # Purchases go to a chain on this node over its lane (actors/lane.py):
        # a Ray call costs both sides far more CPU.
        chain_calls = Counter("dailydoco_chain_submit_calls_total",
                              "Calls carrying purchases to the commission chains, by the way they went:"
                              " over a chain's lane, or by Ray (a chain on another node, or its lane not up)",
                              ["way"], registry=self.registry)
        self.chains = [LanedActorRef(chain_actor_name(i), ns, "submit", lambda way: chain_calls.labels(way).inc())
                       for i in range(config.chain_actors)]
        chain_silences = [SilenceWatch(chain, "its writes go to the next chain, or the supervisor")
                          for chain in self.chains]
        supervisor_silence = SilenceWatch(self.supervisor, "payouts go to the chains, and silent chains' writes wait")
        # Purchases and refunds are the chains' to write, and the supervisor's
        # while every chain is silent; payouts the other way round.
        self.chain_writes = RingWrites(chain_silences, rerouted.labels("chains").inc,
                                       last_resorts=[supervisor_silence])
        self.registrations = RingWrites(shard_silences, rerouted.labels("shards").inc)
        self.payouts = RingWrites([supervisor_silence], rerouted.labels("supervisor").inc,
                                  last_resorts=chain_silences)
        self.chain_batchers = [self._chain_batcher(index) for index in range(len(self.chains))]
        if live_gateway:
            Gauge("dailydoco_live_connections", "Live sockets open on this replica",
                  registry=self.registry).set_function(lambda: len(self.live.connections))

    def connect_in_background(self) -> None:
        """Connect to Postgres, Redis and NATS now, on the running loop, not on
        the first request: a live socket needs NATS at once, and the first
        request after a start should not pay for the pool. Failures are
        logged here and tried again on the next request."""

        def report(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None:
                log.warning("connecting at start failed (retried on the next request): %r", task.exception())

        self._connect_task = asyncio.get_running_loop().create_task(self._deps())
        self._connect_task.add_done_callback(report)
        if not self.live_gateway:
            self._lookups_task = asyncio.get_running_loop().create_task(self._look_up_actors())

    async def _look_up_actors(self) -> None:
        """Look every actor up now, while Ray's control store answers. Looking
        an actor up asks the store, on the head; a handle got before reaches
        its actor on a live node without it. So where the head is lost, an
        actor this replica had not yet called was out of its reach until a
        new head was up (session 54: in 3 of 10 runs of
        test_head_node_loss.py, a registration whose ring had only the
        worker's own shard left, which the worker's replica had never
        called, waited past the client's 15 s)."""
        for actor in (*self.shards, *self.chains, self.supervisor):
            try:
                await actor.handle(ACTOR_LOOKUP_AT_START_WAIT_S)
            except Exception as exc:  # noqa: BLE001 - not made yet, or Ray slow: looked up on first use instead
                log.info("%s not looked up at start (%r); it will be on first use", actor.name, exc)

    async def _deps(self) -> None:
        if self._deps_ready:
            return
        async with self._deps_lock:
            if not self._deps_ready:
                if self.pool is None:  # kept when a later step failed: the retry reuses it
                    # Every statement here is a request's (a page of reads, a
                    # revocation) or bounded by its caller (readiness, metrics).
                    self.pool = await open_pool(self.postgres_url, max_size=POSTGRES_CONNECTIONS_MAX,
                                                command_timeout_s=REQUEST_COMMAND_TIMEOUT_S)
                    self.ledger = Ledger(self.pool, self.config.hold_period_s)
                await self._load_revocations()
                if self.redis is None:
                    self._open_redis()
                if not self.live_gateway:
                    await self._open_api_dependencies()
                # NATS carries revocation notices to every replica and the live
                # events to the gateway's sockets: connect in the background, so
                # a NATS outage shows in /readyz instead of stalling every request.
                self.nats = None
                self._nats_task = asyncio.get_running_loop().create_task(self._connect_nats())
                self._deps_ready = True
                freeze_startup_heap()

    def _open_redis(self) -> None:
        """Redis, and this replica's series published into the deployment's
        /metrics through it (the live gateway's too, though it serves no
        /metrics itself)."""
        # A bounded pool that queues: under overload, requests wait their
        # turn for a connection instead of failing (redis-py's default
        # pool raises past 100 connections).
        self.redis = redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
            self.redis_url, max_connections=REDIS_CONNECTIONS_MAX, timeout=DEPENDENCY_CHECK_TIMEOUT_S,
            socket_timeout=DEPENDENCY_CHECK_TIMEOUT_S))
        self.replica_metrics = ReplicaMetrics(
            self.registry, self.redis, f"{self.config.namespace}:{self.config.region}")
        self._metrics_task = asyncio.get_running_loop().create_task(self.replica_metrics.publish_forever())

    async def _open_api_dependencies(self) -> None:
        """What only the HTTP API uses: balance views and rate limits (Redis)."""
        self.balance_views = BalanceViewReader(self.redis, await stream_epoch(self.pool))
        self.limiter = RateLimiter(self.redis)
        self.local_limiter = LocalRateLimiter()

    async def _connect_nats(self) -> None:
        name = "dailydoco-live" if self.live_gateway else "dailydoco-api"
        self.nats = await nats_io.connect(self.nats_url, name=name, reconnected_cb=self._on_nats_reconnected)
        await self.nats.subscribe(TOKEN_REVOCATION_SUBJECT, cb=self._on_revocation_notice)
        if self.live_gateway:
            await self.live.follow_video_progress(self.nats)

    async def _on_nats_reconnected(self) -> None:
        """Revocation notices sent while NATS was away are lost to this
        replica, and events published meanwhile reached none of its sockets:
        reload the revocations, and have every socket catch up. Retried
        while Postgres is unreachable (an outage of both at once): a token
        revoked meanwhile would otherwise stay good here until NATS next
        reconnects, and sockets would miss those events until their next."""
        while True:
            try:
                await self._load_revocations()
                await self.live.on_nats_reconnected()
                return
            except DATABASE_ERRORS as exc:
                if not connection_lost(exc):
                    raise
                log.warning("after a NATS reconnect, Postgres is unreachable (%r); retrying", exc)
                await asyncio.sleep(AFTER_NATS_RECONNECT_RETRY_S)

    # --- token revocation ---------------------------------------------------
    # Postgres holds each revocation; a NATS notice tells every replica at
    # once; a replica reloads the table at start and after a NATS reconnect.

    async def _load_revocations(self) -> None:
        oldest_live_token = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=p.TOKEN_TTL_S_MAX)
        for user_id, before in (await revocations_since(self.pool, oldest_live_token)).items():
            self._apply_revocation(user_id, before)

    def _apply_revocation(self, user_id: str, revoked_before: dt.datetime) -> None:
        if self.auth.revoke(user_id, revoked_before):
            self.live.close_revoked(user_id, revoked_before)

    async def _on_revocation_notice(self, msg) -> None:
        try:
            notice = _REVOCATION_DECODER.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.error("undecodable revocation notice")
            return
        self._apply_revocation(notice.user_id, notice.revoked_before)

    async def revoke_user_tokens(self, request: Request) -> Response:
        """Sign a user out everywhere: a service, or the user themself."""
        user_id = path_id(request, "user_id")
        require_reader_of(await self.principal(request), user_id)
        if await self._shard_reads_of(user_id).user(user_id) is None:
            raise p.NotFound(f"user {user_id!r} does not exist")
        before = await revoke_tokens(self.pool, user_id, dt.datetime.now(dt.timezone.utc))
        self._apply_revocation(user_id, before)
        # Recorded and in force here; a replica that misses the notice reloads
        # the table when it reconnects. A retry is safe: revocations only move forward.
        nc = self.nats
        if nc is None or not nc.is_connected:
            raise p.ServiceUnavailable("revocation recorded, but NATS is down so not every replica has it yet; retry")
        try:
            await nc.publish(TOKEN_REVOCATION_SUBJECT, msgspec.msgpack.encode(TokenRevoked(user_id, before)))
            await nc.flush(timeout=DEPENDENCY_CHECK_TIMEOUT_S)
        except (nats.errors.Error, asyncio.TimeoutError) as exc:
            raise p.ServiceUnavailable(f"revocation recorded, but its notice was not sent ({exc}); retry") from exc
        return json_response(p.TokenRevocationView(user_id=user_id, revoked_before=before))

    async def live_socket(self, websocket: WebSocket) -> None:
        await self._deps()
        await self.live.handle(websocket)

    def _shard_index(self, user_id: str) -> int:
        return actor_of_vshard(vshard_of(user_id), len(self.shards))

    def _shard_reads_of(self, user_id: str) -> ShardReads:
        return self.shard_reads[self._shard_index(user_id)]

    # --- plumbing ------------------------------------------------------------

    def route(self, path: str, handler, methods: list[str], name: str) -> Route:
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            try:
                await self._deps()
                response = await handler(request)
            except Exception as exc:  # noqa: BLE001 - every failure leaves as problem+json
                error = _engine_error(exc)
                if error is None and isinstance(exc, TaskCancelledError):
                    # Serve cancelled this request (its client is gone) while it
                    # waited on Ray: no one will read the answer, and nothing failed.
                    error = p.ServiceUnavailable("the request was cancelled before it was served")
                elif error is None and (error := unavailable_for(_raised(exc))) is not None:
                    # A read, this replica's or an actor's: Postgres down or
                    # restarting, a connection cut, or out of room.
                    log.warning("%s on %s: %r", error.detail, request.url.path, exc)
                elif error is None:
                    log.exception("unhandled error on %s", request.url.path)
                    error = p.InternalError("the server failed to handle this request; it is logged")
                response = _problem(error, request.url.path)
            self.requests_total.labels(name, str(response.status_code)).inc()
            self.latency.labels(name).observe(time.perf_counter() - started)
            return response

        return Route(path, endpoint, methods=methods, name=name)

    async def principal(self, request: Request) -> str:
        """Who calls (see serve/auth.py), once within their rate limit."""
        principal = self._authenticate(request)
        await self._admit(principal)
        return principal

    def _authenticate(self, request: Request) -> str:
        return self.auth.principal(request.headers.get("authorization"), request.headers.get("x-api-key"))

    async def _admit(self, principal: str, read_keys: tuple[str, ...] = ()) -> list[bytes | None] | None:
        """Rate-limit a caller. A user's limit is checked in Redis, and
        `read_keys` are read in the same round trip: their values come back
        (None for a service, whose limit is this replica's own)."""
        values = None
        if principal.startswith("user:"):
            per_second, burst = RATE_LIMIT_USER
            try:
                wait_s, values = await self.limiter.retry_after_s(principal, per_second, burst, read_keys)
            except (redis.RedisError, OSError) as exc:
                raise p.ServiceUnavailable(f"the rate limiter (Redis) did not answer: {exc}",
                                           retry_after_s=1.0) from exc
        else:
            per_second, burst = RATE_LIMIT_SERVICE_PER_REPLICA
            wait_s = self.local_limiter.retry_after_s(principal, per_second, burst)
        if wait_s > 0:
            raise p.RateLimited(f"rate limit of {per_second}/s exceeded; retry in {wait_s:.3f} s", retry_after_s=wait_s)
        return values

    # --- users ---------------------------------------------------------------

    async def register(self, request: Request) -> Response:
        require_service(await self.principal(request))
        body = await read_body(request, p.RegisterUserRequest)
        view: p.RegistrationResult = await self.registrations.call(self._shard_index(body.user_id), "register", body)
        return json_response(view, 201 if view.status == "created" else 200)

    async def get_user(self, request: Request) -> Response:
        user_id = path_id(request, "user_id")
        require_reader_of(await self.principal(request), user_id)
        view = await self._shard_reads_of(user_id).user(user_id)
        if view is None:
            raise p.NotFound(f"user {user_id!r} does not exist")
        return json_response(view)

    async def issue_token(self, request: Request) -> Response:
        require_service(await self.principal(request))
        user_id = path_id(request, "user_id")
        body = await read_body(request, p.TokenRequest)
        if await self._shard_reads_of(user_id).user(user_id) is None:
            raise p.NotFound(f"user {user_id!r} does not exist")
        token, expires_at = self.auth.issue(user_id, body.ttl_s)
        return json_response(p.TokenView(token=token, expires_at=expires_at), 201)

    async def balance(self, request: Request) -> Response:
        """From the shard's view in Redis while its lease lives (one round trip,
        no Ray call; storage/balance_views.py), else from the shard itself,
        else from the ledger where the shard does not answer (serve/shard_reads.py)."""
        user_id = path_id(request, "user_id")
        principal = self._authenticate(request)
        require_reader_of(principal, user_id)
        shard_index = self._shard_index(user_id)
        # A user's rate limit and the view share one round trip to Redis.
        values = await self._admit(principal, self.balance_views.keys(user_id, shard_index))
        if values is not None:
            body = self.balance_views.body(values)
        else:
            body = await self.balance_views.read(user_id, shard_index)
        if body is not None:
            self.balance_reads["redis_view"].inc()
            return Response(body, media_type="application/json")
        view, source = await self.shard_reads[shard_index].balance(user_id)
        self.balance_reads[source].inc()
        if view is None:
            raise p.NotFound(f"user {user_id!r} does not exist")
        return json_response(view)

    async def network(self, request: Request) -> Response:
        user_id = path_id(request, "user_id")
        require_reader_of(await self.principal(request), user_id)
        depth = _int_param(request, "depth", p.NETWORK_GRAPH_DEPTH_DEFAULT, 1, p.NETWORK_GRAPH_DEPTH_MAX)
        stats = await self._shard_reads_of(user_id).network_stats(user_id)
        if stats is None:
            raise p.NotFound(f"user {user_id!r} does not exist")
        edges, truncated = await self.ledger.network_graph(user_id, depth, p.NETWORK_GRAPH_NODES_MAX)
        nodes = [p.GraphNode(user_id=user_id, level=0)] + [p.GraphNode(user_id=u, level=lvl) for _, u, lvl in edges]
        return json_response(p.NetworkView(
            stats=stats, nodes=nodes, edges=[p.GraphEdge(referrer_id=r, user_id=u) for r, u, _ in edges],
            truncated=truncated))

    async def commissions(self, request: Request) -> Response:
        user_id = path_id(request, "user_id")
        require_reader_of(await self.principal(request), user_id)
        status = request.query_params.get("status")
        if status is not None and status not in p.COMMISSION_STATUSES:
            raise p.InvalidRequest(f"status {status!r} is not one of {', '.join(p.COMMISSION_STATUSES)}")
        limit = _int_param(request, "limit", p.COMMISSIONS_PAGE_DEFAULT, 1, p.COMMISSIONS_PAGE_MAX)
        page = await self.ledger.commissions_page(user_id, status, request.query_params.get("cursor"), limit)
        return json_response(page)

    # --- transactions ----------------------------------------------------------

    async def _submit(self, requests: list[p.TransactionRequest]) -> list[tuple]:
        """Split by chain actor (by transaction id), submit concurrently, merge in order."""
        by_chain: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            by_chain.setdefault(chain_of_transaction(r.transaction_id, len(self.chains)), []).append(i)
        replies = await asyncio.gather(*(
            self.chain_batchers[c].submit([requests[i] for i in idx]) for c, idx in by_chain.items()
        ))
        outcomes: list = [None] * len(requests)
        for idx, reply in zip(by_chain.values(), replies, strict=True):
            for i, outcome in zip(idx, reply, strict=True):
                outcomes[i] = outcome
        for result, error in outcomes:
            self.purchases_total.labels(result.status if result else "failed").inc()
        return outcomes

    def _chain_batcher(self, index: int) -> MicroBatcher:
        """Concurrent requests to one chain share a Ray call (and its group commit)."""

        async def send(requests: list[p.TransactionRequest]) -> list[tuple]:
            encoded = _REQUESTS_ENCODER.encode(requests)
            reply = _OUTCOMES_DECODER.decode(await self.chain_writes.call(index, "submit", encoded))
            return [(o.result, None if o.error is None else p.error_named(o.error, o.detail)) for o in reply]

        return MicroBatcher(send, CHAIN_CALL_TRANSACTIONS_MAX, CHAIN_CALLS_IN_FLIGHT_MAX, CHAIN_CALL_OVERLAP_ITEMS_MIN,
                            CHAIN_CALL_OVERLAP_AFTER_S)

    async def transaction(self, request: Request) -> Response:
        require_service(await self.principal(request))
        body = await read_body(request, p.TransactionRequest)
        [(result, error)] = await self._submit([body])
        if error is not None:
            raise error
        return json_response(result, 201 if result.status == "created" else 200)

    async def transaction_batch(self, request: Request) -> Response:
        require_service(await self.principal(request))
        body = await read_body(request, p.TransactionBatchRequest, BATCH_BODY_BYTES_MAX)
        outcomes = await self._submit(body.transactions)
        items, created, replayed = [], 0, 0
        for req, (result, error) in zip(body.transactions, outcomes, strict=True):
            if error is not None:
                items.append(p.BatchItemResult(transaction_id=req.transaction_id, problem=error.problem()))
            else:
                created += result.status == "created"
                replayed += result.status == "replayed"
                items.append(p.BatchItemResult(transaction_id=req.transaction_id, result=result))
        return json_response(p.TransactionBatchResult(created=created, replayed=replayed,
                                              failed=len(items) - created - replayed, results=items))

    async def refund(self, request: Request) -> Response:
        require_service(await self.principal(request))
        transaction_id = path_id(request, "transaction_id")
        body = await read_body(request, p.RefundRequest)
        result: p.RefundResult = await self.chain_writes.call(
            chain_of_transaction(transaction_id, len(self.chains)), "refund", transaction_id, body)
        return json_response(result, 201 if result.status == "created" else 200)

    # --- admin ---------------------------------------------------------------

    async def payout(self, request: Request) -> Response:
        require_admin(await self.principal(request))
        body = await read_body(request, p.PayoutRequest)
        result: p.PayoutResult = await self.payouts.call(0, "payout", body)
        return json_response(result, 201 if result.status == "created" else 200)

    async def get_payout(self, request: Request) -> Response:
        require_admin(await self.principal(request))
        payout_id = path_id(request, "payout_id")
        limit = _int_param(request, "limit", p.PAYOUT_LINES_PAGE_DEFAULT, 1, p.PAYOUT_LINES_PAGE_MAX)
        view = await self.ledger.payout_view(payout_id, request.query_params.get("cursor"), limit)
        if view is None:
            raise p.NotFound(f"payout {payout_id!r} does not exist")
        return json_response(view)

    async def advance_clock(self, request: Request) -> Response:
        require_admin(await self.principal(request))
        body = await read_body(request, p.ClockAdvanceRequest)
        return json_response(await self.supervisor.call("advance_clock", body.seconds))

    async def house(self, request: Request) -> Response:
        require_admin(await self.principal(request))
        return json_response(await self.ledger.house_balances())

    # --- operations --------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return json_response(p.Health(status="ok", checks={}, region=self.config.region))

    async def readyz(self, request: Request) -> Response:
        checks = {}

        async def check(name, probe):
            try:
                await answered_within(probe(), DEPENDENCY_CHECK_TIMEOUT_S)
                checks[name] = "ok"
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                checks[name] = f"error: {type(exc).__name__}: {exc}"[:200]

        async def nats_flush():
            if self.nats is None or not self.nats.is_connected:
                raise ConnectionError(f"not connected to {self.nats_url}")
            await self.nats.flush(timeout=DEPENDENCY_CHECK_TIMEOUT_S)

        await asyncio.gather(
            check("postgres", lambda: self.pool.fetchval("SELECT 1")),
            check("redis", self.redis.ping),
            check("nats", nats_flush),
            *(check(s.name, lambda s=s: s.call("ping", deadline_s=1.0)) for s in self.shards + self.chains),
        )
        ok = all(v == "ok" for v in checks.values())
        health = p.Health(status="ok" if ok else "degraded", checks=checks, region=self.config.region)
        return json_response(health, 200 if ok else 503)

    async def metrics(self, request: Request) -> Response:
        replicas, backlog = await asyncio.gather(self.replica_metrics.exposition(), self.backlog.current())
        return Response(replicas + backlog_exposition(backlog), media_type=METRICS_CONTENT_TYPE)

    async def _read_backlog(self) -> EngineBacklog:
        (outbox_rows, outbox_oldest_age_s), payouts, (partitions_missing, default_rows) = await asyncio.gather(
            outbox_backlog(self.pool), self.ledger.unfinished_payout_ids(),
            partition_backlog(self.pool, BACKLOG_COUNT_MAX))
        return EngineBacklog(outbox_rows, outbox_oldest_age_s, len(payouts), partitions_missing, default_rows)

    async def openapi(self, request: Request) -> Response:
        return json_response(self._openapi)

    def asgi(self) -> Starlette:
        self._openapi = openapi_document()
        async def no_route(request: Request, exc) -> Response:
            error = p.NotFound(f"no route for {request.url.path}") if exc.status_code == 404 else p.MethodNotAllowed(
                f"{request.method} is not allowed on {request.url.path}")
            return _problem(error, request.url.path, exc.headers)  # a 405 says what is allowed (RFC 9110 15.5.6)

        routes = [self.route(path, operator.attrgetter(handler)(self), [method], name)
                  for method, path, handler, name in API_ROUTES]
        return Starlette(exception_handlers={404: no_route, 405: no_route}, routes=[
            *routes,
            *live_page_routes(),
        ])

    def live_asgi(self) -> Router:
        """The live gateway's app. Serve hands it only what is under its
        route prefix (`/v1/live`, see cluster/system.py), so the prefix
        itself is the socket's one path."""

        async def endpoint(scope, receive, send) -> None:
            path = scope["path"]
            at_prefix = path[len(scope.get("root_path", "")):] in ("", "/")
            if scope["type"] == "websocket" and at_prefix:
                await self.live_socket(WebSocket(scope, receive, send))
            elif scope["type"] == "websocket":
                # Accepted first: a handshake refused outright reaches the client as a bare 403, with no reason.
                ws = WebSocket(scope, receive, send)
                await ws.accept()
                await ws.close(CloseCode.NO_ROUTE, f"no live endpoint at {path}"[:CLOSE_REASON_BYTES_MAX])
            else:  # the API's answer to a path it does not serve
                await _problem(p.NotFound(f"no route for {path}"), path)(scope, receive, send)

        return Router(default=endpoint)


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    value = ascii_decimal(raw)
    if value is None or not low <= value <= high:
        raise p.InvalidRequest(f"query parameter {name!r} must be an integer in [{low}, {high}]",
                               errors=[p.ProblemField(path=name, message=f"expected {low}..{high}, got {raw!r}")])
    return value
