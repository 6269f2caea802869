"""Helpers for tests that run `sop process` as a real child process against the test broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from lakehouse import Lakehouse, query


class ProcessorProcess:
    """`python -m sop process` with the test's topics, lake and consumer group; killable."""

    def __init__(self, *, bootstrap: str, topics: dict[str, str], run_dir: Path, lake: Path,
                 group: str | None = None, **settings: object) -> None:
        prefix = topics["Step"].removesuffix("steps")
        self.env = {**os.environ, "SOP_KAFKA_BOOTSTRAP": bootstrap, "SOP_TOPIC_PREFIX": prefix,
                    "SOP_RUN_DIR": str(run_dir), "SOP_LAKE_URI": str(lake),
                    "SOP_PROCESSOR_GROUP": group or f"proc-{uuid.uuid4().hex[:8]}",
                    "SOP_MLFLOW_TRACKING_URI": f"sqlite:///{run_dir / 'mlflow.db'}",
                    "SOP_PROCESSOR_FLUSH_INTERVAL_S": "0.5"}
        self.env.update({f"SOP_{k.upper()}": str(v) for k, v in settings.items()})
        self.log = run_dir / "processor.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> ProcessorProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "sop", "process"], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def assert_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"processor exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")


def count(lake: Path, sql: str) -> int:
    lh = Lakehouse(str(lake))
    if not lh.exists("episodes") or not lh.exists("steps"):
        return 0
    return int(query(lh, sql).column(0)[0].as_py())


def wait_for(predicate, *, timeout_s: float, processor: ProcessorProcess | None = None,  # noqa: ANN001
             interval_s: float = 1.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if processor is not None:
            processor.assert_alive()
        if predicate():
            return
        time.sleep(interval_s)
    log = processor.log.read_text()[-3000:] if processor else ""
    raise AssertionError(f"condition not met within {timeout_s:.0f}s\n{log}")
