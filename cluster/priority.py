"""CPU priority of the processes that are not the request path's plain work.

On a machine whose cores the request path keeps busy, a process waits its
turn in the kernel's run queue for as long as the others' time slices run.
Ray runs the threads that run its workers' Python code (the shard, chain
and relay actors, the Serve replicas) at nice 15 (its `worker_niceness`),
behind the servers and Ray's own processes at 0; the niceness here is set
against that.

- Background work (the supervisor folding 30 s of ledger rows into a
  checkpoint) runs at 19, behind the request path's actors, so the kernel
  gives them the CPU first; its work is merely delayed while the cores are
  busy. (It ran at 10 until session 23, ahead of them, in the belief that
  they ran at 0.)
- The live gateway runs ahead of everything else: a purchase's frame and its
  HTTP 2xx leave different processes at nearly the same moment (the chain
  publishes the event, then answers), and with the cores full the gateway's
  wake-up queued behind the rest (2xx → frame p99 at 1,000 purchases/s 38
  to 383 ms at Ray's 15, 16 at -5, 0.00 to 5.66 at -10; README, Live updates). A
  frame is a few microseconds of work, so its priority takes little from
  anyone. Raising a priority needs CAP_SYS_NICE (or RLIMIT_NICE); without it
  the gateway stays where Ray put it and says so.
"""

from __future__ import annotations

import os

BACKGROUND_NICENESS = 19  # CFS weight 15 against 36 at Ray's 15 and 1,024 at 0
LIVE_GATEWAY_NICENESS = -10  # CFS weight 9,548 against 1,024 at 0; -5 (3,121) left a p99 of 16 ms


def _renice_every_thread(niceness: int) -> None:
    """On Linux a nice value belongs to a thread, not the process: Ray's
    threads exist already, and threads created later inherit their creator's."""
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else [0]:
        os.setpriority(os.PRIO_PROCESS, int(tid), niceness)


def run_as_background() -> None:
    _renice_every_thread(BACKGROUND_NICENESS)


def run_ahead_of_requests() -> bool:
    """Whether this process now runs at LIVE_GATEWAY_NICENESS; False where it
    may not raise its priority (it is left as it was)."""
    try:
        _renice_every_thread(LIVE_GATEWAY_NICENESS)
    except PermissionError:
        return False
    return True
