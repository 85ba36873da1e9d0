"""run_as_background renices every thread of the process, and new threads inherit it."""

import subprocess
import sys

PROBE = """
import os, threading
from dailydoco.cluster.priority import BACKGROUND_NICENESS, run_as_background

started = threading.Event(); release = threading.Event()
def wait():
    started.set(); release.wait()
before = threading.Thread(target=wait); before.start(); started.wait()
run_as_background()
niceness = [os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")]
later = []
after = threading.Thread(target=lambda: later.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
after.start(); after.join(); release.set(); before.join()
assert len(niceness) == 2 and set(niceness) == {BACKGROUND_NICENESS}, niceness
assert later == [BACKGROUND_NICENESS], later
"""


def test_every_thread_and_every_later_thread_runs_niced():
    # In a child process: the niceness of the test process itself must not change.
    subprocess.run([sys.executable, "-c", PROBE], check=True, timeout=60)
