from __future__ import annotations

import uuid

from infra import kafka


def test_cluster_ids_never_start_with_a_dash(monkeypatch) -> None:
    """kafka-storage would read such an id as an option; base64url starts with '-' for a first byte 0xF8-0xFB."""
    drawn = iter([uuid.UUID(bytes=bytes([0xF8]) + bytes(15)), uuid.UUID(bytes=bytes([0x12]) + bytes(15))])
    monkeypatch.setattr(kafka.uuid, "uuid4", lambda: next(drawn))
    cluster_id = kafka.new_cluster_id()
    assert not cluster_id.startswith("-")
    assert cluster_id.startswith("E")  # the second draw
    assert len(cluster_id) == 22
