"""The Ray Serve deployment wrapping the ASGI app."""

from __future__ import annotations

from ray import serve

from .app import EngineApi

# Concurrent requests one replica takes before Serve queues: the handlers are
# I/O-bound awaits on actors and Postgres, so a replica overlaps many. Every
# open live WebSocket holds one of these slots for its whole life, so the
# sockets get their own allowance on top of the requests'.
HTTP_ONGOING_REQUESTS_MAX = 2_000
LIVE_SOCKETS_PER_REPLICA_MAX = 12_000
REPLICA_ONGOING_REQUESTS_MAX = HTTP_ONGOING_REQUESTS_MAX + LIVE_SOCKETS_PER_REPLICA_MAX


@serve.deployment(
    name="engine",
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=REPLICA_ONGOING_REQUESTS_MAX,
    health_check_period_s=5,
)
@serve.ingress()
class EngineIngress(EngineApi):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connect_in_background()  # Serve runs a constructor on the replica's event loop

    def __serve_build_asgi_app__(self):
        return self.asgi()
