"""The Ray Serve deployments wrapping the ASGI apps: the HTTP API, and the
live gateway's WebSockets in a deployment of their own (see EngineApi)."""

from __future__ import annotations

from ray import serve

from dailydoco.cluster.priority import LIVE_GATEWAY_NICENESS, run_ahead_of_requests
from dailydoco.cluster.process_log import log_to_stderr

from .app import EngineApi, log

# Concurrent requests one API replica takes before Serve queues: the handlers
# are I/O-bound awaits on actors and Postgres, so a replica overlaps many.
HTTP_ONGOING_REQUESTS_MAX = 2_000
# Every open live WebSocket holds one of its replica's slots for its whole life.
LIVE_SOCKETS_PER_REPLICA_MAX = 12_000
# A replica that stops answering (stopped, hung in native code) is killed by
# Serve once three health checks in a row went unanswered for this long each:
# about 25 s here, against two minutes with Ray's 30 s (and its graceful stop,
# see cluster/system.py). Behind Serve's default proxy it holds its requests
# until then; HAProxy cuts them sooner (cluster/ingress_errors.py). A replica
# answers its health check from its own event loop; a loop that cannot within
# 5 s, three times running, is not serving either.
REPLICA_HEALTH_CHECK_TIMEOUT_S = 5
REPLICA_HEALTH_CHECK_PERIOD_S = 5


@serve.deployment(
    name="engine",
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=HTTP_ONGOING_REQUESTS_MAX,
    health_check_period_s=REPLICA_HEALTH_CHECK_PERIOD_S,
    health_check_timeout_s=REPLICA_HEALTH_CHECK_TIMEOUT_S,
)
@serve.ingress()
class EngineIngress(EngineApi):
    def __init__(self, *args):
        log_to_stderr()
        super().__init__(*args)
        self.connect_in_background()  # Serve runs a constructor on the replica's event loop

    def __serve_build_asgi_app__(self):
        return self.asgi()


@serve.deployment(
    name="live",
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=LIVE_SOCKETS_PER_REPLICA_MAX,
    health_check_period_s=REPLICA_HEALTH_CHECK_PERIOD_S,
    health_check_timeout_s=REPLICA_HEALTH_CHECK_TIMEOUT_S,
)
@serve.ingress()
class LiveIngress(EngineApi):
    def __init__(self, *args):
        log_to_stderr()
        super().__init__(*args, live_gateway=True)
        if not run_ahead_of_requests():
            log.warning(
                "the live gateway runs at the priority Ray gave it: raising it to nice %d needs CAP_SYS_NICE; "
                "with the cores full, frames will trail their HTTP 2xx",
                LIVE_GATEWAY_NICENESS,
            )
        self.connect_in_background()

    def __serve_build_asgi_app__(self):
        return self.live_asgi()
