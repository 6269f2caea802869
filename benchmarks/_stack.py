"""A broker for a benchmark: SOP_KAFKA_BOOTSTRAP if set, else a fresh local one torn down afterwards."""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from infra import KafkaBrokerConfig, LocalKafka
from infra.kafka import create_topic_set


@contextlib.contextmanager
def benchmark_kafka() -> Iterator[str]:
    if os.environ.get("SOP_KAFKA_BOOTSTRAP"):
        yield os.environ["SOP_KAFKA_BOOTSTRAP"]
        return
    with tempfile.TemporaryDirectory(prefix="sop-bench-") as tmp:
        broker = LocalKafka(KafkaBrokerConfig(data_dir=Path(tmp), port=0, heap_mb=1024))
        try:
            yield broker.start()
        finally:
            broker.stop()


def fresh_topics(bootstrap: str, *, partitions: int = 4) -> dict[str, str]:
    return create_topic_set(bootstrap, prefix=f"bench{uuid.uuid4().hex[:6]}.", partitions=partitions)
