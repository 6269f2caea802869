"""The dead-letter path: what a message that cannot be processed carries onto ``sop.deadletter``.

The value is the original bytes, untouched; the headers say why (a machine-readable ``sop.reason``
from :class:`Reason`, plus the error text) and where it came from, so a person (or ``sop replay
deadletter``) can find it, fix the producer or the processor, and re-process it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from enum import StrEnum

HEADER_REASON = "sop.reason"
HEADER_ERROR = "sop.error"
HEADER_ERROR_TYPE = "sop.error_type"
HEADER_TOPIC = "sop.origin.topic"
HEADER_PARTITION = "sop.origin.partition"
HEADER_OFFSET = "sop.origin.offset"
HEADER_TIMESTAMP = "sop.origin.timestamp_ms"
HEADER_PROCESSOR = "sop.processor"
HEADER_FAILED_AT = "sop.failed_at_ms"


class Reason(StrEnum):
    """Why an input event was dead-lettered (the ``sop.reason`` header)."""

    CORRUPT = "corrupt"  # not a single-object Avro message, or a garbled payload
    UNKNOWN_SCHEMA = "unknown-schema"  # a writer-schema fingerprint this processor does not know (yet)
    INVALID_VALUE = "invalid-value"  # decodes, but breaks the contract (non-finite, wrong lengths, bad image, ...)
    WRONG_TOPIC = "wrong-topic"  # a record of another type on this topic
    KEY_MISMATCH = "key-mismatch"  # the Kafka key is not the record's episode id
    CLOCK_SKEW = "clock-skew"  # event time outside the accepted window around the processor's clock
    LATE_STEP = "late-step"  # a step of an episode already written (forced close, or beyond its announced end)
    DUPLICATE_CONFLICT = "duplicate-conflict"  # a second copy of a step index whose content differs
    POISON_EPISODE = "poison-episode"  # the episode's close failed; its events are kept here, the rest goes on
    IDENTITY_MISMATCH = "identity-mismatch"  # the claimed actor does not belong to the producing principal
    PROCESSING_ERROR = "processing-error"  # an unexpected error handling this one event


class Rejected(ValueError):
    """An input event refused for ``reason``; the message says what is wrong with it."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def reason_of(error: BaseException) -> Reason:
    """The dead-letter reason for an exception raised while admitting an event."""
    if isinstance(error, Rejected):
        return error.reason
    from schemas import codec

    if isinstance(error, codec.UnknownSchemaError):
        return Reason.UNKNOWN_SCHEMA
    if isinstance(error, codec.CorruptMessageError):
        return Reason.CORRUPT
    if isinstance(error, codec.InvalidMessageError):
        return Reason.INVALID_VALUE
    return Reason.PROCESSING_ERROR


def deadletter_headers(
    *, error: BaseException | str, topic: str, partition: int, offset: int, timestamp_ms: int | None = None,
    processor: str = "", reason: Reason | None = None, origin_identity: Iterable[tuple[str, bytes]] = (),
) -> list[tuple[str, bytes]]:
    """The headers of a dead letter; ``origin_identity`` (the producer's signature headers) is kept as it came."""
    if reason is None:
        reason = reason_of(error) if isinstance(error, BaseException) else Reason.PROCESSING_ERROR
    headers = [
        (HEADER_REASON, str(reason).encode()),
        (HEADER_ERROR, str(error)[:4000].encode()),
        (HEADER_ERROR_TYPE, (type(error).__name__ if isinstance(error, BaseException) else str(reason)).encode()),
        (HEADER_TOPIC, topic.encode()),
        (HEADER_PARTITION, str(partition).encode()),
        (HEADER_OFFSET, str(offset).encode()),
        (HEADER_PROCESSOR, processor.encode()),
        (HEADER_FAILED_AT, str(int(time.time() * 1000)).encode()),
    ]
    if timestamp_ms is not None:
        headers.append((HEADER_TIMESTAMP, str(timestamp_ms).encode()))
    headers.extend(origin_identity)
    return headers


def parse_headers(headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    """Headers of a dead letter as text (for `sop status`, tests and replay)."""
    return {k: (v.decode(errors="replace") if v is not None else "") for k, v in (headers or [])}
