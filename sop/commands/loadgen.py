"""`sop loadgen`: publish realistic robot streams (steps with JPEG frames, episodes, interventions)."""

from __future__ import annotations

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from producers.loadgen import LoadGenConfig, run_loadgen
from producers.publisher import EventPublisher, PublisherConfig
from schemas.identity import load_signer
from sop.settings import Settings, load_settings


def make_publisher(settings: Settings, **kw: object) -> EventPublisher:
    return EventPublisher(PublisherConfig(
        bootstrap=settings.bootstrap(), topics=settings.topics, client_config=settings.kafka_client_config,
        compression=settings.publish_compression, linger_ms=settings.publish_linger_ms,
        queue_max_messages=settings.publish_queue_max_messages, queue_max_kbytes=settings.publish_queue_max_kbytes,
        delivery_timeout_ms=settings.publish_delivery_timeout_ms, max_message_bytes=settings.max_message_bytes,
        signer=load_signer(settings.publish_identity_file) if settings.publish_identity_file else None,
    ), **kw)  # type: ignore[arg-type]


@click.command("loadgen")
@click.option("--robots", default=4, show_default=True, help="Number of simulated robots.")
@click.option("--hz", default=30.0, show_default=True, help="Control rate per robot (0 = as fast as possible).")
@click.option("--image-size", default=64, show_default=True, help="Camera image side in pixels.")
@click.option("--cameras", default=1, show_default=True,
              help="JPEG frames per step: MetaWorld's camera names (corner, corner2, corner3, topview, ...), so the "
                   "processor takes them when started with the same SOP_ACTOR_CAMERAS and SOP_ACTOR_IMAGE_SIZE.")
@click.option("--duration", "duration_s", default=10.0, show_default=True, help="Seconds to keep starting episodes.")
@click.option("--episodes", default=None, type=int, help="Stop after this many episodes instead.")
@click.option("--intervention-rate", default=0.3, show_default=True, help="Share of episodes with a human takeover.")
@click.option("--seed", default=0, show_default=True)
def command(robots: int, hz: float, image_size: int, cameras: int, duration_s: float, episodes: int | None,
            intervention_rate: float, seed: int) -> None:
    """Publish a simulated fleet's event streams to Kafka, for tests and benchmarks."""
    settings = load_settings()
    try:
        cfg = LoadGenConfig(robots=robots, hz=hz, image_size=image_size, cameras=cameras,
                            duration_s=None if episodes else duration_s,
                            episodes=episodes, intervention_rate=intervention_rate, seed=seed)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    console = Console()
    with make_publisher(settings) as publisher, Progress(
        TextColumn("[bold]loadgen"), BarColumn(), TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
        console=console, transient=True,
    ) as progress:
        task = progress.add_task("publish", total=episodes or duration_s, stats="")

        def show(r) -> None:  # noqa: ANN001
            progress.update(task, completed=r.episodes if episodes else min(duration_s, r.steps / max(1, robots * hz or 1)),
                            stats=f"{r.steps:,} steps · {r.episodes} episodes · {publisher.stats.delivered:,} acked")

        report = run_loadgen(cfg, publisher, progress=show)
        undelivered = publisher.flush(60)
    console.print(f"published {report.steps:,} steps, {report.episodes} episodes, {report.interventions} interventions "
                  f"in {report.elapsed_s:.1f}s ({report.steps_per_s:,.0f} steps/s); "
                  f"delivered {publisher.stats.delivered:,}, failed {publisher.stats.failed}, in flight {undelivered}")
