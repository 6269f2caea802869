"""The wire contract of SOP.

Owns the Avro schemas (``avsc/*.avsc``: ``Step``, ``EpisodeEvent``, ``InterventionEvent``; every
released version kept under ``avsc/history/vN/``) and :mod:`schemas.codec`, the only code that
encodes or decodes Avro. Messages use Avro single-object encoding (``C3 01`` marker, 8-byte
little-endian CRC-64-AVRO fingerprint of the writer schema, binary payload); a decoder finds the
writer schema by its fingerprint and reads with the current reader schema. :mod:`schemas.identity` is the
other half of a message with Kafka security on: the robot's signature headers (``sop.principal``,
``sop.signature``) over the encoded bytes.

    from schemas import codec
    data = codec.encode("Step", step)          # bytes for Kafka
    name, record = codec.decode(data)          # ("Step", {...}) in the current schema
    old = codec.Codec(known_versions=["v1"])   # a consumer/producer of release v1 (SOP_CODEC_KNOWN_VERSIONS=v1)
"""

from schemas.codec import (
    Codec,
    CorruptMessageError,
    DecodeError,
    InvalidMessageError,
    UnknownSchemaError,
    decode,
    encode,
    released_versions,
    restrict_to,
    validate,
)
from schemas.records import RECORD_NAMES, TOPIC_OF_RECORD

__all__ = [
    "RECORD_NAMES",
    "TOPIC_OF_RECORD",
    "Codec",
    "CorruptMessageError",
    "DecodeError",
    "InvalidMessageError",
    "UnknownSchemaError",
    "decode",
    "encode",
    "released_versions",
    "restrict_to",
    "validate",
]
