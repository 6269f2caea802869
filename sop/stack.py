"""The local stack as `sop up` / `sop down` / `sop status` and the test fixtures see it."""

from __future__ import annotations

from dataclasses import dataclass

from infra import KafkaBrokerConfig, LocalKafka, LocalMlflow, MlflowConfig, ensure_topics
from infra.kafka import wait_until_ready
from sop.settings import Settings


def local_kafka(settings: Settings) -> LocalKafka:
    return LocalKafka(KafkaBrokerConfig(data_dir=settings.run_path / "kafka", version=settings.kafka_version,
                                        port=settings.kafka_port, heap_mb=settings.kafka_heap_mb,
                                        max_message_bytes=settings.max_message_bytes))


def local_mlflow(settings: Settings) -> LocalMlflow:
    return LocalMlflow(MlflowConfig(tracking_uri=settings.tracking_uri, artifact_root=settings.artifact_root,
                                    state_dir=settings.run_path / "mlflow", ui_port=settings.mlflow_ui_port))


@dataclass
class StackInfo:
    bootstrap: str
    external_kafka: bool
    topics_created: list[str]
    tracking_uri: str
    ui_url: str | None


def up(settings: Settings, *, ui: bool = False) -> StackInfo:
    """Start what is not running yet (idempotent) and make sure topics and the MLflow experiment exist."""
    settings.run_path.mkdir(parents=True, exist_ok=True)
    if settings.kafka_bootstrap:
        bootstrap = settings.kafka_bootstrap
        wait_until_ready(bootstrap, timeout_s=30, client_config=settings.kafka_client_config)
    else:
        bootstrap = local_kafka(settings).start()
    created = ensure_topics(bootstrap, settings.topic_specs(), client_config=settings.kafka_client_config)
    mlflow = local_mlflow(settings)
    mlflow.init()
    url = mlflow.serve_ui() if ui else None
    return StackInfo(bootstrap=bootstrap, external_kafka=bool(settings.kafka_bootstrap), topics_created=created,
                     tracking_uri=settings.tracking_uri, ui_url=url)


def down(settings: Settings) -> dict[str, bool]:
    return {"mlflow-ui": local_mlflow(settings).stop_ui(), "kafka": local_kafka(settings).stop()}
