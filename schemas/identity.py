"""Who produced an event, in a form the processor can verify: two Kafka headers next to the Avro value.

    signer = Signer(principal="robot-17", key=key)              # the key `sop robot add` issued to this robot
    headers = signer.headers(topic, key=b"ep-1", value=data)    # [("sop.principal", b"robot-17"), ("sop.signature", b"v1:...")]
    verify_signature(key, principal="robot-17", topic=topic, kafka_key=b"ep-1", value=data, signature=sig)  # bool

The broker authenticates every connection (SASL/SCRAM) and its ACLs decide what a principal may write, but it
does not stamp the producing principal on the records it stores, so a consumer cannot ask "who wrote this?".
Each robot therefore signs what it produces: HMAC-SHA256 under a per-robot secret key, over the principal, the
topic, the Kafka key and the value bytes (length-prefixed, so no two different inputs share a MAC input). Only
that robot and the processor's keyring hold the key, so another robot cannot produce an event that verifies as
this robot's; binding the topic and key means a signed value cannot be moved to another topic or episode either.
Why this and not per-robot topics: docs/security.md.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

HEADER_PRINCIPAL = "sop.principal"
HEADER_SIGNATURE = "sop.signature"
VERSION = "v1"
KEY_BYTES = 32
_DOMAIN = b"sop-event-signature-v1\0"


def _mac(key: bytes, *, principal: str, topic: str, kafka_key: bytes | str | None, value: bytes) -> bytes:
    if isinstance(kafka_key, str):
        kafka_key = kafka_key.encode()
    mac = hmac.new(key, _DOMAIN, hashlib.sha256)
    for part in (principal.encode(), topic.encode(), b"" if kafka_key is None else kafka_key):
        mac.update(len(part).to_bytes(4, "big"))
        mac.update(part)
    mac.update(b"\x01" if kafka_key is not None else b"\x00")  # a None key and an empty key differ
    mac.update(value)
    return mac.digest()


def signature(key: bytes, *, principal: str, topic: str, kafka_key: bytes | str | None, value: bytes) -> bytes:
    """The ``sop.signature`` header value: ``v1:`` and the base64 HMAC-SHA256."""
    return f"{VERSION}:".encode() + base64.b64encode(
        _mac(key, principal=principal, topic=topic, kafka_key=kafka_key, value=value))


def verify_signature(key: bytes, *, principal: str, topic: str, kafka_key: bytes | str | None, value: bytes,
                     signature: bytes) -> bool:
    """Whether ``signature`` (a ``sop.signature`` header value) is this principal's over this event."""
    head, _, mac = signature.partition(b":")
    if head != VERSION.encode():
        return False
    try:
        given = base64.b64decode(mac, validate=True)
    except ValueError:
        return False
    return hmac.compare_digest(given, _mac(key, principal=principal, topic=topic, kafka_key=kafka_key, value=value))


def header_values(headers: Iterable[tuple[str, bytes | None]] | Mapping[str, bytes | None] | None) -> dict[str, bytes]:
    """The headers as ``name -> bytes`` (faust hands a list of pairs or a mapping; a repeated name: the
    first wins, so a forged second copy of a header changes nothing)."""
    if not headers:
        return {}
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    out: dict[str, bytes] = {}
    for name, value in pairs:
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        out.setdefault(name, value if isinstance(value, bytes) else (value or "").encode())
    return out


def identity_headers(headers: Iterable[tuple[str, bytes | None]] | Mapping[str, bytes | None] | None,
                     ) -> tuple[tuple[str, bytes], ...]:
    """The producer's identity headers (principal and signature) of an event, if it has them: a dead letter keeps
    them, so that ``sop replay deadletter`` re-publishes the event as its robot signed it (the signature covers
    principal, topic, key and value, all of which a replay keeps)."""
    found = header_values(headers)
    return tuple((name, found[name]) for name in (HEADER_PRINCIPAL, HEADER_SIGNATURE) if name in found)


def decode_key(text: str) -> bytes:
    """A signing key as written in an identity file (base64); ValueError unless it decodes to 32 bytes."""
    try:
        key = base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"signing key is not base64: {exc}") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"signing key must be {KEY_BYTES} bytes, got {len(key)}")
    return key


@dataclass(frozen=True)
class Signer:
    """Signs a robot's events (what the publisher attaches to every message it produces)."""

    principal: str
    key: bytes

    def __post_init__(self) -> None:
        if not self.principal:
            raise ValueError("Signer.principal is empty")
        if len(self.key) != KEY_BYTES:
            raise ValueError(f"Signer.key must be {KEY_BYTES} bytes, got {len(self.key)}")

    def __repr__(self) -> str:  # never the key in a log line
        return f"Signer(principal={self.principal!r})"

    def headers(self, topic: str, *, key: bytes | str | None, value: bytes) -> list[tuple[str, bytes]]:
        return [(HEADER_PRINCIPAL, self.principal.encode()),
                (HEADER_SIGNATURE, signature(self.key, principal=self.principal, topic=topic, kafka_key=key,
                                             value=value))]


def load_signer(path: Path) -> Signer:
    """The signer of an identity file ``{"principal": ..., "key": base64}`` (what `sop robot add` writes);
    ValueError naming the file when it is unreadable or malformed."""
    try:
        raw = json.loads(Path(path).read_text())
        return Signer(principal=str(raw["principal"]), key=decode_key(str(raw["key"])))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"robot identity file {path}: {exc}") from None
