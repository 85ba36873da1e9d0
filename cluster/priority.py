"""CPU priority of background processes.

On a machine whose cores the request path keeps busy, a burst of background
work (the supervisor folding 30 s of ledger rows into a checkpoint) takes a
core from the replicas and actors that answer requests, and their latency
shows it. Background processes run niced, so the kernel gives the request
path the CPU first; their work is merely delayed while it is busy.
"""

from __future__ import annotations

import os

BACKGROUND_NICENESS = 10  # CFS weight 110 against 1024 at 0: about a tenth of a busy core's time


def run_as_background() -> None:
    """Renice every thread of this process. On Linux a nice value belongs to
    a thread, not the process: Ray's threads exist already, and threads
    created later inherit their creator's."""
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else [0]:
        os.setpriority(os.PRIO_PROCESS, int(tid), BACKGROUND_NICENESS)
