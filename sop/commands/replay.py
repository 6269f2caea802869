"""`sop replay`: re-process Kafka history into fresh tables, or publish stored episodes back onto the topics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import click
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from sop.settings import Settings, load_settings

SOURCES = ("Step", "EpisodeEvent", "InterventionEvent")


def _partitions(admin: AdminClient, topic: str) -> list[int]:
    md = admin.list_topics(topic, timeout=15).topics[topic]
    if md.error is not None:
        raise click.ClickException(f"topic {topic}: {md.error}")
    return sorted(md.partitions)


def resolve_offsets(consumer: Consumer, topic: str, partitions: list[int], where: str) -> dict[int, int]:
    """'beginning' | 'end' | an offset (per partition) | an ISO-8601 time → partition -> offset."""
    out = {}
    if where in ("beginning", "end"):
        for p in partitions:
            lo, hi = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15)
            out[p] = lo if where == "beginning" else hi
        return out
    if where.lstrip("-").isdigit():
        for p in partitions:
            lo, hi = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15)
            out[p] = min(max(int(where), lo), hi)
        return out
    try:
        ts = datetime.fromisoformat(where)
    except ValueError:
        raise click.BadParameter(f"{where!r}: give 'beginning', 'end', an offset or an ISO time (2026-11-24T10:00)") from None
    ms = int(ts.timestamp() * 1000)
    found = consumer.offsets_for_times([TopicPartition(topic, p, ms) for p in partitions], timeout=15)
    for tp in found:
        out[tp.partition] = tp.offset if tp.offset >= 0 else consumer.get_watermark_offsets(tp, timeout=15)[1]
    return out


@click.group("replay")
def command() -> None:
    """Re-read history (new reward settings, rebuilt tables) or publish stored episodes for offline training."""


@command.command("kafka")
@click.option("--from", "from_", default="beginning", show_default=True, help="beginning | offset | ISO time")
@click.option("--to", "to", default="end", show_default=True, help="end | offset | ISO time (exclusive)")
@click.option("--into", "into", required=True, help="Root of the new Delta tables (must not be the live lake).")
@click.option("--c-fail", type=float, default=None, help="RECAP failure penalty for the rebuilt tables.")
@click.option("--advantage-horizon", type=int, default=None, help="N of the N-step advantage.")
@click.option("--timeout", "timeout_s", default=1800.0, show_default=True, help="Give up after this many seconds.")
def replay_kafka(from_: str, to: str, into: str, c_fail: float | None, advantage_horizon: int | None,
                 timeout_s: float) -> None:
    """Re-process the topics' history into a fresh set of tables, without touching the live ones."""
    settings = load_settings()
    if Path(into).resolve() == Path(settings.lake_root).resolve():
        raise click.BadParameter("--into is the live lake; give a new table root")
    console = Console()
    report = replay_into(settings, into=into, from_=from_, to=to, c_fail=c_fail,
                         advantage_horizon=advantage_horizon, timeout_s=timeout_s, console=console)
    console.print(f"replayed {report['messages']:,} messages into {into} in {report['elapsed_s']:.1f}s")


def replay_into(settings: Settings, *, into: str, from_: str = "beginning", to: str = "end",
                c_fail: float | None = None, advantage_horizon: int | None = None, timeout_s: float = 1800.0,
                console: Console | None = None) -> dict:
    bootstrap = settings.bootstrap()
    admin = AdminClient({"bootstrap.servers": bootstrap, **settings.kafka_client_config})
    group = f"sop-replay-{uuid.uuid4().hex[:8]}"
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                      **settings.kafka_client_config})
    starts, ends = {}, {}
    for name in SOURCES:
        topic = settings.topics[name]
        parts = _partitions(admin, topic)
        starts[topic] = resolve_offsets(probe, topic, parts, from_)
        ends[topic] = resolve_offsets(probe, topic, parts, to)
    # The new group starts exactly at --from: its offsets are committed before the processor joins.
    probe.commit(offsets=[TopicPartition(t, p, o) for t, parts in starts.items() for p, o in parts.items()],
                 asynchronous=False)
    total = sum(max(0, ends[t][p] - starts[t][p]) for t in starts for p in starts[t])
    stop_file = Path(tempfile.mkstemp(prefix="sop-replay-stop-", suffix=".json")[1])
    stop_file.write_text(json.dumps(ends))
    env = {**os.environ, "SOP_PROCESSOR_GROUP": group, "SOP_LAKE_URI": str(into),
           "SOP_PROCESSOR_ABORT_TIMEOUT_S": str(max(timeout_s, 3600)), "SOP_KAFKA_BOOTSTRAP": bootstrap}
    if c_fail is not None:
        env["SOP_RECAP_C_FAIL"] = str(c_fail)
    if advantage_horizon is not None:
        env["SOP_RECAP_ADVANTAGE_HORIZON"] = str(advantage_horizon)
    child = subprocess.Popen([sys.executable, "-m", "sop", "process", "--stop-offsets", str(stop_file)], env=env)
    t0 = time.monotonic()
    tps = [TopicPartition(t, p) for t in ends for p in ends[t]]
    done = 0
    try:
        with Progress(TextColumn("[bold]replay"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} messages"),
                      TimeElapsedColumn(), console=console or Console(), transient=True) as progress:
            bar = progress.add_task("replay", total=max(total, 1))
            while True:
                if child.poll() is not None:
                    raise click.ClickException(f"the replay processor exited with code {child.returncode}")
                committed = {(tp.topic, tp.partition): tp.offset for tp in probe.committed(tps, timeout=15)}
                done = sum(max(0, min(committed[(t, p)], ends[t][p]) - starts[t][p]) for t in ends for p in ends[t])
                progress.update(bar, completed=done)
                if all(committed[(t, p)] >= ends[t][p] for t in ends for p in ends[t]):
                    break
                if time.monotonic() - t0 > timeout_s:
                    raise click.ClickException(f"replay did not finish within {timeout_s:.0f}s ({done}/{total})")
                time.sleep(0.5)
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
        probe.close()
        stop_file.unlink(missing_ok=True)
        internal = [t for t in admin.list_topics(timeout=15).topics if t.startswith(f"{group}-")]
        if internal:
            admin.delete_topics(internal, operation_timeout=30)
    return {"messages": done, "elapsed_s": time.monotonic() - t0, "group": group}


@command.command("publish")
@click.option("--from-table", "table", type=click.Choice(["steps", "demonstrations"]), default="demonstrations",
              show_default=True)
@click.option("--where", "where", default=None, help="SQL condition on the table's rows, e.g. \"task = 'drawer-open-v3'\".")
@click.option("--keep-ids", is_flag=True, help="Reuse the stored episode ids (default: a new id per copy).")
@click.option("--copies", default=1, show_default=True, help="Publish every episode this many times (load tests).")
def replay_publish(table: str, where: str | None, keep_ids: bool, copies: int) -> None:
    """Publish stored episodes back onto the topics (offline data through the same pipeline, load tests)."""
    from lakehouse import Lakehouse, query
    from producers.publisher import EventPublisher
    from sop.commands.loadgen import make_publisher

    settings = load_settings()
    lake = Lakehouse(settings.lake_root, storage_options=settings.lake_storage_options or None)
    sql = f"SELECT * FROM {table}" + (f" WHERE {where}" if where else "") + " ORDER BY episode_id, step_index"
    rows = query(lake, sql).to_pylist()
    console = Console()
    publisher: EventPublisher = make_publisher(settings)
    stats = publish_episodes(rows, publisher, keep_ids=keep_ids, copies=copies)
    undelivered = publisher.flush(120)
    console.print(f"published {stats['episodes']} episodes ({stats['steps']:,} steps) from {table}; "
                  f"failed {publisher.stats.failed}, undelivered {undelivered}")


STEP_FIELDS = ("episode_id", "actor_id", "task", "instruction", "step_index", "event_time_us", "policy_version",
               "images", "proprio", "action", "policy_action", "controller", "env_reward", "success")


def publish_episodes(rows: list[dict], sink, *, keep_ids: bool = False, copies: int = 1) -> dict:  # noqa: ANN001
    """Stored step rows (ordered by episode, step) → STARTED, Steps, ENDED records on ``sink``."""
    episodes: dict[str, list[dict]] = {}
    for row in rows:
        episodes.setdefault(row["episode_id"], []).append(row)
    n_steps = 0
    for copy in range(copies):
        for eid, steps in episodes.items():
            new_id = eid if keep_ids and copies == 1 else f"{eid}~r{uuid.uuid4().hex[:6]}{copy}"
            first, last = steps[0], steps[-1]
            now = time.time_ns() // 1000
            head = {"episode_id": new_id, "actor_id": first["actor_id"], "task": first["task"],
                    "instruction": first["instruction"], "policy_version": first["policy_version"]}
            sink.publish("EpisodeEvent", {**head, "kind": "STARTED", "event_time_us": now, "seed": None,
                                          "outcome": None, "num_steps": None}, key=new_id)
            for row in steps:
                rec = {k: row[k] for k in STEP_FIELDS}
                rec["episode_id"] = new_id
                sink.publish("Step", rec, key=new_id)
                n_steps += 1
            sink.publish("EpisodeEvent", {**head, "kind": "ENDED", "event_time_us": time.time_ns() // 1000,
                                          "seed": None, "outcome": last["outcome"], "num_steps": len(steps)},
                         key=new_id)
    return {"episodes": len(episodes) * copies, "steps": n_steps}
