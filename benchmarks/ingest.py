"""Ingest: load generator → Kafka → faust processor → Delta, against a raw consume of the same topic.

    .venv/bin/python -m benchmarks.ingest [--episodes 600] [--latency-seconds 40] [--cameras 1] [--image-size 64]
    .venv/bin/python -m benchmarks.ingest --profile cluster --workers 2 --cameras 3 --image-size 224

``--profile cluster``: 3 KRaft brokers (topics and the processor's internal topics RF 3, ``min.insync.replicas=2``),
the lake in a SeaweedFS S3 bucket (``sop up --profile cluster`` in a temporary run directory).

1. Throughput: a backlog of ``--episodes`` episodes (``--cameras`` JPEG frames per step) is published first; then the
   processor starts and the steps visible in Delta are sampled over time. The sustained rate is the
   slope between 10% and 90% of the rows (start-up excluded). The same steps topic is then read by a
   plain confluent-kafka consumer (bytes only) in the same run: the ratio says what the whole
   pipeline (decode, assemble, RECAP columns, exactly-once Delta commits) costs over raw Kafka.
2. Latency at a fleet-realistic rate: 20 robots × 30 Hz (600 steps/s) for ``--latency-seconds``
   while the processor runs; for each episode, the time from its ENDED event being produced to its
   row being visible in the Delta ``episodes`` table (steps are written when their episode closes,
   so this is when the episode's data becomes usable), p50/p99.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
from confluent_kafka import Consumer, TopicPartition

from benchmarks._stack import PROFILES, benchmark_stack
from lakehouse import Lakehouse, query
from producers.loadgen import LoadGenConfig, run_loadgen
from producers.publisher import EventPublisher, PublisherConfig
from sop.processes import processor_process


def _rows(lake: Lakehouse, table: str) -> int:
    if not lake.exists(table):
        return 0
    actions = pa.table(lake.table(table, create=False).get_add_actions(flatten=True))
    return int(pa.compute.sum(actions.column("num_records")).as_py() or 0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (Linux ``/proc``): a figure the machine's other load barely
    moves, unlike wall-clock rates."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raw_consume_rate(bootstrap: str, topic: str, expected: int) -> tuple[float, float]:
    """(messages/s, bytes/s) of a plain consumer reading the topic from the start."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex, "auto.offset.reset": "earliest",
                  "enable.auto.commit": False, "fetch.max.bytes": 64 * 1024 * 1024})
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, 0) for p in parts])
    n, size, t0 = 0, 0, None
    while n < expected:
        for m in c.consume(1000, timeout=1.0):
            if m.error():
                continue
            t0 = t0 or time.perf_counter()
            n += 1
            size += len(m.value() or b"")
    elapsed = time.perf_counter() - t0
    c.close()
    return n / elapsed, size / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--latency-seconds", type=float, default=40.0)
    ap.add_argument("--workers", type=int, default=1, help="Processor processes in one consumer group.")
    ap.add_argument("--cameras", type=int, default=1, help="JPEG frames per step (MetaWorld's camera names).")
    ap.add_argument("--image-size", type=int, default=64, help="Camera image side in pixels.")
    ap.add_argument("--profile", choices=PROFILES, default="local")
    args = ap.parse_args()
    from producers.loadgen import camera_name

    cameras = ",".join(camera_name(c) for c in range(args.cameras))

    def fleet(**kw: object) -> LoadGenConfig:
        return LoadGenConfig(robots=20, min_steps=60, max_steps=150, cameras=args.cameras,
                             image_size=args.image_size, **kw)  # type: ignore[arg-type]

    with benchmark_stack(args.profile) as stack, tempfile.TemporaryDirectory(prefix="sop-ingest-") as tmp:
        print(stack.describe())
        run, bootstrap = Path(tmp), stack.bootstrap
        topics = stack.topics(partitions=4)
        with EventPublisher(PublisherConfig(bootstrap=bootstrap, topics=topics)) as pub:
            report = run_loadgen(fleet(hz=0, duration_s=None, episodes=args.episodes, seed=1), pub)
            assert pub.flush(120) == 0
        print(f"backlog: {report.steps:,} steps in {report.episodes} episodes "
              f"({args.cameras} × {args.image_size}×{args.image_size} JPEG per step)")

        lake = Lakehouse(stack.lake_uri, storage_options=stack.storage)
        extra: dict[str, object] = {"actor_cameras": cameras, "actor_image_size": args.image_size}
        if stack.storage:
            extra["lake_storage_options"] = json.dumps(stack.storage)
        if stack.replication_factor > 1:
            extra.update(topic_replication_factor=stack.replication_factor,
                         topic_min_insync_replicas=stack.min_insync_replicas)
        workers = [processor_process(bootstrap=bootstrap, topics=topics, run_dir=run / f"w{i}", lake=stack.lake_uri,
                                     group="bench-ingest", **extra).start() for i in range(args.workers)]
        samples: list[tuple[float, int, float]] = []  # (time, step rows in Delta, processor CPU seconds)
        t_start = time.monotonic()
        try:
            while True:
                for w in workers:
                    w.assert_alive()
                n = _rows(lake, "steps")
                samples.append((time.monotonic(), n, sum(cpu_seconds(w.proc.pid) for w in workers)))
                if n >= report.steps:
                    break
                if time.monotonic() - t_start > 1800:
                    raise SystemExit(f"processor did not finish the backlog in 30 min ({n}/{report.steps})")
                time.sleep(0.5)
            ts, ns, cs = (np.array([s[i] for s in samples]) for i in range(3))
            lo, hi = 0.1 * report.steps, 0.9 * report.steps
            t10, t90 = float(np.interp(lo, ns, ts)), float(np.interp(hi, ns, ts))
            sustained = (hi - lo) / max(1e-9, t90 - t10)
            per_cpu_s = (hi - lo) / max(1e-9, float(np.interp(hi, ns, cs) - np.interp(lo, ns, cs)))
            first_row = float(ts[np.argmax(ns > 0)])
            rows, distinct = query(lake, "SELECT count(*) AS n, count(DISTINCT (episode_id, step_index)) AS d "
                                         "FROM steps").to_pylist()[0].values()
            raw, raw_bytes = raw_consume_rate(bootstrap, topics["Step"], report.steps)
            step_bytes = raw_bytes / raw
            print(f"pipeline sustained   : {sustained:>9,.0f} steps/s, {sustained * step_bytes / 1e6:7,.1f} MB/s  "
                  f"(Kafka → faust → Delta, exactly once, {args.workers} worker{'s' if args.workers > 1 else ''})")
            print(f"raw consume          : {raw:>9,.0f} steps/s, {raw_bytes / 1e6:7,.1f} MB/s  "
                  f"(confluent-kafka, bytes only; {step_bytes:,.0f} bytes per step)")
            print(f"ratio                : {sustained / raw:.3f}")
            print(f"whole backlog        : {report.steps / (ts[-1] - t_start):>9,.0f} steps/s from processor start "
                  f"({ts[-1] - first_row:.1f} s from the first row in Delta to the last)")
            print(f"exactly once         : {rows:,} step rows, {distinct:,} distinct (episode, step), "
                  f"{report.steps:,} published" + ("" if rows == distinct == report.steps else "  ✘ MISMATCH"))
            print(f"processor CPU        : {per_cpu_s:>9,.0f} steps per CPU-second of the processor process(es), "
                  f"same 10–90% span (a figure the machine's other load barely moves)")

            # latency at 20 robots x 30 Hz while the processor keeps running
            ended_at: dict[str, float] = {}

            class TimingSink:
                def __init__(self, inner: EventPublisher) -> None:
                    self.inner = inner

                def publish(self, name: str, record: dict, *, key: str) -> None:
                    self.inner.publish(name, record, key=key)
                    if name == "EpisodeEvent" and record["kind"] == "ENDED":
                        self.inner.poll(0)
                        ended_at[record["episode_id"]] = time.time()

            seen: dict[str, float] = {}
            stop = threading.Event()

            def watch() -> None:
                while not stop.is_set():
                    if lake.exists("episodes"):
                        for eid in query(lake, "SELECT episode_id FROM episodes").column(0).to_pylist():
                            seen.setdefault(eid, time.time())
                    time.sleep(0.1)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            with EventPublisher(PublisherConfig(bootstrap=bootstrap, topics=topics, linger_ms=2)) as pub:
                live = run_loadgen(fleet(hz=30, duration_s=args.latency_seconds, seed=2), TimingSink(pub))
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not all(e in seen for e in live.episode_ids):
                time.sleep(0.5)
            stop.set()
            lat = sorted(seen[e] - ended_at[e] for e in live.episode_ids if e in seen and e in ended_at)
            print(f"live rate            : {live.steps_per_s:,.0f} steps/s ({live.episodes} episodes, 20 robots × 30 Hz)")
            print(f"end → visible        : p50 {statistics.median(lat):.2f} s, p99 {lat[int(0.99 * (len(lat) - 1))]:.2f} s "
                  f"over {len(lat)} episodes (target p99 <= 3 s; polling adds up to 0.1 s)")
        finally:
            for w in workers:
                w.stop()
    print(f"reproduce: .venv/bin/python -m benchmarks.ingest --episodes {args.episodes} "
          f"--latency-seconds {args.latency_seconds:g} --workers {args.workers} --cameras {args.cameras} "
          f"--image-size {args.image_size} --profile {args.profile}")


if __name__ == "__main__":
    main()
