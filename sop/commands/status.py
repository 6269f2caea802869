"""`sop status`: what runs and where — broker, topics and their sizes, registry, UI."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass

import click
from confluent_kafka import Consumer, TopicPartition
from rich.console import Console
from rich.table import Table

from sop.cli_options import PROFILE_OPTION
from sop.live import partition_lag
from sop.settings import SettingsError, load_settings
from sop.stack import cluster_status, local_kafka, local_mlflow


@dataclass(frozen=True)
class TopicSize:
    partitions: int
    messages: int  # currently retained
    replicas: int  # of the least replicated partition
    in_sync: int  # of the partition with the fewest in-sync replicas


def topic_sizes(bootstrap: str, topics: list[str], client_config: dict) -> dict[str, TopicSize]:
    """topic -> partitions, messages currently retained, replication."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "sop-status", **client_config})
    try:
        md = consumer.list_topics(timeout=5).topics
        out = {}
        for t in topics:
            if t not in md:
                continue
            total = 0
            for p in md[t].partitions:
                lo, hi = consumer.get_watermark_offsets(TopicPartition(t, p), timeout=5)
                total += hi - lo
            parts = md[t].partitions.values()
            out[t] = TopicSize(partitions=len(md[t].partitions), messages=total,
                               replicas=min((len(p.replicas) for p in parts), default=0),
                               in_sync=min((len(p.isrs) for p in parts), default=0))
        return out
    finally:
        consumer.close()


@click.command("status")
@PROFILE_OPTION
def command(profile: str | None) -> None:
    """Say what runs and where."""
    settings = load_settings(profile=profile)
    console = Console()
    table = Table(title=f"SOP stack ({settings.profile}, {settings.run_path})", show_lines=False)
    table.add_column("part")
    table.add_column("state")
    table.add_column("where")
    cluster = cluster_status(settings) if settings.profile == "cluster" else {}
    for part, (state, where) in cluster.items():
        table.add_row(part, state, where)
    try:
        bootstrap = settings.bootstrap()
        if settings.profile == "cluster":
            up = sum(1 for part, (s, _) in cluster.items() if part.startswith("kafka") and s == "running")
            state = f"{up} of {settings.cluster_kafka_nodes} brokers" if up else "stopped"
        else:
            broker = local_kafka(settings).state()
            state = "external" if settings.kafka_bootstrap else ("running" if broker else "stopped")
    except SettingsError:
        bootstrap, state = None, "stopped"
    table.add_row("kafka", state, bootstrap or "-")
    if bootstrap and state != "stopped":
        try:
            for topic, size in topic_sizes(bootstrap, list(settings.topics.values()),
                                           settings.kafka_client_config).items():
                table.add_row(f"  {topic}", f"{size.messages:,} messages",
                              f"{size.partitions} partitions × {size.replicas} replicas ({size.in_sync} in sync)")
        except Exception as exc:  # status must always print something useful
            table.add_row("  topics", f"[red]unreachable[/] {exc}", "")
    for metrics_file in sorted((settings.run_path / "processor").glob("metrics-*.json")):
        try:
            m = json.loads(metrics_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        group, _, worker = metrics_file.stem.removeprefix("metrics-").partition("@")
        age = time.time() - m.get("updated_at", 0)
        if age > 3600:
            continue  # a worker long gone
        state = "running" if age < 30 else f"last seen {age / 60:.0f} min ago"
        p50, p99 = m.get("commit_latency_p50_s"), m.get("commit_latency_p99_s")
        lat = f"commit p50 {p50:.2f}s p99 {p99:.2f}s" if p50 is not None else "no commits yet"
        table.add_row(f"processor {group} {worker}", state,
                      f"{m.get('steps_per_s', 0):,.0f} steps/s · {m.get('episodes_closed', 0)} episodes · "
                      f"{m.get('deadletters', 0)} dead letters · {lat}")
        by_reason = m.get("deadletters_by_reason") or {}
        if by_reason:
            table.add_row("  dead letters", f"{sum(by_reason.values()):,}",
                          " · ".join(f"{r} {n:,}" for r, n in sorted(by_reason.items())))
        counted = {k: v for k, v in (m.get("counted") or {}).items() if v}
        if counted:
            table.add_row("  counted, not stored", f"{sum(counted.values()):,}",
                          " · ".join(f"{k} {n:,}" for k, n in sorted(counted.items())))
        quality = [f"{k.removeprefix('episodes_')} {m[k]:,}" for k in ("episodes_forced", "episodes_aborted",
                                                                      "episodes_poisoned") if m.get(k)]
        if quality:
            table.add_row("  episodes not closed by their end", "", " · ".join(quality))
        if bootstrap and state == "running":
            for topic, parts in partition_lag(bootstrap, group, settings).items():
                table.add_row(f"  lag {topic}", f"{sum(parts.values()):,}",
                              " ".join(f"p{p}:{lag}" for p, lag in sorted(parts.items())))
    if settings.profile == "cluster":
        with contextlib.suppress(SettingsError):
            table.add_row("lake", "s3", settings.lake_root)
    elif settings.security:
        from sop.stack import local_registry_server

        server = local_registry_server(settings, auth=False)
        table.add_row("mlflow", "running (basic-auth)" if server.state() else "stopped",
                      settings.mlflow_tracking_uri or "-")
    else:
        ui = local_mlflow(settings).ui_state()
        table.add_row("mlflow", "local sqlite" if not settings.mlflow_tracking_uri else "external",
                      settings.tracking_uri)
        table.add_row("mlflow ui", "running" if ui else "stopped", ui["url"] if ui else "-")
    console.print(table)
