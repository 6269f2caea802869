"""Child `sop` processes (processor, learner, actors) for the local orchestration, tests and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PARENT_PID_ENV = "SOP_PARENT_PID"  # set for children in their own session: they stop when that parent is gone


def exit_with_parent(*, poll_s: float = 1.0) -> None:
    """In a child started with ``own_session``: SIGTERM ourselves (a clean stop) once the parent is gone.

    Its own session keeps a terminal's Ctrl-C away from the child, but also a dying parent's: without this a
    parent killed with SIGKILL would leave actors, learner and processor running. The variable is removed so
    that our own children do not watch our parent.
    """
    parent = os.environ.pop(PARENT_PID_ENV, None)
    if not parent:
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="sop-exit-with-parent", daemon=True).start()


class SopProcess:
    """``python -m sop <args>`` with ``SOP_…`` settings in its environment; stoppable and killable."""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None, log: Path | None = None,
                 settings: dict[str, object] | None = None, own_session: bool = False) -> None:
        """``own_session``: out of the terminal's process group, so that Ctrl-C reaches only the parent,
        which then stops its children in order (actors, drain, learner and processor)."""
        self.args = args
        self.own_session = own_session
        if own_session:
            env = {**(env or {}), PARENT_PID_ENV: str(os.getpid())}
        self.env = {**os.environ, **(env or {})}
        self.env.update({f"SOP_{k.upper()}": str(v) for k, v in (settings or {}).items()})
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> SopProcess:
        out = subprocess.DEVNULL
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log, "ab")  # noqa: SIM115 - the child writes to it for its whole life
        self.proc = subprocess.Popen([sys.executable, "-m", "sop", *self.args], env=self.env, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=self.own_session)
        if out is not subprocess.DEVNULL:
            out.close()
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.running:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log and self.log.exists() else ""

    def assert_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"`sop {' '.join(self.args)}` exited with {self.proc.returncode}:\n{self.tail()}")


def processor_process(*, bootstrap: str, topics: dict[str, str], run_dir: Path, lake: Path | str,
                      group: str, log: Path | None = None, **settings: object) -> SopProcess:
    """`sop process` on the given topics (they share one prefix), lake and consumer group."""
    prefix = topics["Step"].removesuffix("steps")
    base = {"kafka_bootstrap": bootstrap, "topic_prefix": prefix, "run_dir": run_dir, "lake_uri": lake,
            "processor_group": group, "mlflow_tracking_uri": f"sqlite:///{Path(run_dir) / 'mlflow.db'}"}
    return SopProcess(["process"], settings={**base, **settings}, log=log or Path(run_dir) / "processor.log")
