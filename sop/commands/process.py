"""`sop process`: the faust stream processor (episodes, rewards, advantages → Delta, exactly once)."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import click
from confluent_kafka.admin import AdminClient

from infra.kafka_security import PROCESSOR
from sop.metrics import serve_metrics
from sop.settings import Settings, load_settings


def processor_config(settings: Settings, **overrides: object):  # noqa: ANN201 - ProcessorConfig
    from consumers.assembly import RewardConfig
    from consumers.processor import ProcessorConfig

    bootstrap = settings.bootstrap()
    md = AdminClient({"bootstrap.servers": bootstrap, **settings.kafka_client_config}).list_topics(timeout=15).topics
    counts = {t: len(md[t].partitions) for t in settings.topics.values() if t in md}
    missing = [t for t in settings.topics.values() if t not in md]
    if missing:
        raise click.ClickException(f"topics {missing} do not exist on {bootstrap}: run `sop up` first")
    if len(set(counts.values())) != 1:
        raise click.ClickException(f"the topics must have the same number of partitions (co-partitioned by episode): {counts}")
    from consumers.validation import validate_record
    from sop.actor_settings import load_actor_settings
    from sop.architectures import value_architectures
    from sop.contracts import processor_validation

    contracts, skew = processor_validation(settings, load_actor_settings())

    def validator(name: str, record: dict, key: bytes | None, now_us: int) -> None:
        validate_record(name, record, key=key, contracts=contracts, now_us=now_us, skew=skew)

    authenticator = None
    if settings.kafka_secure:  # who produced each event: the robot's signature (docs/security.md)
        from consumers.validation import check_identity

        keyring = Keyring(settings.robot_keyring)

        def authenticator(name: str, record: dict, topic: str, msg) -> None:  # noqa: ANN001 - consumers.machine.Inbound
            check_identity(record, topic=topic, key=msg.key, value=msg.value, headers=msg.headers,
                           identities=keyring.robots())

    kwargs = dict(
        validator=validator, authenticator=authenticator,
        bootstrap=bootstrap, topics=settings.topics, partitions=next(iter(counts.values())),
        client_config=settings.kafka_client_config, replication_factor=settings.replication_factor,
        min_insync_replicas=settings.min_insync_replicas, control_retention_ms=settings.retention_ms,
        lake_root=settings.lake_root, lake_storage_options=settings.lake_storage_options,
        group_id=settings.processor_group, datadir=settings.run_path / "processor",
        flush_interval_s=settings.processor_flush_interval_s, end_grace_s=settings.processor_end_grace_s,
        abort_timeout_s=settings.processor_abort_timeout_s, chunk_steps=settings.processor_chunk_steps,
        chunk_age_s=settings.processor_chunk_age_s, vacuum_interval_s=settings.processor_vacuum_interval_s,
        vacuum_retention_hours=settings.processor_vacuum_retention_hours,
        tracking_uri=settings.tracking_uri,
        value_model_name=settings.value_model_name, value_architectures=value_architectures(),
        value_model_version=None if settings.value_model_version is None else str(settings.value_model_version),
        reward=RewardConfig(max_episode_length=settings.max_episode_steps, c_fail=settings.recap_c_fail,
                            advantage_horizon=settings.recap_advantage_horizon),
        metrics_file=settings.run_path / "processor" / f"metrics-{settings.processor_group}@{socket.gethostname()}-{os.getpid()}.json",
    )
    kwargs.update(overrides)
    try:
        return ProcessorConfig(**kwargs)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


class Keyring:
    """The robots' signing keys (robots.json of `sop robot add`), read again when the file changes (checked at most
    once a second): a robot added while the processor runs is known at once, a revoked one is refused."""

    def __init__(self, path: Path, *, every_s: float = 1.0) -> None:
        self.path, self.every_s = path, every_s
        self._robots: dict = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = -1e9
        if path.exists():  # a damaged keyring stops the processor at start (later: the last good one is kept)
            from consumers.validation import parse_keyring

            try:
                parse_keyring(path.read_text(), source=str(path))
            except ValueError as exc:
                raise click.ClickException(str(exc)) from None
        self.robots()

    def robots(self) -> dict:
        from consumers.validation import parse_keyring

        now = time.monotonic()
        if now - self._checked < self.every_s:
            return self._robots
        self._checked = now
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._robots, self._stamp = {}, None  # no robot added yet: every event is refused as unsigned/unknown
            return self._robots
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                self._robots = parse_keyring(self.path.read_text(), source=str(self.path))
                self._stamp = stamp
            except ValueError as exc:  # keep the last good keyring rather than refuse every robot
                logging.getLogger("sop.processor").error("robot keyring not reloaded: %s", exc)
        return self._robots


@click.command("process")
@click.option("--loglevel", default="warning", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--stop-offsets", "stop_offsets_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON {topic: {partition: offset}}: do not process events from these offsets on (used by replay).")
def command(loglevel: str, stop_offsets_file: str | None) -> None:
    """Run the stream processor until Ctrl-C (several can run in one consumer group: one per partition at most)."""
    import json

    from consumers.processor import build_app, run_worker

    settings = load_settings(default_principal=PROCESSOR)
    overrides = {}
    if stop_offsets_file:
        raw = json.loads(Path(stop_offsets_file).read_text())
        overrides["stop_offsets"] = {t: {int(p): int(o) for p, o in parts.items()} for t, parts in raw.items()}
    config = processor_config(settings, **overrides)
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app, shell = build_app(config)
    endpoint = serve_metrics(shell.prometheus.registry, settings=settings, role="processor",
                             name=f"{settings.processor_group}@{socket.gethostname()}-{os.getpid()}",
                             port=settings.processor_metrics_port, setting="SOP_PROCESSOR_METRICS_PORT")
    try:
        run_worker(app, loglevel="warn" if loglevel == "warning" else loglevel)
    finally:
        if endpoint is not None:
            endpoint.close()
