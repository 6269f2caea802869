"""A decoding Kafka consumer for tools and tests (the faust processor has its own loop).

    consumer = DecodingConsumer(DecodingConsumerConfig(bootstrap=..., group_id="tool", topics=[...],
                                                       deadletter_topic="sop.deadletter"))
    for msg in consumer.messages(timeout_s=5):   # DecodedMessage(name, record, topic, partition, offset)
        ...
    consumer.close()

A message that cannot be decoded or fails validation is copied to the dead-letter topic with the
error and its origin in headers (delivery confirmed before its offset is committed) and the
partition keeps moving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer

from consumers.deadletter import deadletter_headers
from schemas import codec
from schemas.identity import identity_headers

KAFKA_LOG = logging.getLogger("sop.kafka")


@dataclass(frozen=True)
class DecodedMessage:
    name: str
    record: dict
    topic: str
    partition: int
    offset: int
    key: str | None
    timestamp_ms: int | None


@dataclass(frozen=True, kw_only=True)
class DecodingConsumerConfig:
    bootstrap: str
    group_id: str
    topics: list[str]
    deadletter_topic: str
    client_config: dict[str, str] = field(default_factory=dict)
    from_beginning: bool = True
    processor_name: str = "decoding-consumer"


@dataclass
class ConsumerCounts:
    decoded: int = 0
    deadlettered: int = 0
    by_name: dict[str, int] = field(default_factory=dict)


class DecodingConsumer:
    def __init__(self, config: DecodingConsumerConfig) -> None:
        self.config = config
        self.counts = ConsumerCounts()
        self._consumer = Consumer({
            "bootstrap.servers": config.bootstrap,
            "group.id": config.group_id,
            "auto.offset.reset": "earliest" if config.from_beginning else "latest",
            "enable.auto.commit": True,
            "enable.auto.offset.store": False,
            **config.client_config,
            "logger": KAFKA_LOG,
        })
        self._dlq = Producer({"bootstrap.servers": config.bootstrap, "enable.idempotence": True, "acks": "all",
                              **config.client_config, "logger": KAFKA_LOG})
        self._consumer.subscribe(config.topics)

    def messages(self, *, timeout_s: float, max_messages: int | None = None,
                 idle_timeout_s: float | None = None) -> Iterator[DecodedMessage]:
        """Yield decoded messages until ``timeout_s`` passes (or ``max_messages``, or ``idle_timeout_s`` with nothing new)."""
        deadline = time.monotonic() + timeout_s
        last_seen = time.monotonic()
        n = 0
        while time.monotonic() < deadline and (max_messages is None or n < max_messages):
            if idle_timeout_s is not None and time.monotonic() - last_seen > idle_timeout_s:
                return
            msg = self._consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(msg.error())
            last_seen = time.monotonic()
            decoded = self._decode_or_deadletter(msg)
            self._consumer.store_offsets(msg)
            if decoded is not None:
                n += 1
                yield decoded

    def _decode_or_deadletter(self, msg) -> DecodedMessage | None:  # noqa: ANN001 - confluent Message
        try:
            name, record = codec.decode(msg.value())
        except codec.DecodeError as exc:
            ts_type, ts = msg.timestamp()
            self._dlq.produce(
                self.config.deadletter_topic, msg.value(), msg.key(),
                headers=deadletter_headers(error=exc, topic=msg.topic(), partition=msg.partition(),
                                           offset=msg.offset(), timestamp_ms=ts if ts_type else None,
                                           processor=self.config.processor_name,
                                           origin_identity=identity_headers(msg.headers())),
            )
            # The offset is committed only after the dead letter is safely stored: nothing is lost.
            if self._dlq.flush(30) != 0:
                raise KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT, "dead letter not delivered")) from exc
            self.counts.deadlettered += 1
            return None
        self.counts.decoded += 1
        self.counts.by_name[name] = self.counts.by_name.get(name, 0) + 1
        key = msg.key()
        ts_type, ts = msg.timestamp()
        return DecodedMessage(name=name, record=record, topic=msg.topic(), partition=msg.partition(),
                              offset=msg.offset(), key=key.decode() if key else None,
                              timestamp_ms=ts if ts_type else None)

    def close(self) -> None:
        self._dlq.flush(30)
        self._consumer.close()

    def __enter__(self) -> DecodingConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
