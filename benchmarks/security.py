"""The cost of Kafka security: publish and ingest with SASL/SCRAM-SHA-512 over TLS + ACLs (+ signed events) vs
plaintext, against two local brokers started side by side in the same run.

    .venv/bin/python -m benchmarks.security [--steps 30000] [--rounds 3] [--episodes 200]

1. Publish: the same Step records (64×64 JPEG) through ``EventPublisher`` (codec, idempotent, acks=all, lz4) to
   - ``plain``: the PLAINTEXT broker,
   - ``tls+sasl``: the secured broker, as a robot principal (its ACLs), without signing,
   - ``secure``: the same, every event signed (HMAC-SHA256 headers; what a robot runs with security on);
   rounds rotate the order; medians and ratios to ``plain`` are printed.
2. Ingest: a backlog of ``--episodes`` episodes on each broker, then `sop process` (one worker) reads it into Delta:
   plain vs secure (TLS + SASL for faust/aiokafka, and every event's signature verified against the keyring).
   Sustained rate = slope between 10% and 90% of the step rows; also steps per CPU-second of the processor and
   CPU-µs per step of processor + broker over the same span (figures the machine's other load barely moves).
   ``--ingest-rounds`` runs per side, the order alternating; medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from confluent_kafka.admin import AdminClient

from benchmarks.ingest import _rows, cpu_seconds
from infra import KafkaBrokerConfig, LocalKafka
from infra.kafka import create_topic_set, topic_names
from infra.kafka_security import (
    PROCESSOR,
    LocalSecurity,
    grant,
    processor_grants,
    robot_grants,
    wait_for_login,
)
from lakehouse import Lakehouse
from producers.loadgen import LoadGenConfig, iter_fleet, run_loadgen
from producers.publisher import EventPublisher, PublisherConfig
from schemas.identity import load_signer
from sop.processes import processor_process

ROBOT = "bench-robot"


class Brokers:
    """A PLAINTEXT broker and a secured one (the stack's scram-tls set-up), and per-side client settings."""

    def __init__(self, root: Path) -> None:
        self.sec = LocalSecurity(root / "security")
        self.sec.ensure()
        self.plain = LocalKafka(KafkaBrokerConfig(data_dir=root / "plain", port=0, heap_mb=768))
        self.secure = LocalKafka(KafkaBrokerConfig(data_dir=root / "secure", port=0, heap_mb=768,
                                                   **self.sec.broker_settings()))

    def __enter__(self) -> Brokers:
        self.plain.launch()
        self.secure.launch()
        self.plain.wait_ready()
        self.secure.wait_ready()
        self.admin = AdminClient({"bootstrap.servers": self.secure.internal_address, **self.sec.internal_client_config()})
        # the services' users (their ACLs: per benchmark topic set, below), and one robot for every load-generator actor
        self.sec.provision_services(self.admin, topics=topic_names("bench."), group="bench", prefix="bench")
        self.robot = self.sec.add_robot(self.admin, ROBOT, topics=topic_names("bench."), actors=("loadgen-*",))
        self.signer = load_signer(self.robot.identity_file)
        wait_for_login(self.secure.bootstrap, self.robot.client_config)
        wait_for_login(self.secure.bootstrap, self.sec.service_config(PROCESSOR))
        return self

    def __exit__(self, *exc: object) -> None:
        del self.admin  # its connections would log the brokers' shutdown
        self.plain.stop()
        self.secure.stop()

    def topics(self, side: str, *, group: str | None = None) -> dict[str, str]:
        """Fresh topics on the side's broker; on the secured one with the robot's (and the processor's) ACLs."""
        prefix = f"bench{uuid.uuid4().hex[:6]}."
        if side == "plain":
            return create_topic_set(self.plain.bootstrap, prefix=prefix, partitions=4)
        topics = create_topic_set(self.secure.internal_address, prefix=prefix, partitions=4,
                                  client_config=self.sec.internal_client_config())
        grant(self.admin, f"User:{ROBOT}", robot_grants(topics))
        inputs = [topics[k] for k in ("Step", "EpisodeEvent", "InterventionEvent")]
        wait_for_login(self.secure.bootstrap, self.robot.client_config, topics=inputs)  # the ACLs took effect
        if group:
            grant(self.admin, f"User:{PROCESSOR}", processor_grants(topics, group))
            wait_for_login(self.secure.bootstrap, self.sec.service_config(PROCESSOR), topics=topics.values())
        return topics

    def publisher(self, side: str, topics: dict[str, str], **kw: object) -> PublisherConfig:
        if side == "plain":
            return PublisherConfig(bootstrap=self.plain.bootstrap, topics=topics, **kw)  # type: ignore[arg-type]
        return PublisherConfig(bootstrap=self.secure.bootstrap, topics=topics, client_config=self.robot.client_config,
                               signer=self.signer if side == "secure" else None, **kw)  # type: ignore[arg-type]


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def publish_rates(brokers: Brokers, steps: list[dict], rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Steps/s per side and round, and CPU µs per step (this process + the side's broker: a figure the machine's
    other load barely moves)."""
    sides = ["plain", "tls+sasl", "secure"]
    rates: dict[str, list[float]] = {s: [] for s in sides}
    cpu: dict[str, list[float]] = {s: [] for s in sides}
    for side in sides:  # warm-up, not timed: the first producer on a broker waits for its transaction coordinator
        with EventPublisher(brokers.publisher(side, brokers.topics(side))) as pub:
            for r in steps[:500]:
                pub.publish("Step", r, key=r["episode_id"])
            assert pub.flush(120) == 0
    for rnd in range(rounds):
        order = sides[rnd % 3:] + sides[:rnd % 3]
        for side in order:
            topics = brokers.topics(side)
            pub = EventPublisher(brokers.publisher(side, topics))
            broker_pid = (brokers.plain if side == "plain" else brokers.secure).state()["pid"]
            c0 = _own_cpu_s() + cpu_seconds(broker_pid)
            t0 = time.perf_counter()
            for r in steps:
                pub.publish("Step", r, key=r["episode_id"])
            assert pub.flush(120) == 0 and pub.stats.delivered == len(steps), pub.stats
            rates[side].append(len(steps) / (time.perf_counter() - t0))
            cpu[side].append((_own_cpu_s() + cpu_seconds(broker_pid) - c0) / len(steps) * 1e6)
            pub.close()
            print(f"  publish round {rnd + 1} {side:>8}: {rates[side][-1]:>9,.0f} steps/s, "
                  f"{cpu[side][-1]:>6.0f} CPU-µs per step (publisher + broker)")
    return rates, cpu


def ingest_rate(brokers: Brokers, side: str, episodes: int, root: Path) -> tuple[float, float, float, int]:
    """(sustained steps/s, steps per processor CPU-second, CPU-µs per step of processor + broker, steps) of one
    processor over a backlog."""
    group = f"bench-ingest-{side}-{uuid.uuid4().hex[:4]}"
    topics = brokers.topics(side, group=group)
    with EventPublisher(brokers.publisher(side, topics)) as pub:
        report = run_loadgen(LoadGenConfig(robots=20, hz=0, duration_s=None, episodes=episodes, seed=1,
                                           min_steps=60, max_steps=150), pub)
        assert pub.flush(60) == 0
    run = root / f"ingest-{group}"
    broker_pid = (brokers.plain if side == "plain" else brokers.secure).state()["pid"]
    lake = Lakehouse(str(run / "lake"))
    extra: dict[str, object] = {}
    bootstrap = brokers.plain.bootstrap
    if side == "secure":
        bootstrap = brokers.secure.bootstrap
        extra = {"kafka_security": "scram-tls", "kafka_client_config": brokers.sec.client_file(PROCESSOR),
                 "processor_robot_keyring": brokers.sec.keyring_file}
    worker = processor_process(bootstrap=bootstrap, topics=topics, run_dir=run, lake=run / "lake", group=group,
                               **extra).start()
    samples: list[tuple[float, int, float, float]] = []
    try:
        deadline = time.monotonic() + 900
        while True:
            worker.assert_alive()
            n = _rows(lake, "steps")
            samples.append((time.monotonic(), n, cpu_seconds(worker.proc.pid), cpu_seconds(broker_pid)))
            if n >= report.steps:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{side}: processor did not finish the backlog ({n}/{report.steps})\n{worker.tail()}")
            time.sleep(0.5)
    finally:
        worker.stop()
    ts, ns, cs, bs = (np.array([s[i] for s in samples]) for i in range(4))
    lo, hi = 0.1 * report.steps, 0.9 * report.steps

    def span(xs: np.ndarray) -> float:
        return max(1e-9, float(np.interp(hi, ns, xs) - np.interp(lo, ns, xs)))

    return (hi - lo) / span(ts), (hi - lo) / span(cs), (span(cs) + span(bs)) / (hi - lo) * 1e6, report.steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30_000, help="Step records per publish round and side.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--episodes", type=int, default=200, help="Episodes of the ingest backlog (0: skip ingest).")
    ap.add_argument("--ingest-rounds", type=int, default=2, help="Ingest runs per side (order alternates).")
    args = ap.parse_args()

    steps = []
    for name, rec in iter_fleet(LoadGenConfig(robots=20, hz=0, duration_s=None, episodes=10**9, seed=1)):
        if name == "Step":
            steps.append(rec)
            if len(steps) == args.steps:
                break
    with tempfile.TemporaryDirectory(prefix="sop-bench-sec-") as tmp, Brokers(Path(tmp)) as brokers:
        print(f"brokers: plain {brokers.plain.bootstrap}, secure {brokers.secure.bootstrap} (SASL_SSL SCRAM-SHA-512, "
              "ACLs, StandardAuthorizer)")
        rates, cpu = publish_rates(brokers, steps, args.rounds)
        med = {s: statistics.median(v) for s, v in rates.items()}
        us = {s: statistics.median(v) for s, v in cpu.items()}
        results: dict[str, object] = {"publish_steps_per_s": med, "publish_cpu_us_per_step": us}
        ingest: dict[str, tuple[float, float, float]] = {}
        if args.episodes:
            runs: dict[str, list[tuple[float, float, float, int]]] = {"plain": [], "secure": []}
            for rnd in range(args.ingest_rounds):
                for side in (("plain", "secure") if rnd % 2 == 0 else ("secure", "plain")):
                    r = ingest_rate(brokers, side, args.episodes, Path(tmp))
                    runs[side].append(r)
                    print(f"  ingest round {rnd + 1} {side:>6}: {r[0]:>7,.0f} steps/s sustained, {r[1]:>6,.0f} steps per "
                          f"processor CPU-second, {r[2]:>4.0f} CPU-µs per step (processor + broker; {r[3]:,} steps)")
            ingest = {side: tuple(statistics.median(r[i] for r in rs) for i in range(3))  # type: ignore[misc]
                      for side, rs in runs.items()}
            results["ingest"] = {s: {"steps_per_s": v[0], "steps_per_cpu_s": v[1], "cpu_us_per_step": v[2]}
                                 for s, v in ingest.items()}
    print(f"publish plain          : {med['plain']:>9,.0f} steps/s, {us['plain']:.0f} CPU-µs/step (medians of "
          f"{args.rounds})")
    for side, label in (("tls+sasl", "TLS + SCRAM"), ("secure", "+ signatures")):
        print(f"publish {label:<15}: {med[side]:>9,.0f} steps/s, ratio {med[side] / med['plain']:.2f}; "
              f"{us[side]:.0f} CPU-µs/step, {us[side] / us['plain']:.2f}× plain's")
    if ingest:
        (p, pc, pu), (s, sc, su) = ingest["plain"], ingest["secure"]
        print(f"ingest plain           : {p:>9,.0f} steps/s, {pc:,.0f} per processor CPU-second, {pu:.0f} CPU-µs/step "
              "(processor + broker)")
        print(f"ingest secure          : {s:>9,.0f} steps/s, {sc:,.0f} per processor CPU-second, {su:.0f} CPU-µs/step; "
              f"ratio {s / p:.2f}, processor CPU-second ratio {sc / pc:.2f}, CPU-µs {su / pu:.2f}× plain's")
    print(json.dumps(results, default=float))
    print(f"reproduce: .venv/bin/python -m benchmarks.security --steps {args.steps} --rounds {args.rounds} "
          f"--episodes {args.episodes} --ingest-rounds {args.ingest_rounds}")


if __name__ == "__main__":
    main()
