"""bench/cpu_split.py counts the CPU of the processes the benchmark started,
and of the servers that detach from it, and of nothing else on the machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
import cpu_split

BURN_S = 0.3
# Burns BURN_S of CPU, then waits to be killed; argv[1:] only name it.
BURNER = (f"import time\nend = time.process_time() + {BURN_S}\nwhile time.process_time() < end: pass\n"
          "time.sleep(60)")


def _detached(*args: str) -> int:
    """A burner that is not this process's descendant (a shell starts it in
    the background and exits, as pg_ctl leaves Postgres): its pid."""
    started = subprocess.run(["sh", "-c", f'"{sys.executable}" -c "$0" "$@" >/dev/null 2>&1 & echo $!', BURNER, *args],
                             capture_output=True, text=True, check=True)
    return int(started.stdout)


def _until_burnt(pids: list[int], within_s: float = 30.0) -> None:
    """Until each burner has burnt its CPU (a busy machine may take a while)."""
    deadline = time.monotonic() + within_s
    while any(sum(psutil.Process(pid).cpu_times()[:2]) < BURN_S for pid in pids):
        assert time.monotonic() < deadline, "the burners did not burn in time"
        time.sleep(0.1)


def test_the_split_counts_our_descendants_and_the_state_dirs_processes_and_no_others(tmp_path):
    state_dir = str(tmp_path / "state")
    child = subprocess.Popen([sys.executable, "-c", BURNER])
    from_state_dir = _detached("-D", state_dir)
    outsider = _detached("-D", str(tmp_path / "elsewhere"))
    try:
        _until_burnt([child.pid, from_state_dir, outsider])
        seen = cpu_split.cpu_by_process(state_dir)
        assert os.getpid() in seen and seen[os.getpid()][0] == cpu_split.LOAD_GENERATOR
        assert seen[child.pid][1] >= BURN_S, seen.get(child.pid)
        assert seen[from_state_dir][1] >= BURN_S, seen.get(from_state_dir)
        assert outsider not in seen
    finally:
        child.kill()
        child.wait()
        for pid in (from_state_dir, outsider):
            os.kill(pid, signal.SIGKILL)
