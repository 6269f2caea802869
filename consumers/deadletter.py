"""The dead-letter path: what a message that cannot be processed carries onto ``sop.deadletter``.

The value is the original bytes, untouched; the headers say why and where it came from, so a
person (or a replay tool) can find it, fix the producer and re-publish it.
"""

from __future__ import annotations

import time

HEADER_ERROR = "sop.error"
HEADER_ERROR_TYPE = "sop.error_type"
HEADER_TOPIC = "sop.origin.topic"
HEADER_PARTITION = "sop.origin.partition"
HEADER_OFFSET = "sop.origin.offset"
HEADER_TIMESTAMP = "sop.origin.timestamp_ms"
HEADER_PROCESSOR = "sop.processor"
HEADER_FAILED_AT = "sop.failed_at_ms"


def deadletter_headers(
    *, error: BaseException, topic: str, partition: int, offset: int, timestamp_ms: int | None = None,
    processor: str = "",
) -> list[tuple[str, bytes]]:
    headers = [
        (HEADER_ERROR, str(error)[:4000].encode()),
        (HEADER_ERROR_TYPE, type(error).__name__.encode()),
        (HEADER_TOPIC, topic.encode()),
        (HEADER_PARTITION, str(partition).encode()),
        (HEADER_OFFSET, str(offset).encode()),
        (HEADER_PROCESSOR, processor.encode()),
        (HEADER_FAILED_AT, str(int(time.time() * 1000)).encode()),
    ]
    if timestamp_ms is not None:
        headers.append((HEADER_TIMESTAMP, str(timestamp_ms).encode()))
    return headers


def parse_headers(headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    """Headers of a dead letter as text (for `sop status`, tests and replay)."""
    return {k: (v.decode(errors="replace") if v is not None else "") for k, v in (headers or [])}
