from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def _wait_for(path: Path, timeout_s: float = 20.0) -> str:
    deadline = time.time() + timeout_s
    while not path.exists() and time.time() < deadline:
        time.sleep(0.05)
    return path.read_text() if path.exists() else ""


def test_a_child_in_its_own_session_stops_cleanly_when_its_parent_is_killed(tmp_path) -> None:
    ready, stopped = tmp_path / "ready", tmp_path / "stopped"
    child = f"""
import os, signal, sys, time
from pathlib import Path
from sop.processes import PARENT_PID_ENV, exit_with_parent
signal.signal(signal.SIGTERM, lambda *_: (Path({str(stopped)!r}).write_text("SIGTERM"), sys.exit(0)))
exit_with_parent(poll_s=0.05)
Path({str(ready)!r}).write_text(str(PARENT_PID_ENV in os.environ))
time.sleep(60)
"""
    parent = f"""
import os, subprocess, sys, time
env = {{**os.environ, "SOP_PARENT_PID": str(os.getpid())}}
subprocess.Popen([sys.executable, "-c", {child!r}], env=env, start_new_session=True)
time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", parent])
    try:
        assert _wait_for(ready) == "False", "the variable is not passed on to the child's own children"
        assert not stopped.exists()
        proc.kill()  # SIGKILL: the parent cannot stop its children itself
        proc.wait()
        assert _wait_for(stopped) == "SIGTERM"
    finally:
        if proc.poll() is None:
            proc.kill()
