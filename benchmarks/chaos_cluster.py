"""Chaos on the cluster profile: faults in every distributed service while the loop runs, every event accounted.

    .venv/bin/python -m benchmarks.chaos --profile cluster [--quick] [--out DIR]

Starts its own cluster (``sop up --profile cluster`` in a temp run dir: 3 KRaft brokers, topics RF 3 with
``min.insync.replicas=2``, SeaweedFS S3 holding the lake, ``mlflow server`` on PostgreSQL), two ``sop process``
workers in one group on a lake in the bucket, a ``sop learn`` child on synthetic tables in the bucket registering
to the MLflow server, and, in this process, a robot-side publisher (``sop loadgen``'s fleet, ``acks=all``) and a
registry follower acting with the champion (what ``sop actor`` runs, without MuJoCo). With the load running:

1. *broker kills*: one broker of three SIGKILLed (each in turn), restarted on its ports and data; the partitions'
   in-sync replicas must be back to 3;
2. *S3 restarts*: the SeaweedFS server stopped and started again on its ports and data; processor commits, a
   bare ExactlyOnceWriter probe and the learner's reads must retry; the learner must read what was written after;
3. *MLflow restarts*: the server SIGKILLed (requests in flight get no answer) and started again; the follower must
   keep acting on the version it holds, the learner must register again and never register a learner step twice;
4. *worker kills*: one of the two processor workers SIGKILLed (the other takes its partitions over), restarted.

Then the load stops, the processors catch up, and every event in the brokers' log is matched one by one to a Delta
row, a dead letter or a counter (:func:`benchmarks.chaos.account`). ``run_campaign`` is also what
``tests/integration/test_cluster_faults.py`` runs, on the test session's cluster, with fewer faults.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient

from benchmarks.chaos import (
    LEARNER_MODEL,
    LEARNER_TASKS,
    Phase,
    Recording,
    Stack,
    Verdict,
    account,
    loadgen_thread,
    log,
)
from infra.kafka import create_topic_set
from infra.model_versions import TAG_FORMAT
from infra.registry import COMPLETE_TAG
from lakehouse import Lakehouse
from producers.loadgen import LoadGenConfig
from producers.publisher import EventPublisher, PublisherConfig, SpoolConfig
from sop.processes import SopProcess, processor_process
from sop.settings import Settings
from sop.stack import Cluster, running_cluster

POLICY_INSTRUCTION = "open the drawer"  # of LEARNER_TASKS[0] in learner.synthetic


@dataclass(frozen=True)
class CampaignConfig:
    broker_kills: int = 3
    s3_restarts: int = 2
    mlflow_restarts: int = 2
    worker_kills: int = 2
    robots: int = 8
    hz: float = 30.0
    down_s: float = 8.0  # how long a killed or stopped service stays down
    broker_down_s: float = 40.0  # a killed broker (past replica.lag.time.max.ms, 30 s: the ISR shrinks)
    settle_s: float = 8.0  # normal running between faults
    quiet_s: float = 180.0  # how long the processors may take to catch up at the end
    abort_timeout_s: float = 20.0
    seed: int = 11


@dataclass
class ClusterStack(Stack):
    """chaos.Stack on the cluster: two processor workers, the lake in the bucket."""

    lake_root: str = ""
    storage: dict[str, str] = field(default_factory=dict)
    tracking_uri: str = ""
    workers: list[SopProcess | None] = field(default_factory=lambda: [None, None])

    @property
    def lake(self) -> Path:  # account() and quiesce() read through lakehouse()
        raise AttributeError("the cluster's lake is in the bucket: use lakehouse()")

    def lakehouse(self) -> Lakehouse:
        return Lakehouse(self.lake_root, storage_options=self.storage)

    def start_worker(self, i: int) -> None:
        self.workers[i] = processor_process(
            bootstrap=self.bootstrap, topics=self.topics, run_dir=self.run_dir, lake=self.lake_root, group=self.group,
            log=self.run_dir / f"processor-{i}.log", lake_storage_options=json.dumps(self.storage),
            mlflow_tracking_uri=self.tracking_uri, processor_flush_interval_s=0.5, processor_end_grace_s=5.0,
            processor_abort_timeout_s=self.abort_timeout_s).start()

    def start_processor(self) -> None:
        for i in range(len(self.workers)):
            self.start_worker(i)

    def keep_processor_alive(self) -> None:
        for i, w in enumerate(self.workers):
            if w is not None and w.proc is not None and w.proc.poll() is not None:
                self.unexpected_exits.append(f"worker {i} exit {w.proc.returncode} at {time.strftime('%H:%M:%S')}: "
                                             f"{w.tail(1500)}")
                log(f"[red]processor worker {i} exited by itself ({w.proc.returncode}); restarting[/red]")
                self.start_worker(i)

    def open_episodes(self) -> int | None:
        pids = [w.proc.pid for w in self.workers if w is not None and w.running]
        if not pids:
            return None
        mine = [m for m in self.metrics() if any(m["file"].endswith(f"-{pid}.json") for pid in pids)]
        if len(mine) < len(pids):
            return None  # a worker that has not written its metrics yet may hold episodes
        return sum(int(m.get("open_episodes") or 0) for m in mine)

    def stop_workers(self) -> None:
        for w in self.workers:
            if w is not None:
                w.stop()


# -- what the cluster's services look like ----------------------------------------------------------------------

def under_replicated(bootstrap: str, topics: list[str] | None = None) -> dict[str, int]:
    """Topic -> partitions whose in-sync replicas are fewer than their replicas (all topics when None)."""
    md = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0}).list_topics(timeout=15)
    out: dict[str, int] = {}
    for name, t in md.topics.items():
        if topics is not None and name not in topics:
            continue
        short = sum(1 for p in t.partitions.values() if len(p.isrs) < len(p.replicas))
        if short:
            out[name] = short
    return out


def partitions_of(bootstrap: str, node_id: int, topics: list[str]) -> tuple[int, int]:
    """Of ``topics``' partitions: how many ``node_id`` leads, and how many have it out of their ISR."""
    md = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0}).list_topics(timeout=10)
    parts = [p for name in topics for p in md.topics[name].partitions.values()]
    return sum(1 for p in parts if p.leader == node_id), sum(1 for p in parts if node_id not in p.isrs)


def wait_full_isr(bootstrap: str, timeout_s: float = 180.0) -> float:
    """Seconds until every partition of every topic has all its replicas in sync again; raises past timeout_s."""
    t0 = time.monotonic()
    last: Any = None
    while time.monotonic() - t0 < timeout_s:
        try:
            last = under_replicated(bootstrap)
            if not last:
                return time.monotonic() - t0
        except Exception as exc:  # noqa: BLE001 - metadata may be unavailable for a moment
            last = exc
        time.sleep(0.5)
    raise RuntimeError(f"in-sync replicas not back to full within {timeout_s:.0f} s: {last}")


# -- the robot side and the learner -----------------------------------------------------------------------------

class Follower:
    """What an actor does with the registry: follow the champion alias in the background and act with the version
    it holds, every ``interval_s``; records every act, failure and version held."""

    def __init__(self, tracking_uri: str, name: str, *, interval_s: float = 0.2) -> None:
        from producers.registry_source import RegistryPolicySource, RegistrySourceConfig, default_probe
        from sop.architectures import policy_architectures

        self.probe = default_probe(LEARNER_TASKS[0], POLICY_INSTRUCTION, image_size=32)
        self.source = RegistryPolicySource(RegistrySourceConfig(tracking_uri=tracking_uri, model_name=name,
                                                                poll_interval_s=1.0,
                                                                architectures=policy_architectures()),
                                           probe=self.probe)
        self.interval_s = interval_s
        self.acts: list[tuple[float, str]] = []  # (time.monotonic(), version) of every act
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-follower", daemon=True)

    def start(self) -> Follower:
        self.source.start()
        self._thread.start()
        return self

    def _run(self) -> None:
        from producers.registry_source import NoPolicyYetError

        while not self._stop.is_set():
            try:
                policy = self.source.current()
                policy.act(self.probe)
                self.acts.append((time.monotonic(), str(policy.version)))
            except NoPolicyYetError:
                pass
            except Exception as exc:  # noqa: BLE001 - counted: an actor that cannot act is a finding
                self.failures.append(f"{type(exc).__name__}: {exc}")
            self._stop.wait(self.interval_s)

    def acts_between(self, t0: float, t1: float) -> list[str]:
        return [v for t, v in self.acts if t0 <= t <= t1]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.source.close()


@dataclass
class LearnerChild:
    """``sop learn`` on synthetic tables in the bucket, registering ``name`` on the MLflow server."""

    root: Path
    lake_root: str
    storage: dict[str, str]
    tracking_uri: str
    name: str
    proc: SopProcess | None = None
    exits: list[str] = field(default_factory=list)

    def lake(self) -> Lakehouse:
        return Lakehouse(self.lake_root, storage_options=self.storage)

    def start(self) -> None:
        from learner.synthetic import fill_tables

        if self.proc is None:
            fill_tables(self.lake(), tasks=LEARNER_TASKS, demos_per_task=2, online_per_task=1, length=20,
                        image_size=32)
        self.proc = SopProcess(["learn", "--quiet"], log=self.root / "learner.log", env={
            "HF_HUB_OFFLINE": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}, settings={
            "run_dir": self.root, "lake_uri": self.lake_root, "lake_storage_options": json.dumps(self.storage),
            "mlflow_tracking_uri": self.tracking_uri, "policy_model_name": self.name,
            "policy_model": json.dumps(LEARNER_MODEL), "learn_batch_size": 16, "learn_threads": 1,
            "learn_publish_every": 5, "learn_poll_s": 0.5, "learn_device": "cpu", "learn_log_every": 10}).start()

    def keep_alive(self) -> None:
        if self.proc is not None and self.proc.proc is not None and self.proc.proc.poll() is not None:
            self.exits.append(f"exit {self.proc.proc.returncode}: {self.proc.tail(600)}")
            log(f"[red]the learner exited by itself ({self.proc.proc.returncode}); restarting[/red]")
            self.start()

    def status(self) -> dict[str, Any]:
        with contextlib.suppress(OSError, json.JSONDecodeError):
            return json.loads((self.root / "learner" / "status.json").read_text())
        return {}

    def add_episode(self, k: int) -> int | None:
        """One more online episode in the learner's ``steps`` table; returns the table version written."""
        import numpy as np

        from learner.synthetic import synthetic_episode, write_rows
        from schemas.images import jpeg_pool

        rows = synthetic_episode(LEARNER_TASKS[k % 2], 20, np.random.default_rng(500 + k), episode_id=f"after-s3-{k}",
                                 demo=False, frames=jpeg_pool(2, 32), human_steps=range(5), image_size=32)
        return write_rows(self.lake(), "steps", rows, app_id_prefix=f"chaos-after-s3-{k}")

    def versions(self) -> list[Any]:
        from infra.registry import registry_client

        return registry_client(self.tracking_uri).search_model_versions(f"name = '{self.name}'")

    def wait_for_version_after(self, t0: float, timeout_s: float) -> float | None:
        """Seconds from ``t0`` (time.time()) until a version registered after it exists; None if none came."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.keep_alive()
            with contextlib.suppress(Exception):
                newer = [v.creation_timestamp / 1000 for v in self.versions() if v.creation_timestamp / 1000 > t0]
                if newer:
                    return min(newer) - t0
            time.sleep(1)
        return None


class Prober:
    """An ExactlyOnceWriter alone, one row per ``interval_s`` into its own table in the bucket: shows what the
    writer does while the S3 server is away (retries) and that each row lands once."""

    def __init__(self, lake: Lakehouse, *, interval_s: float = 0.5) -> None:
        self.lake, self.interval_s = lake, interval_s
        self.written = 0
        self.storage_retries = 0
        self.errors: list[str] = []
        self.slowest_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-s3-probe", daemon=True)

    def start(self) -> Prober:
        self._thread.start()
        return self

    def _run(self) -> None:
        writer = self.lake.writer("interventions", app_id_prefix="chaos-probe", topic="chaos.probe")
        k = 0
        while not self._stop.is_set():
            row = {"episode_id": f"probe-{k}", "kind": "STARTED", "actor_id": "probe", "task": "reach-v3",
                   "step_index": 0, "event_time_us": 1_795_000_000_000_000 + k, "operator_id": "probe",
                   "reason": "probe", "kafka_topic": "chaos.probe", "kafka_partition": 0, "kafka_offset": k}
            t0 = time.monotonic()
            try:
                result = writer.write([row], offsets={0: k})
                self.storage_retries += result.storage_retries
                self.written += 1
                k += 1
            except Exception as exc:  # noqa: BLE001 - what the writer gave up on is the finding
                self.errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            self.slowest_s = max(self.slowest_s, time.monotonic() - t0)
            self._stop.wait(self.interval_s)

    def close(self) -> dict[str, int]:
        """Stop, then count what the table holds: rows and distinct offsets."""
        from lakehouse import query

        self._stop.set()
        self._thread.join(timeout=120)
        got = query(self.lake, "SELECT count(*) AS n, count(DISTINCT kafka_offset) AS d FROM interventions") \
            .to_pylist()[0]
        return {"rows": int(got["n"]), "distinct": int(got["d"])}


# -- the campaign -----------------------------------------------------------------------------------------------

@dataclass
class CampaignResult:
    phases: list[Phase]
    verdicts: list[Verdict]
    extra: dict[str, Any]
    checks: dict[str, list[str]]  # phase name -> failed checks (empty: all held)
    recovery: dict[str, str]  # phase name -> what recovered, with the figures
    unexpected_exits: list[str]
    elapsed_s: float

    @property
    def lost(self) -> int:
        return sum(len(v.lost) for v in self.verdicts)

    @property
    def duplicated(self) -> int:
        return sum(v.duplicated for v in self.verdicts)

    @property
    def failed_checks(self) -> list[str]:
        return [f"{name}: {c}" for name, cs in self.checks.items() for c in cs]

    @property
    def ok(self) -> bool:
        stalled = self.phases[-1].stalled if self.phases else {}
        return not (self.lost or self.duplicated or stalled or self.failed_checks
                    or self.extra.get("accepted_not_in_log"))


def run_campaign(settings: Settings, cfg: CampaignConfig, *, workdir: Path) -> CampaignResult:  # noqa: C901, PLR0915
    """The four fault phases on the running cluster of ``settings`` (resolved: its endpoints), with a fresh topic
    prefix, consumer group, lake prefix and policy name, so that a cluster shared with other work is not touched
    beyond the faults themselves; every service broken is running again when this returns."""
    rng = random.Random(cfg.seed)
    t_start = time.monotonic()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the follower's downloads
    cluster: Cluster = running_cluster(settings)
    bootstrap = settings.bootstrap()
    tag = uuid.uuid4().hex[:6]
    storage = dict(settings.lake_storage_options)
    topics = create_topic_set(bootstrap, prefix=f"faults{tag}.", partitions=4, replication_factor=3,
                              min_insync_replicas=2)
    stack = ClusterStack(tmp=workdir, broker=None, bootstrap=bootstrap, topics=topics,  # type: ignore[arg-type]
                         abort_timeout_s=cfg.abort_timeout_s, group=f"faults-{tag}",
                         lake_root=f"s3://{cluster.bucket}/faults-{tag}/lake", storage=storage,
                         tracking_uri=settings.tracking_uri)
    learner = LearnerChild(root=workdir / "learner", lake_root=f"s3://{cluster.bucket}/faults-{tag}/learner-lake",
                           storage=storage, tracking_uri=settings.tracking_uri, name=f"faults-policy-{tag}")
    rdlog = logging.getLogger("chaos.librdkafka")
    workdir.mkdir(parents=True, exist_ok=True)
    rdlog.addHandler(logging.FileHandler(workdir / "publisher.log"))
    rdlog.propagate = False
    pub = EventPublisher(PublisherConfig(bootstrap=bootstrap, topics=topics, linger_ms=5,
                                         client_config={"logger": rdlog}),  # type: ignore[dict-item]
                         spool=SpoolConfig(directory=workdir / "spool"), spill_after_s=3.0)
    sink, stop_load = Recording(pub), threading.Event()
    phases: list[Phase] = []
    checks: dict[str, list[str]] = {}
    recovery: dict[str, str] = {}
    follower: Follower | None = None
    load: threading.Thread | None = None
    try:
        stack.start_processor()
        learner.start()
        boundary = [stack.highwaters(), 0]  # offsets and the index into sink.sent where the next phase starts
        load = loadgen_thread(sink, LoadGenConfig(robots=cfg.robots, hz=cfg.hz, duration_s=None, episodes=10**6,
                                                  seed=rng.randrange(1 << 30), min_steps=20, max_steps=80,
                                                  intervention_rate=0.3, run_id="f" + tag), stop_load)
        log(f"cluster chaos: load {cfg.robots} robots x {cfg.hz:.0f} Hz on {bootstrap}; lake {stack.lake_root}; "
            f"learner registers {learner.name}")
        warm = wait_until_running(stack, timeout_s=180)
        log(f"the loop runs: first episodes in Delta after {warm:.0f} s; faults start")
        first_sent: dict[str, int] = {}

        def phase(name: str, body: Callable[[Phase], None]) -> None:
            ph = Phase(name)
            first_sent[name] = boundary[1]
            before = counted_total(stack)
            body(ph)
            stack.keep_processor_alive()
            learner.keep_alive()
            ph.start, ph.end = boundary[0], stack.highwaters()
            ph.published = sink.sent[boundary[1]:]
            boundary[0], boundary[1] = ph.end, len(sink.sent)
            ph.counted_metrics = counted_total(stack) - before
            phases.append(ph)
            log(f"[bold]{name}[/bold] done ({time.monotonic() - t_start:.0f} s elapsed): {recovery.get(name, '')}")

        def settle() -> None:
            end = time.monotonic() + cfg.settle_s
            while time.monotonic() < end:
                stack.keep_processor_alive()
                learner.keep_alive()
                time.sleep(0.5)

        def brokers(ph: Phase) -> None:
            isr_s, moved_s, shrunk_s, failed = [], [], [], checks.setdefault(ph.name, [])
            ours = list(topics.values())
            for k in range(cfg.broker_kills):
                node_id = cluster.kafka.node_ids[k % len(cluster.kafka.node_ids)]
                node = cluster.kafka.node(node_id)
                log(f"broker kills: SIGKILL #{k + 1}/{cfg.broker_kills} of Kafka node {node_id} "
                    f"({len(sink.sent):,} events published so far)")
                t0 = time.monotonic()
                node.kill()
                moved = shrunk = None
                # down for broker_down_s, and at least until the controller fenced it and its partitions have
                # other leaders (broker.session.timeout.ms, 9 s); the ISR drops it after replica.lag.time.max.ms (30 s)
                while time.monotonic() - t0 < cfg.broker_down_s or (moved is None and time.monotonic() - t0 < 60):
                    with contextlib.suppress(Exception):
                        led, out_of_isr = partitions_of(bootstrap, node_id, ours)
                        if moved is None and led == 0:
                            moved = time.monotonic() - t0
                        if shrunk is None and out_of_isr:
                            shrunk = time.monotonic() - t0
                    time.sleep(0.5)
                if moved is None:
                    failed.append(f"partitions led by node {node_id} had no other leader 60 s after its kill")
                moved_s.append(moved)
                shrunk_s.append(shrunk)
                node.restart_same_ports()
                isr_s.append(wait_full_isr(bootstrap))
                settle()

            def secs(xs: list[float | None]) -> str:
                return ", ".join("-" if x is None else f"{x:.0f}" for x in xs)

            ph.notes.append(f"{cfg.broker_kills} SIGKILLs of one broker of three (down {cfg.broker_down_s:.0f} s or "
                            f"until its partitions had new leaders); new leaders {secs(moved_s)} s after the kill; the "
                            f"ISR dropped it after {secs(shrunk_s)} s ('-': not within the outage); all replicas in "
                            f"sync again {secs(isr_s)} s after the restart")
            recovery[ph.name] = f"leaders moved after {secs(moved_s)} s; ISR 3/3 again {secs(isr_s)} s after restart"

        def s3(ph: Phase) -> None:
            failed = checks.setdefault(ph.name, [])
            prober = Prober(Lakehouse(f"s3://{cluster.bucket}/faults-{tag}/probe", storage_options=storage)).start()
            time.sleep(2)
            outages, written = [], []
            errors_before = int(learner.status().get("feeder_errors") or 0)
            for k in range(cfg.s3_restarts):
                log(f"S3 restarts: stopping the S3 server #{k + 1}/{cfg.s3_restarts} for {cfg.down_s:.0f} s")
                t0 = time.monotonic()
                cluster.s3.restart(down_s=cfg.down_s)
                outages.append(time.monotonic() - t0)
                written.append(learner.add_episode(k))  # new data, written after the restart
                settle()
            got = prober.close()
            deadline = time.monotonic() + 60
            read = learner.status().get("feeder", {}).get("steps", {}).get("version")
            while (read is None or read < max(written)) and time.monotonic() < deadline:
                time.sleep(1)
                read = learner.status().get("feeder", {}).get("steps", {}).get("version")
            feeder_errors = int(learner.status().get("feeder_errors") or 0) - errors_before
            if prober.errors:
                failed.append(f"the bare writer gave up {len(prober.errors)} times: {prober.errors[0]}")
            if got["rows"] != prober.written or got["distinct"] != got["rows"]:
                failed.append(f"probe writer: {prober.written} writes acknowledged, table holds {got}")
            if read is None or read < max(written):
                failed.append(f"the learner did not read the steps table's version {max(written)} written after the "
                              f"restart (it read {read})")
            ph.notes.append(f"{cfg.s3_restarts} restarts of the S3 server (stop -> takes writes again: "
                            f"{', '.join(f'{s:.0f}' for s in outages)} s); a bare ExactlyOnceWriter wrote "
                            f"{prober.written} rows ({got['rows']} in the table, {got['distinct']} distinct), retried "
                            f"{prober.storage_retries} times on the storage, slowest write {prober.slowest_s:.0f} s; "
                            f"learner: {feeder_errors} failed Delta polls, then read steps v{read} "
                            f"(written after the restart: v{max(written)})")
            recovery[ph.name] = (f"writer retried {prober.storage_retries}x, {got['rows']} probe rows once each; "
                                 f"learner read v{read} after")

        def registry(ph: Phase) -> None:
            nonlocal follower
            failed = checks.setdefault(ph.name, [])
            # the learner started with the load; the follower acts once it has a version to act with
            if learner.wait_for_version_after(0.0, 240) is None:
                raise RuntimeError("the learner registered no version within 240 s:\n" + learner.proc.tail(3000))
            follower = Follower(settings.tracking_uri, learner.name).start()
            deadline = time.monotonic() + 120
            while not follower.acts and time.monotonic() < deadline:
                time.sleep(0.5)
            came, held, held_versions = [], [], []
            for k in range(cfg.mlflow_restarts):
                log(f"MLflow restarts: SIGKILL #{k + 1}/{cfg.mlflow_restarts} of the MLflow server "
                    f"({cfg.down_s:.0f} s down)")
                t_wall, t0 = time.time(), time.monotonic()
                cluster.mlflow.restart(down_s=cfg.down_s, kill=True)
                t1 = time.monotonic()
                acted = follower.acts_between(t0, t1)
                held_versions.append(set(acted))
                held.append(f"{len(acted)} acts on v{','.join(sorted(set(acted), key=int))}")
                if not acted:
                    failed.append(f"the follower did not act while the registry was down (restart {k + 1})")
                came.append(learner.wait_for_version_after(t_wall, 180))
                if came[-1] is None:
                    failed.append(f"no version registered within 180 s after MLflow restart {k + 1}")
                settle()
            held_max = max((int(v) for h in held_versions for v in h), default=0)
            deadline = time.monotonic() + 90
            while max((int(v) for _, v in follower.acts), default=0) <= held_max and time.monotonic() < deadline:
                time.sleep(1)
            now_acting = follower.acts[-1][1] if follower.acts else None
            if now_acting is None or int(now_acting) <= held_max:
                failed.append(f"the follower never moved past v{held_max}, the version it held during the outages")
            st = learner.status()
            ph.notes.append(f"{cfg.mlflow_restarts} SIGKILLs of the MLflow server ({cfg.down_s:.0f} s down, then "
                            f"its start); follower while it was away: {'; '.join(held)}; first new version "
                            f"{', '.join('-' if c is None else f'{c:.0f}' for c in came)} s after each kill; learner "
                            f"registrations retried {st.get('publish_retried')}, adopted {st.get('publish_adopted')}, "
                            f"removed {st.get('publish_removed')}, given up {st.get('publish_failures')}; metric logs "
                            f"skipped {st.get('metric_logs_skipped', 0)}; follower refused "
                            f"{follower.source.refused_count} versions, then acted with v{now_acting}")
            recovery[ph.name] = (f"follower kept acting ({'; '.join(held)}); new versions "
                                 f"{', '.join('-' if c is None else f'{c:.0f}' for c in came)} s after")

        def workers(ph: Phase) -> None:
            for k in range(cfg.worker_kills):
                i = k % 2
                log(f"worker kills: SIGKILL #{k + 1}/{cfg.worker_kills} of processor worker {i}")
                stack.workers[i].kill()  # type: ignore[union-attr]
                time.sleep(cfg.down_s + 4)  # the group rebalances, the other worker takes over
                stack.start_worker(i)
                settle()
            ph.notes.append(f"{cfg.worker_kills} SIGKILLs of one of the two processor workers, each restarted "
                            f"{cfg.down_s + 4:.0f} s later")
            recovery[ph.name] = "the other worker took over; restarted worker rejoined"

        plan = [("1 broker kills", brokers, cfg.broker_kills), ("2 S3 restarts", s3, cfg.s3_restarts),
                ("3 MLflow restarts", registry, cfg.mlflow_restarts), ("4 worker kills", workers, cfg.worker_kills)]
        for name, body, n in plan:
            if n:
                phase(name, body)
        stop_load.set()
        load.join()
        left = pub.flush(120)
        phases[-1].published = sink.sent[first_sent[phases[-1].name]:]  # what came after its faults too
        phases[-1].end = stack.highwaters()
        log(f"load stopped ({len(sink.sent):,} events, publisher RAM-only left {left}); waiting for the processors")
        phases[-1].stalled = stack.quiesce(cfg.quiet_s + cfg.abort_timeout_s)
        if stack.open_at_timeout:
            phases[-1].notes.append(f"quiesce wait timed out with {stack.open_at_timeout} episode(s) open")
        log("accounting: matching every event in the log to a row, a dead letter or a counter")
        verdicts, extra = account(stack, phases, None)
        learner_checks = checks.setdefault("learner", [])
        versions = learner.versions()
        steps = [v.tags.get("lineage.learner_step") for v in versions]
        twice = len(steps) - len(set(steps))
        # complete: a data-format version (created only after its files) or one tagged once its upload ended
        incomplete = [v.version for v in versions
                      if v.tags.get(COMPLETE_TAG) != "true" and TAG_FORMAT not in v.tags]
        if twice:
            learner_checks.append(f"{twice} learner steps registered twice")
        if incomplete:
            learner_checks.append(f"versions without all their files: {incomplete}")
        if learner.exits:
            learner_checks.append(f"the learner exited by itself {len(learner.exits)} times: {learner.exits[0]}")
        if follower is not None and follower.failures:
            learner_checks.append(f"the follower failed to act {len(follower.failures)} times: {follower.failures[0]}")
        if follower is not None and follower.source.refused_count:
            learner_checks.append(f"the follower refused versions: {follower.source.refused}")
        if stack.unexpected_exits:
            checks.setdefault("processors", []).append(f"exited by themselves: {stack.unexpected_exits}")
        extra["learner"] = {"versions": len(versions), "steps_twice": twice, "incomplete": incomplete,
                            "status": {k: learner.status().get(k) for k in (
                                "step", "publish_failures", "publish_retried", "publish_adopted", "publish_removed",
                                "feeder_errors", "metric_logs_skipped", "versions_registered")},
                            "follower_acts": len(follower.acts) if follower else 0,
                            "follower_versions": len({v for _, v in follower.acts}) if follower else 0}
        return CampaignResult(phases=phases, verdicts=verdicts, extra=extra, checks=checks, recovery=recovery,
                              unexpected_exits=stack.unexpected_exits, elapsed_s=time.monotonic() - t_start)
    finally:
        stop_load.set()
        if load is not None:
            load.join(timeout=30)
        with contextlib.suppress(Exception):
            pub.close()
        if follower is not None:
            follower.close()
        if learner.proc is not None:
            learner.proc.stop()
        stack.stop_workers()
        restore(cluster, bootstrap)


def wait_until_running(stack: ClusterStack, *, timeout_s: float) -> float:
    """Seconds until both workers hold partitions and episodes are in Delta: the faults hit a loop that runs.

    (A broker SIGKILLed while the group was still forming, before any worker had read its partitions, made the
    processor skip the first offsets of a partition: see the README's fault campaign on the cluster.)"""
    from lakehouse import query

    t0 = time.monotonic()
    lake = stack.lakehouse()
    while time.monotonic() - t0 < timeout_s:
        stack.keep_processor_alive()
        with contextlib.suppress(Exception):
            working = [m for m in stack.metrics() if int(m.get("steps_in") or 0) > 0]
            if len(working) >= len(stack.workers) and lake.exists("episodes") and \
                    query(lake, "SELECT count(*) AS n FROM episodes").column(0)[0].as_py() > 0:
                return time.monotonic() - t0
        time.sleep(1)
    raise RuntimeError(f"the loop did not run within {timeout_s:.0f} s (no episode in Delta, or a worker idle)")


def restore(cluster: Cluster, bootstrap: str) -> None:
    """Every service of the cluster running again (a campaign that failed half-way may have left one down)."""
    for i in cluster.kafka.node_ids:
        node = cluster.kafka.node(i)
        if node.state() is None:
            node.restart_same_ports()
    if cluster.s3.state() is None:
        cluster.s3.start()
    if cluster.mlflow.state() is None:
        cluster.mlflow.start()
    with contextlib.suppress(Exception):
        wait_full_isr(bootstrap, timeout_s=120)


def counted_total(stack: Stack) -> int:
    return sum(sum(m.get("counted", {}).values()) for m in stack.metrics())


# -- the command ------------------------------------------------------------------------------------------------

CLUSTER_COLUMNS = ("phase", "sent", "stored", "dead-lettered", "counted", "lost", "duplicated", "partitions stalled",
                   "recovered", "checks")


def result_rows(res: CampaignResult) -> list[list[str]]:
    rows = []
    for ph, v in zip(res.phases, res.verdicts, strict=True):
        reasons = ", ".join(f"{k} {n}" for k, n in sorted(v.dead.items(), key=lambda kv: -kv[1]))
        dead = f"{sum(v.dead.values()):,}" + (f" ({reasons})" if reasons else "")
        rows.append([ph.name, f"{v.sent:,}", f"{v.stored:,}", dead, f"{v.counted:,}",
                     str(len(v.lost)), str(v.duplicated), str(len(ph.stalled)), res.recovery.get(ph.name, ""),
                     "ok" if not res.checks.get(ph.name) else f"{len(res.checks[ph.name])} failed"])
    tot = [sum(x) for x in zip(*[(v.sent, v.stored, sum(v.dead.values()), v.counted, len(v.lost), v.duplicated)
                                 for v in res.verdicts], strict=True)]
    learner = res.extra.get("learner", {})
    rows.append(["total", f"{tot[0]:,}", f"{tot[1]:,}", f"{tot[2]:,}", f"{tot[3]:,}", str(tot[4]), str(tot[5]),
                 str(len(res.phases[-1].stalled)),
                 f"{learner.get('versions')} versions, learner steps registered twice {learner.get('steps_twice')}; "
                 f"accepted by the publisher, not in the log: {res.extra.get('accepted_not_in_log')}",
                 "ok" if not res.failed_checks else f"{len(res.failed_checks)} failed"])
    return rows


def main(args: Any) -> None:  # noqa: ANN401 - chaos.main's parsed arguments
    import shutil
    import sys

    from rich.table import Table

    from benchmarks.chaos import console, markdown
    from sop.settings import resolve_profile
    from sop.stack import down, up

    cfg = CampaignConfig(broker_kills=1, s3_restarts=1, mlflow_restarts=1, worker_kills=1, robots=4, hz=20,
                         quiet_s=120) if args.quick else CampaignConfig()
    cfg = CampaignConfig(**{**cfg.__dict__, "seed": args.seed})
    tmp = Path(tempfile.mkdtemp(prefix="sop-chaos-cluster-"))
    settings = Settings(run_dir=tmp / "run", profile="cluster", kafka_port=0)
    started_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cmd = "python -m benchmarks.chaos --profile cluster" + (" --quick" if args.quick else "")
    log(f"starting the cluster profile in {tmp}")
    t0 = time.monotonic()
    res: CampaignResult | None = None
    try:
        up(settings)
        log(f"cluster up in {time.monotonic() - t0:.0f} s")
        res = run_campaign(resolve_profile(settings), cfg, workdir=tmp / "work")
    finally:
        logs = Path("benchmarks/results/chaos-cluster-logs")
        with contextlib.suppress(OSError):
            logs.mkdir(parents=True, exist_ok=True)
            for f in [*tmp.glob("work/*.log"), *tmp.glob("work/run/*.log"), *tmp.glob("work/learner/*.log"),
                      *tmp.glob("run/cluster/*/*.log"), *tmp.glob("run/cluster/kafka/node-*/broker.log")]:
                shutil.copy(f, logs / (f"{f.parent.name}-{f.name}"))
        down(settings)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    rows = result_rows(res)
    t = Table(title=f"chaos campaign on the cluster profile ({'quick' if args.quick else 'full'}, "
                    f"{res.elapsed_s:.0f} s)")
    for c in CLUSTER_COLUMNS:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*r, style="bold" if r[0] == "total" else None)
    console.print(t)
    notes = [f"{ph.name}: " + "; ".join(ph.notes) for ph in res.phases if ph.notes]
    notes += [f"{ph.name}: processors' `counted` grew by {ph.counted_metrics:,}; events whose only trace is a counter: "
              f"{v.counted:,}; rows and dead letters for one origin: {v.both}"
              for ph, v in zip(res.phases, res.verdicts, strict=True)]
    notes.append(f"learner: {json.dumps(res.extra.get('learner'))}")
    notes += [f"FAILED {c}" for c in res.failed_checks]
    for n in notes:
        console.print(f"• {n}")
    lost = [x for v in res.verdicts for x in v.lost]
    for x in lost[:20]:
        console.print(f"[red]lost: {x}[/red]")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chaos-cluster.md").write_text(
        f"# Chaos campaign on the cluster profile\n\n`{cmd}` — {started_at}, {res.elapsed_s:.0f} s of faults on a "
        f"shared 2-core machine: 3 KRaft brokers (topics RF 3, min.insync.replicas 2, 4 partitions), SeaweedFS S3 "
        f"holding the lake, `mlflow server` on PostgreSQL; two `sop process` workers, `sop learn` on synthetic tables "
        f"in the bucket, {cfg.robots} load-generator robots x {cfg.hz:.0f} Hz (`acks=all`) and a registry follower "
        f"acting with the champion.\n\n" + markdown(rows, CLUSTER_COLUMNS) + "\n\n## Notes\n\n"
        + "\n".join(f"- {n}" for n in notes)
        + ("\n\n## Lost\n\n" + "\n".join(f"- `{x}`" for x in lost[:50]) if lost else "") + "\n")
    (args.out / "chaos-cluster.json").write_text(json.dumps({
        "command": cmd, "date": started_at, "elapsed_s": round(res.elapsed_s), "config": cfg.__dict__,
        "columns": CLUSTER_COLUMNS, "rows": rows, "notes": notes, "lost": lost[:200], "checks": res.checks,
        **{k: v for k, v in res.extra.items() if k != "poison"}}, indent=1, default=str))
    console.print(f"written: {args.out / 'chaos-cluster.md'}, {args.out / 'chaos-cluster.json'}")
    console.print("[green]nothing lost, nothing duplicated, every check held[/green]" if res.ok else
                  f"[red]lost {res.lost}, duplicated {res.duplicated}, failed checks {res.failed_checks}[/red]")
    sys.exit(0 if res.ok else 1)

