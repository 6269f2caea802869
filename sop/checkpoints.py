"""Held-out checkpoints during a run (``sop run --eval-every MIN``): the champion, operator off, held-out seeds.

Every ``every_s`` the loop starts ``sop eval`` (the same command a user runs: ``sim.evaluation`` on
``EVAL_SEEDS``, no human, nothing published) as a child process on the version the champion alias points at
then; when it ends, its JSON becomes one checkpoint. One evaluation at a time: when one is still running at the
next tick, the next starts after it. The evaluation shares the machine with the fleet and the learner.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from sop.processes import SopProcess


def checkpoint_from_eval(result: dict, *, started_s: float, run_started_s: float) -> dict:
    """One checkpoint from ``sop eval -o``'s JSON: minute of the run it started at, version, per-task rates, mean."""
    per_task = {str(t): float(r) for t, r in result["canonical"].items()}
    return {"t_min": (started_s - run_started_s) / 60, "version": str(result["version"]),
            "episodes_per_task": int(result["episodes_per_task"]), "per_task": per_task,
            "mean": sum(per_task.values()) / len(per_task) if per_task else None}


class HeldOutCheckpoints:
    def __init__(self, make_child: Callable[[str, list[str]], SopProcess], *, every_s: float, episodes: int,
                 tasks: tuple[str, ...] | None, out_dir: Path, run_started_s: float) -> None:
        self.make_child, self.every_s, self.episodes, self.tasks = make_child, every_s, episodes, tasks
        self.out_dir, self.run_started_s = out_dir, run_started_s
        self.results: list[dict] = []
        self.failures: list[str] = []
        self._child: SopProcess | None = None
        self._started_s = 0.0
        self._next_s = run_started_s + every_s
        self._n = 0

    @property
    def latest(self) -> dict | None:
        return self.results[-1] if self.results else None

    def tick(self, now_s: float | None = None) -> None:
        """Collect a finished evaluation; start the next one when it is due."""
        now = time.time() if now_s is None else now_s
        if self._child is not None:
            if self._child.running:
                return
            self._collect()
        if now >= self._next_s:
            self._start(now)

    def _start(self, now: float) -> None:
        self._n += 1
        out = self.out_dir / f"eval-{self._n:03d}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.unlink(missing_ok=True)
        args = ["eval", "--episodes-per-task", str(self.episodes), "--no-paraphrases", "-o", str(out)]
        if self.tasks:
            args += ["--tasks", ",".join(self.tasks)]
        self._child = self.make_child(f"eval-{self._n:03d}", args).start()
        self._started_s, self._out = now, out
        self._next_s = now + self.every_s

    def _collect(self) -> None:
        child, self._child = self._child, None
        assert child is not None
        try:
            result = json.loads(self._out.read_text())
        except (FileNotFoundError, json.JSONDecodeError) as exc:
            self.failures.append(f"`sop eval` exited {child.proc.returncode} without results ({exc}); see {child.log}")
            return
        self.results.append(checkpoint_from_eval(result, started_s=self._started_s,
                                                 run_started_s=self.run_started_s))

    def wait(self, timeout_s: float) -> None:
        """At the end of the run: let a running evaluation finish (up to ``timeout_s``), then stop it."""
        if self._child is None:
            return
        deadline = time.time() + timeout_s
        while self._child.running and time.time() < deadline:
            time.sleep(0.5)
        if self._child.running:
            self._child.stop(timeout_s=10)
            self._child = None
            return
        self._collect()
