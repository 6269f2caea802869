"""Helpers for tests that run `sop process` as a real child process against the test broker."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from lakehouse import Lakehouse, query
from sop.processes import SopProcess, processor_process


def ProcessorProcess(*, bootstrap: str, topics: dict[str, str], run_dir: Path, lake: Path,  # noqa: N802
                     group: str | None = None, **settings: object) -> SopProcess:
    settings.setdefault("processor_flush_interval_s", 0.5)
    return processor_process(bootstrap=bootstrap, topics=topics, run_dir=run_dir, lake=lake,
                             group=group or f"proc-{uuid.uuid4().hex[:8]}", **settings)


def count(lake: Path, sql: str) -> int:
    lh = Lakehouse(str(lake))
    if not lh.exists("episodes") or not lh.exists("steps"):
        return 0
    return int(query(lh, sql).column(0)[0].as_py())


def wait_for(predicate, *, timeout_s: float, processor: SopProcess | None = None,  # noqa: ANN001
             interval_s: float = 1.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if processor is not None:
            processor.assert_alive()
        if predicate():
            return
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s:.0f}s\n{processor.tail() if processor else ''}")
