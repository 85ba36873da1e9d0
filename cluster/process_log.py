"""The engine's log records on the stderr of the Ray process that makes them."""

from __future__ import annotations

import logging
import sys


def log_to_stderr() -> None:
    """The engine's log records, from INFO, with their time and logger, on
    the process's own stderr, which Ray writes to the worker's .err file
    (and to a driver that asks). Called by each API replica and actor as
    it starts.

    Python's last resort wrote them there before, but only from WARNING
    and without a time (an actor's until session 55), and in the
    throughput-optimised mode the HAProxy ingress runs in, Serve puts its
    own logger in the place of a replica's sys.stderr, at INFO, below the
    WARNING our replicas set it to: every warning of an API replica went
    nowhere until session 46 (a shard or chain fallen silent, a dependency
    that could not be reached at start, the live gateway's priority
    refused). Serve's own log file would not do either: it keeps 1,000
    records in memory before it writes them, and a warning is not one of
    those it writes at once."""
    ours = logging.getLogger("dailydoco")
    if not ours.handlers:
        handler = logging.StreamHandler(sys.__stderr__)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s -- %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)  # the few INFO lines are turns of state (a silent actor answering again)
        ours.propagate = False
