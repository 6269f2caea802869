"""`sop status`: what runs and where — broker, topics and their sizes, registry, UI, and the key figures of every
processor, learner and actor of this run directory, read from their Prometheus endpoints."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import click
from confluent_kafka import Consumer, TopicPartition
from rich.console import Console
from rich.table import Table

from infra.metrics import announcements, scrape
from sop.cli_options import PROFILE_OPTION
from sop.metrics import announce_dir, status_rows
from sop.settings import Settings, SettingsError, load_settings
from sop.stack import cluster_status, local_kafka, local_mlflow


@dataclass(frozen=True)
class TopicSize:
    partitions: int
    messages: int  # currently retained
    replicas: int  # of the least replicated partition
    in_sync: int  # of the partition with the fewest in-sync replicas


def endpoint_rows(settings: Settings) -> list[tuple[str, str, str]]:
    """The key figures of every process that announced a Prometheus endpoint in the run directory (processors,
    learner, actors), read from the endpoint itself. An announcement left by a process that is gone is removed."""
    rows: list[tuple[str, str, str]] = []
    for found in announcements(announce_dir(settings)):
        if not found.alive:
            with contextlib.suppress(OSError):
                found.path.unlink()
            continue
        try:
            rows += status_rows(found, scrape(found.url))
        except (OSError, ValueError) as exc:
            rows.append((f"{found.role} {found.name}", "[red]unreachable[/]", f"{found.url} ({exc})"))
    return rows


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
    for row in endpoint_rows(settings):
        table.add_row(*row)
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
