"""The signature headers of robot events (schemas.identity): what they bind, and the identity file."""

from __future__ import annotations

import base64
import json

import pytest

from schemas.identity import (
    HEADER_PRINCIPAL,
    HEADER_SIGNATURE,
    Signer,
    header_values,
    load_signer,
    verify_signature,
)

KEY = bytes(range(32))


def test_a_signature_verifies_only_for_the_same_principal_topic_key_and_value() -> None:
    signer = Signer("robot-1", KEY)
    headers = dict(signer.headers("sop.steps", key="ep-1", value=b"payload"))
    assert headers[HEADER_PRINCIPAL] == b"robot-1"
    sig = headers[HEADER_SIGNATURE]
    base = {"principal": "robot-1", "topic": "sop.steps", "kafka_key": b"ep-1", "value": b"payload"}
    assert verify_signature(KEY, **base, signature=sig)
    for change in ({"principal": "robot-2"}, {"topic": "sop.episodes"}, {"kafka_key": b"ep-2"}, {"kafka_key": None},
                   {"value": b"payloaD"}):
        assert not verify_signature(KEY, **{**base, **change}, signature=sig), change
    assert not verify_signature(bytes(32), **base, signature=sig)
    assert not verify_signature(KEY, **base, signature=b"v2:" + sig[3:])
    # field boundaries are length-prefixed: moving bytes between principal and topic changes the MAC
    assert not verify_signature(KEY, **{**base, "principal": "robot-1s", "topic": "op.steps"}, signature=sig)


def test_headers_read_as_a_mapping_first_copy_wins() -> None:
    assert header_values([("a", b"1"), ("a", b"2"), (b"b", None)]) == {"a": b"1", "b": b""}
    assert header_values(None) == {} and header_values({"x": b"y"}) == {"x": b"y"}


def test_the_key_never_shows_in_a_repr_and_must_be_32_bytes() -> None:
    assert "key" not in repr(Signer("r", KEY))
    with pytest.raises(ValueError, match="32 bytes"):
        Signer("r", b"short")


def test_an_identity_file_loads_or_names_itself(tmp_path) -> None:
    good = tmp_path / "r.json"
    good.write_text(json.dumps({"principal": "r", "key": base64.b64encode(KEY).decode()}))
    assert load_signer(good) == Signer("r", KEY)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"principal": "r", "key": "bm9wZQ=="}))
    with pytest.raises(ValueError, match="bad.json"):
        load_signer(bad)
    with pytest.raises(ValueError, match="missing.json"):
        load_signer(tmp_path / "missing.json")
