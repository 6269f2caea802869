"""The local stack and its deployment configs.

Owns starting and stopping one Apache Kafka broker (KRaft, combined broker/controller, jars
resolved from Maven Central by ``kafka/pom.xml`` into a cache outside the repository), the local
MLflow registry (SQLite backend + local artifact root, optional UI server), and topic creation.
Everything here also works against an external deployment: topic creation takes any bootstrap.

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
