"""The local stack and its deployment configs.

Owns starting and stopping one Apache Kafka broker (KRaft, combined broker/controller, jars
resolved from Maven Central by ``kafka/pom.xml`` into a cache outside the repository), the local
MLflow registry (SQLite backend + local artifact root, optional UI server), and topic creation.
Everything here also works against an external deployment: topic creation takes any bootstrap.

The cluster profile's services: :class:`infra.kafka.KafkaCluster` (three combined broker/controller nodes, a
KRaft quorum), :class:`infra.objectstore.LocalObjectStore` (SeaweedFS S3, built once from its Go module),
:class:`infra.postgres.LocalPostgres` and :class:`infra.mlflow_local.MlflowServer` (MLflow on PostgreSQL with
artifacts proxied to the bucket); :mod:`infra.kafka_client` maps the librdkafka-style client config onto aiokafka.
:mod:`infra.metrics` serves a process's own Prometheus registry over HTTP, announces it in the run directory and
reads endpoints back (`sop status`); the metric families themselves belong to the stage that counts them.
:mod:`infra.kafka_security` owns the secured mode (``SOP_KAFKA_SECURITY=scram-tls``): the local CA and the brokers'
certificate, SCRAM principals, the ACLs of each role, the robots' signing keys (docs/security.md).

    broker = LocalKafka(KafkaBrokerConfig(data_dir=run_dir / "kafka"))
    bootstrap = broker.start()             # formats storage if needed, waits until it answers
    ensure_topics(bootstrap, topic_specs)  # idempotent
    broker.stop()
"""

from infra.kafka import KafkaBrokerConfig, LocalKafka, StackError, TopicSpec, ensure_topics, free_port
from infra.mlflow_local import LocalMlflow, MlflowConfig

__all__ = [
    "KafkaBrokerConfig",
    "LocalKafka",
    "LocalMlflow",
    "MlflowConfig",
    "StackError",
    "TopicSpec",
    "ensure_topics",
    "free_port",
]
