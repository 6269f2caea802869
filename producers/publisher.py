"""The event publisher: Avro-encoded records onto Kafka, idempotently, with nothing lost silently.

    publisher = EventPublisher(PublisherConfig(bootstrap="127.0.0.1:9092", topics=settings.topics))
    publisher.publish("Step", step, key=step["episode_id"])   # blocks (back-pressure) if the queue is full
    publisher.flush()                                         # returns how many are still undelivered
    publisher.stats                                           # produced / delivered / failed counts

Every message ends in exactly one of two counters: ``delivered`` (acknowledged by all in-sync
replicas) or ``failed`` (reported through ``on_failure`` and kept in ``failures``), never neither.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException, Producer

from schemas import codec

# librdkafka's own log lines (connection refused while a broker restarts, …) go to Python logging.
KAFKA_LOG = logging.getLogger("sop.kafka")


class PublishError(RuntimeError):
    """Publishing failed in a way the caller must handle."""


class BackpressureTimeout(PublishError):
    """The local queue stayed full for longer than ``max_block_s`` (the broker is down or too slow)."""


class DeliveryFailedError(PublishError):
    """A message could not be delivered (raised by ``flush``/``close`` when ``raise_on_failure``)."""


@dataclass(frozen=True)
class Failure:
    topic: str
    key: str | None
    error: str
    retriable: bool


@dataclass
class PublisherStats:
    produced: int = 0
    delivered: int = 0
    failed: int = 0
    backpressure_waits: int = 0
    bytes_produced: int = 0

    @property
    def in_flight(self) -> int:
        return self.produced - self.delivered - self.failed


@dataclass(frozen=True, kw_only=True)
class PublisherConfig:
    bootstrap: str
    topics: dict[str, str]  # record name -> topic
    client_config: dict[str, str] = field(default_factory=dict)
    compression: str = "lz4"
    linger_ms: int = 5
    batch_bytes: int = 1_000_000
    queue_max_messages: int = 100_000
    queue_max_kbytes: int = 256 * 1024
    delivery_timeout_ms: int = 120_000
    max_message_bytes: int = 8 * 1024 * 1024
    max_block_s: float = 300.0
    client_id: str = "sop-publisher"

    def __post_init__(self) -> None:
        if not self.bootstrap:
            raise ValueError("PublisherConfig.bootstrap is empty: set SOP_KAFKA_BOOTSTRAP or run `sop up`")
        missing = {"Step", "EpisodeEvent", "InterventionEvent"} - set(self.topics)
        if missing:
            raise ValueError(f"PublisherConfig.topics lacks a topic for {sorted(missing)}")

    def librdkafka(self) -> dict[str, object]:
        return {
            "bootstrap.servers": self.bootstrap,
            "client.id": self.client_id,
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": self.compression,
            "linger.ms": self.linger_ms,
            "batch.size": self.batch_bytes,
            "queue.buffering.max.messages": self.queue_max_messages,
            "queue.buffering.max.kbytes": self.queue_max_kbytes,
            "delivery.timeout.ms": self.delivery_timeout_ms,
            "message.max.bytes": self.max_message_bytes,
            **self.client_config,
        }


class EventPublisher:
    """Implements ``producers.interfaces.EventSink`` on confluent-kafka."""

    def __init__(
        self,
        config: PublisherConfig,
        *,
        on_failure: Callable[[Failure], None] | None = None,
        raise_on_failure: bool = True,
    ) -> None:
        self.config = config
        self.stats = PublisherStats()
        self.failures: list[Failure] = []
        self._on_failure = on_failure
        self._raise_on_failure = raise_on_failure
        self._lock = threading.Lock()
        self._producer = Producer({**config.librdkafka(), "logger": KAFKA_LOG})
        self._since_poll = 0

    # -- EventSink -----------------------------------------------------------------------------
    def publish(self, record_name: str, record: dict, *, key: str) -> None:
        """Encode and queue one record on its topic; blocks while the local queue is full."""
        topic = self.config.topics[record_name]
        self.publish_raw(topic, codec.encode(record_name, record), key=key)

    def publish_raw(self, topic: str, value: bytes, *, key: str | None, headers: list | None = None) -> None:
        """Queue already-encoded bytes (replay, dead letters, benchmarks)."""
        deadline: float | None = None
        while True:
            try:
                self._producer.produce(topic, value, key, on_delivery=self._delivered, headers=headers)
                break
            except BufferError:
                # Back-pressure: the queue holds queue_max_* messages; serve delivery reports until room frees up.
                self.stats.backpressure_waits += 1
                now = time.monotonic()
                deadline = deadline or now + self.config.max_block_s
                if now > deadline:
                    raise BackpressureTimeout(
                        f"local queue full for {self.config.max_block_s:.0f}s: is Kafka at {self.config.bootstrap} up?"
                    ) from None
                self._producer.poll(0.05)
            except KafkaException as exc:
                raise PublishError(f"could not queue a message on {topic}: {exc}") from exc
        with self._lock:
            self.stats.produced += 1
            self.stats.bytes_produced += len(value)
        self._since_poll += 1
        if self._since_poll >= 256:
            self._since_poll = 0
            self._producer.poll(0)

    def flush(self, timeout_s: float = 30.0) -> int:
        """Wait for delivery reports; return the number of messages still in flight."""
        remaining = self._producer.flush(timeout_s)
        self._check_failures()
        return remaining

    # -- lifecycle -----------------------------------------------------------------------------
    def poll(self, timeout_s: float = 0.0) -> None:
        """Serve delivery reports (call from idle loops)."""
        self._producer.poll(timeout_s)

    def close(self, timeout_s: float = 60.0) -> int:
        """Flush and report: returns the number of messages that are neither delivered nor failed."""
        return self.flush(timeout_s)

    def __enter__(self) -> EventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------
    def _delivered(self, err: KafkaError | None, msg) -> None:  # noqa: ANN001 - confluent Message
        with self._lock:
            if err is None:
                self.stats.delivered += 1
                return
            self.stats.failed += 1
            key = msg.key()
            failure = Failure(topic=msg.topic(), key=key.decode() if key else None, error=str(err),
                              retriable=err.retriable())
            self.failures.append(failure)
        if self._on_failure is not None:
            self._on_failure(failure)

    def _check_failures(self) -> None:
        if self._raise_on_failure and self.failures:
            first = self.failures[0]
            raise DeliveryFailedError(
                f"{len(self.failures)} message(s) could not be delivered (first: {first.topic} key={first.key}: {first.error})"
            )
