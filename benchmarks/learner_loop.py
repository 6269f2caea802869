"""The learner inside the closed loop: its steps/s and steps per CPU-second, variants alternated against one
running stack (``benchmarks.learner --in-loop``; see that module's doc)."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.ingest import cpu_seconds


@dataclass(frozen=True)
class Variant:
    """``LABEL[@CHECKOUT][:VAR=VALUE,...]``: a learner run from another checkout (default this one) with extra env."""

    label: str
    checkout: Path
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str, default_checkout: Path) -> Variant:
        head, _, env_part = spec.partition(":")
        label, _, checkout = head.partition("@")
        env = dict(kv.split("=", 1) for kv in env_part.split(",") if kv)
        return cls(label, Path(checkout) if checkout else default_checkout, env)


@dataclass
class Window:
    steps: int
    seconds: float
    cpu_s: float
    load: float

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds

    @property
    def steps_per_cpu_s(self) -> float:
        return self.steps / self.cpu_s if self.cpu_s > 0 else float("nan")

    @property
    def cores(self) -> float:
        return self.cpu_s / self.seconds


def stop(proc: subprocess.Popen, sig: int, *, timeout_s: float) -> None:
    """Send ``sig``; SIGKILL if it has not exited after ``timeout_s``."""
    proc.send_signal(sig)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def read_step(status: Path) -> int | None:
    try:
        data = json.loads(status.read_text())
    except (OSError, ValueError):
        return None
    return int(data["step"]) if data.get("state") == "running" else None


def measure_learner(variant: Variant, *, run_dir: Path, warmup_s: float, seconds: float, log: Path) -> Window:
    """Start ``sop learn`` for ``variant`` against the running stack of ``run_dir``, wait for it to train, measure
    ``seconds`` of it (steps from its status file, CPU from /proc), stop it (SIGTERM: it registers and exits)."""
    status = run_dir / "learner" / "status.json"
    status.unlink(missing_ok=True)
    env = {**os.environ, "SOP_RUN_DIR": str(run_dir), "SOP_LEARN_METRICS_PORT": "off", **variant.env}
    cmd = [sys.executable, "-m", "sop", "learn", "--quiet"]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=variant.checkout, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while read_step(status) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"learner {variant.label} did not start training; see {log}")
            time.sleep(0.5)
        time.sleep(warmup_s)
        step0, cpu0, t0 = read_step(status), cpu_seconds(proc.pid), time.monotonic()
        time.sleep(seconds)
        step1, cpu1, t1 = read_step(status), cpu_seconds(proc.pid), time.monotonic()
        if step0 is None or step1 is None:
            raise RuntimeError(f"learner {variant.label} stopped while measured; see {log}")
        # the status is rewritten every 2 s: the step count lags by up to that, at both ends alike
        return Window(step1 - step0, t1 - t0, cpu1 - cpu0, os.getloadavg()[0])
    finally:
        stop(proc, signal.SIGTERM, timeout_s=90)


def start_stack(run_dir: Path, *, actors: int, minutes: float, checkout: Path, log: Path) -> subprocess.Popen:
    """``sop run --no-learn``: broker, MLflow, demonstrations and base policy if missing, processor, actors, live
    view; returns once the actors have written online episodes (the learner then has both kinds of data)."""
    env = {**os.environ, "SOP_RUN_DIR": str(run_dir), "SOP_KAFKA_PORT": "0"}
    cmd = [sys.executable, "-m", "sop", "run", "--no-learn", "--actors", str(actors), "--minutes", str(minutes)]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 1200
    while not any((run_dir / "lake" / "steps").glob("**/*.parquet")) if (run_dir / "lake").exists() else True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"`sop run --no-learn` ended or never wrote steps; see {log}")
        time.sleep(2)
    return proc


def in_loop(*, run_dir: Path, variants: list[Variant], rounds: int, seconds: float, warmup_s: float, actors: int,
            checkout: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "bench-learner-loop.log"
    budget_min = rounds * len(variants) * (seconds + warmup_s + 90) / 60 + 5
    stack = start_stack(run_dir, actors=actors, minutes=budget_min, checkout=checkout, log=log)
    results: dict[str, list[Window]] = {v.label: [] for v in variants}
    try:
        for rnd in range(rounds):
            order = variants if rnd % 2 == 0 else variants[::-1]
            for v in order:
                w = measure_learner(v, run_dir=run_dir, warmup_s=warmup_s, seconds=seconds, log=log)
                results[v.label].append(w)
                print(f"  round {rnd + 1} {v.label:>12}: {w.steps_per_s:5.2f} steps/s, learner {w.cores:4.2f} cores, "
                      f"{w.steps_per_cpu_s:5.2f} steps per CPU-s (load {w.load:.1f})", flush=True)
    finally:
        stop(stack, signal.SIGINT, timeout_s=180)
    first = variants[0].label
    base = statistics.median(w.steps_per_s for w in results[first])
    base_cpu = statistics.median(w.steps_per_cpu_s for w in results[first])
    print(f"learner in the loop ({actors} actors, {seconds:.0f} s windows after {warmup_s:.0f} s warm-up, medians):")
    for v in variants:
        ws = results[v.label]
        rate, per_cpu = statistics.median(w.steps_per_s for w in ws), statistics.median(w.steps_per_cpu_s for w in ws)
        print(f"  {v.label:>12}: {rate:5.2f} steps/s ({rate / base:4.2f}x {first}), {per_cpu:5.2f} steps per "
              f"learner CPU-second ({per_cpu / base_cpu:4.2f}x), load {statistics.median(w.load for w in ws):.1f}")
