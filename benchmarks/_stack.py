"""The stack a benchmark runs on: ``local`` (one broker, the lake on local disk) or ``cluster`` (``sop up --profile
cluster`` in a temporary run directory: 3 KRaft brokers with topics RF 3 and ``min.insync.replicas=2``, the lake in
a SeaweedFS S3 bucket), each torn down afterwards. ``SOP_KAFKA_BOOTSTRAP`` (local only) uses a broker that runs."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from infra import KafkaBrokerConfig, LocalKafka
from infra.kafka import create_topic_set

PROFILES = ("local", "cluster")


@dataclass(frozen=True)
class BenchStack:
    profile: str
    bootstrap: str
    lake_uri: str  # a fresh lake root: a local folder or s3://bucket/prefix
    storage: dict[str, str] = field(default_factory=dict)  # the lake's storage options (S3 endpoint, keys)
    replication_factor: int = 1
    min_insync_replicas: int | None = None

    def topics(self, *, partitions: int = 4) -> dict[str, str]:
        """A fresh set of the four topics, replicated as the profile's own topics are."""
        return create_topic_set(self.bootstrap, prefix=f"bench{uuid.uuid4().hex[:6]}.", partitions=partitions,
                                replication_factor=self.replication_factor,
                                min_insync_replicas=self.min_insync_replicas)

    def describe(self) -> str:
        if self.profile == "local":
            return f"local profile: 1 broker at {self.bootstrap}, lake on local disk"
        return (f"cluster profile: 3 KRaft brokers (topics RF {self.replication_factor}, min.insync.replicas "
                f"{self.min_insync_replicas}), lake in S3 (SeaweedFS) at {self.lake_uri}")


@contextlib.contextmanager
def benchmark_stack(profile: str = "local") -> Iterator[BenchStack]:
    if profile not in PROFILES:
        raise SystemExit(f"--profile must be one of {PROFILES}, got {profile!r}")
    tmp = Path(tempfile.mkdtemp(prefix=f"sop-bench-{profile}-"))
    try:
        if profile == "local":
            with benchmark_kafka() as bootstrap:
                yield BenchStack(profile="local", bootstrap=bootstrap, lake_uri=str(tmp / "lake"))
            return
        from sop.settings import Settings, resolve_profile
        from sop.stack import down, running_cluster, up

        settings = Settings(run_dir=tmp / "run", profile="cluster", kafka_port=0)
        t0 = time.monotonic()
        try:
            up(settings)
            print(f"cluster profile up in {time.monotonic() - t0:.0f} s ({tmp / 'run'})")
            resolved = resolve_profile(settings)
            bucket = running_cluster(settings).bucket
            yield BenchStack(profile="cluster", bootstrap=resolved.bootstrap(),
                             lake_uri=f"s3://{bucket}/bench-{uuid.uuid4().hex[:6]}/lake",
                             storage=dict(resolved.lake_storage_options), replication_factor=3, min_insync_replicas=2)
        finally:
            down(settings)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
