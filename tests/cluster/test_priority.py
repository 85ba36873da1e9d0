"""The priority helpers renice every thread of the process, new threads inherit
it, and a raise the process may not make leaves it as it was."""

import subprocess
import sys

import pytest

from tests.conftest import may_raise_priority

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

# A process may always lower its own priority, but raise it only with
# CAP_SYS_NICE or within RLIMIT_NICE. The probe sets that limit to 0 and, run
# as root, becomes nobody (dropping the capability), then lowers its priority
# to the bottom and asks for the raise.
REFUSED_PROBE = """
import os, resource
from dailydoco.cluster.priority import run_ahead_of_requests
resource.setrlimit(resource.RLIMIT_NICE, (0, 0))
if os.geteuid() == 0:
    os.setuid(65534)  # nobody: without CAP_SYS_NICE
os.nice(19 - os.nice(0))
assert run_ahead_of_requests() is False
assert os.nice(0) == 19
"""

RAISED_PROBE = """
import os
from dailydoco.cluster.priority import LIVE_GATEWAY_NICENESS, run_ahead_of_requests
assert run_ahead_of_requests() is True
assert {os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")} == {LIVE_GATEWAY_NICENESS}
"""


def test_every_thread_and_every_later_thread_runs_niced():
    # In a child process: the niceness of the test process itself must not change.
    subprocess.run([sys.executable, "-c", PROBE], check=True, timeout=60)


def test_a_refused_raise_leaves_the_priority_as_it_was():
    subprocess.run([sys.executable, "-c", REFUSED_PROBE], check=True, timeout=60)


@pytest.mark.skipif(not may_raise_priority(), reason="raising a priority needs CAP_SYS_NICE")
def test_the_live_gateway_runs_ahead_of_requests_where_permitted():
    subprocess.run([sys.executable, "-c", RAISED_PROBE], check=True, timeout=60)
