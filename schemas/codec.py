"""Avro single-object encoding for SOP's wire records. The only module that imports fastavro.

Encoding: ``C3 01`` + 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's
parsing canonical form + Avro binary payload (Avro specification, "Single-object encoding").
Decoding resolves the writer schema by fingerprint among every schema version kept in
``avsc/`` and ``avsc/history/`` and reads the payload into the *current* reader schema, so
old messages keep decoding after a compatible schema change.

Released versions live in ``avsc/history/vN/`` (each holds the whole contract as released);
``avsc/*.avsc`` is the current one and must equal the newest release. A codec can be limited to
some releases, to run (or test) a consumer or producer that predates a release:

    codec.decode(data)                                   # every release known, read as the current schema
    old = codec.Codec(known_versions=["v1"])             # a v1-only codec: reads into and writes v1
    old.decode(v2_bytes)                                 # raises UnknownSchemaError
    codec.restrict_to(["v1"])                            # the module-level encode/decode become v1-only

``SOP_CODEC_KNOWN_VERSIONS=v1`` (comma-separated releases; empty or unset = all) does the same as
``restrict_to`` for a whole process, read once at import: an unknown release name fails at import
and names the variable, so a processor started with a bad value stops at start.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from math import isfinite
from pathlib import Path
from typing import Any

import fastavro
import fastavro.validation
from fastavro.schema import fingerprint, to_parsing_canonical_form

from schemas.records import RECORD_NAMES

MARKER = b"\xc3\x01"
HEADER_SIZE = len(MARKER) + 8
AVSC_DIR = Path(__file__).parent / "avsc"
KNOWN_VERSIONS_ENV = "SOP_CODEC_KNOWN_VERSIONS"
_VERSION_DIR = re.compile(r"v([0-9]+)")


class DecodeError(ValueError):
    """A message could not be turned into a valid record."""


class CorruptMessageError(DecodeError):
    """The bytes are not a single-object-encoded Avro message of a known schema, or the payload is truncated/garbled."""


class UnknownSchemaError(DecodeError):
    """The message names a writer-schema fingerprint that this codec does not know."""

    def __init__(self, fp: bytes) -> None:
        super().__init__(f"unknown writer schema fingerprint {fp.hex()} (is this consumer older than the producer?)")
        self.fingerprint = fp


class InvalidMessageError(DecodeError):
    """The record decodes but breaks a rule of the contract (empty ids, negative step index, ...)."""


@dataclass(frozen=True)
class _Schema:
    name: str
    version: str
    parsed: Any
    fingerprint: bytes  # 8 bytes, little-endian as written on the wire
    fast_encoder: Any = None  # generated encoder, or None to use fastavro


def _load(path: Path, version: str) -> _Schema:
    raw = json.loads(path.read_text())
    parsed = fastavro.parse_schema(raw)
    fp_hex = fingerprint(to_parsing_canonical_form(raw), "CRC-64-AVRO")
    # fastavro returns the fingerprint as big-endian hex of the 64-bit value; the wire holds it little-endian.
    fp = int(fp_hex, 16).to_bytes(8, "little")
    try:
        fast = _compile_encoder(raw)
    except _Unsupported:
        fast = None
    return _Schema(name=raw["name"], version=version, parsed=parsed, fingerprint=fp, fast_encoder=fast)


@dataclass(frozen=True)
class SchemaRegistry:
    current: dict[str, _Schema]  # the reader schema per record name
    by_fingerprint: dict[bytes, _Schema]  # every writer schema this registry accepts
    known_versions: tuple[str, ...] = ()  # the releases it holds, oldest first

    def versions(self, name: str) -> list[_Schema]:
        return sorted({s.version: s for s in self.by_fingerprint.values() if s.name == name}.values(),
                      key=lambda s: _version_key(s.version))


def _version_key(version: str) -> tuple[int, str]:
    m = _VERSION_DIR.fullmatch(version)
    return (int(m.group(1)), "") if m else (1 << 30, version)  # "current" (unreleased) sorts last


def released_versions(avsc_dir: Path = AVSC_DIR) -> tuple[str, ...]:
    """The release directories under ``avsc/history`` (``("v1", "v2")``), oldest first."""
    history = avsc_dir / "history"
    found = [d.name for d in history.iterdir() if d.is_dir() and _VERSION_DIR.fullmatch(d.name)] \
        if history.exists() else []
    return tuple(sorted(found, key=_version_key))


def _check_versions(versions: Iterable[str], avsc_dir: Path, *, source: str) -> tuple[str, ...]:
    wanted = tuple(dict.fromkeys(v.strip() for v in versions if v.strip()))
    released = released_versions(avsc_dir)
    unknown = [v for v in wanted if v not in released]
    if unknown or not wanted:
        raise ValueError(f"{source}: unknown schema release(s) {unknown or wanted!r}; "
                         f"released: {', '.join(released)} (comma-separated, e.g. 'v1' or 'v1,v2')")
    return tuple(sorted(wanted, key=_version_key))


@cache
def registry(avsc_dir: Path = AVSC_DIR, known_versions: tuple[str, ...] | None = None) -> SchemaRegistry:
    """Schemas by fingerprint. ``known_versions=None``: every release plus the current files, read as
    the current schema; a tuple of releases: only those, read as the newest of them (an older codec)."""
    if known_versions is None:
        versions = released_versions(avsc_dir)
        current = {name: _load(avsc_dir / f"{name}.avsc", "current") for name in RECORD_NAMES}
    else:
        versions = _check_versions(known_versions, avsc_dir, source="known_versions")
        current = {}
        for name in RECORD_NAMES:
            newest = next((v for v in reversed(versions) if (avsc_dir / "history" / v / f"{name}.avsc").exists()),
                          None)
            if newest is None:
                raise ValueError(f"no schema of {name} in releases {versions}")
            current[name] = _load(avsc_dir / "history" / newest / f"{name}.avsc", newest)
    by_fp: dict[bytes, _Schema] = {}
    for version in versions:
        for path in sorted((avsc_dir / "history" / version).glob("*.avsc")):
            s = _load(path, version)
            by_fp.setdefault(s.fingerprint, s)  # an unchanged schema keeps the label of its first release
    for s in current.values():
        by_fp.setdefault(s.fingerprint, s)
    return SchemaRegistry(current=current, by_fingerprint=by_fp, known_versions=versions)


# -- fast encoder -------------------------------------------------------------------------------
# fastavro's writer costs ~12–17 µs for a Step; publishing must keep up with raw Kafka produce, so
# each schema is compiled once into straight-line Python (checked byte-for-byte against fastavro
# in tests/unit/schemas). Schemas using features outside this subset fall back to fastavro.

_VARINT_CACHE = []


def _zigzag_varint(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_VARINT_CACHE.extend(_zigzag_varint(i) for i in range(4096))


def _varint(n: int) -> bytes:
    return _VARINT_CACHE[n] if 0 <= n < 4096 else _zigzag_varint(n)


_FLOAT_STRUCTS: dict[int, struct.Struct] = {}


def _floats(values) -> bytes:  # noqa: ANN001 - list or array of floats
    n = len(values)
    if n == 0:
        return b"\x00"
    s = _FLOAT_STRUCTS.get(n)
    if s is None:
        s = _FLOAT_STRUCTS[n] = struct.Struct(f"<{n}f")
    return _varint(n) + s.pack(*values) + b"\x00"


class _Unsupported(Exception):
    pass


def _compile_encoder(schema: dict):  # noqa: ANN202 - returns the generated function
    """Generate ``encode(record) -> bytes`` (payload only) for a schema of records, arrays, enums,
    primitives and two-branch ``["null", T]`` unions."""
    lines: list[str] = []
    env: dict[str, object] = {"_varint": _varint, "_floats": _floats, "_pack_f": struct.Struct("<f").pack,
                              "_pack_d": struct.Struct("<d").pack}
    named: dict[str, dict] = {}
    counter = [0]

    def fresh(prefix: str) -> str:
        counter[0] += 1
        return f"{prefix}{counter[0]}"

    def emit(t, expr: str, indent: str) -> None:  # noqa: ANN001
        if isinstance(t, str) and t in named:
            t = named[t]
        if isinstance(t, list):
            if len(t) != 2 or "null" not in t:
                raise _Unsupported("union")
            null_idx = t.index("null")
            var = fresh("u")
            lines.append(f"{indent}{var} = {expr}")
            lines.append(f"{indent}if {var} is None:")
            lines.append(f"{indent}    w({_varint(null_idx)!r})")
            lines.append(f"{indent}else:")
            lines.append(f"{indent}    w({_varint(1 - null_idx)!r})")
            emit(t[1 - null_idx], var, indent + "    ")
            return
        if isinstance(t, dict):
            kind = t["type"]
            if kind == "record":
                named[t["name"]] = t
                if "namespace" in t:
                    named[f"{t['namespace']}.{t['name']}"] = t
                var = fresh("r")
                lines.append(f"{indent}{var} = {expr}")
                for f in t["fields"]:
                    if "default" in f:
                        fexpr = f"{var}.get({f['name']!r}, {f['default']!r})"
                    else:
                        fexpr = f"{var}[{f['name']!r}]"
                    emit(f["type"], fexpr, indent)
                return
            if kind == "enum":
                named[t["name"]] = t
                table = fresh("enum")
                env[table] = {s: _varint(i) for i, s in enumerate(t["symbols"])}
                lines.append(f"{indent}w({table}[{expr}])")
                return
            if kind == "array":
                if t["items"] == "float":
                    lines.append(f"{indent}w(_floats({expr}))")
                    return
                var, item = fresh("a"), fresh("x")
                lines.append(f"{indent}{var} = {expr}")
                lines.append(f"{indent}if {var}:")
                lines.append(f"{indent}    w(_varint(len({var})))")
                lines.append(f"{indent}    for {item} in {var}:")
                emit(t["items"], item, indent + "        ")
                lines.append(f"{indent}w(b'\\x00')")
                return
            if kind in ("map", "fixed", "error") or "logicalType" in t:
                raise _Unsupported(kind)
            emit(kind, expr, indent)
            return
        if t == "null":
            return
        if t == "boolean":
            lines.append(f"{indent}w(b'\\x01' if {expr} else b'\\x00')")
        elif t in ("int", "long"):
            lines.append(f"{indent}w(_varint({expr}))")
        elif t == "float":
            lines.append(f"{indent}w(_pack_f({expr}))")
        elif t == "double":
            lines.append(f"{indent}w(_pack_d({expr}))")
        elif t == "string":
            var = fresh("s")
            lines.append(f"{indent}{var} = {expr}.encode()")
            lines.append(f"{indent}w(_varint(len({var})))")
            lines.append(f"{indent}w({var})")
        elif t == "bytes":
            var = fresh("b")
            lines.append(f"{indent}{var} = {expr}")
            lines.append(f"{indent}w(_varint(len({var})))")
            lines.append(f"{indent}w({var})")
        else:
            raise _Unsupported(str(t))

    emit(schema, "record", "    ")
    src = "def encode(record, header):\n    buf = bytearray(header)\n    w = buf.extend\n" + "\n".join(lines) + \
        "\n    return bytes(buf)\n"
    exec(compile(src, f"<avro encoder {schema.get('name')}>", "exec"), env)  # noqa: S102 - generated from our own .avsc
    return env["encode"]


def schema_versions(name: str, avsc_dir: Path = AVSC_DIR) -> dict[str, dict]:
    """Every kept version of a record's schema (``{"v1": {...}, "v2": {...}, "current": {...}}``) as JSON dicts."""
    out: dict[str, dict] = {}
    for version in released_versions(avsc_dir):
        path = avsc_dir / "history" / version / f"{name}.avsc"
        if path.exists():
            out[version] = json.loads(path.read_text())
    out["current"] = json.loads((avsc_dir / f"{name}.avsc").read_text())
    return out


def _encode_error(name: str, parsed: Any, record: dict[str, Any], exc: Exception) -> InvalidMessageError:  # noqa: ANN401
    """Why the generated encoder refused ``record``: fastavro's validator names the field (it runs only on this
    error path, so the fast path stays fast). A record fastavro accepts is a bug of the generated encoder, and
    is said so rather than written some other way."""
    try:
        fastavro.validation.validate(record, parsed, raise_errors=True)
    except (fastavro.validation.ValidationError, ValueError, TypeError, KeyError, AttributeError) as invalid:
        detail = "; ".join(str(e) for e in getattr(invalid, "errors", ())) or str(invalid)
        return InvalidMessageError(f"{name} record does not match its schema: {detail}")
    return InvalidMessageError(f"{name} record is valid for fastavro but the generated encoder failed on it "
                               f"({type(exc).__name__}: {exc}): a bug in schemas.codec._compile_encoder")


class Codec:
    """Encode and decode over a set of schema releases (all of them by default).

        codec.Codec().decode(data)                        # what the module-level decode does
        v1 = codec.Codec(known_versions=["v1"])           # a consumer/producer built before v2
        v1.encode("Step", step)                           # written with the v1 schema (a v1 producer)
        v1.decode(v2_message)                             # UnknownSchemaError -> dead letter 'unknown-schema'
    """

    def __init__(self, known_versions: Iterable[str] | None = None, *, avsc_dir: Path = AVSC_DIR) -> None:
        self.registry = registry(avsc_dir, None if known_versions is None else tuple(known_versions))

    @property
    def known_versions(self) -> tuple[str, ...]:
        return self.registry.known_versions

    def encode(self, name: str, record: dict[str, Any], *, schema: dict | None = None) -> bytes:
        """Encode ``record`` as this codec's newest ``name`` schema (or an explicit writer ``schema``, for tests of
        old versions)."""
        if schema is None:
            s = self.registry.current[name]
            if s.fast_encoder is not None:
                try:
                    return s.fast_encoder(record, MARKER + s.fingerprint)
                except (KeyError, TypeError, AttributeError, ValueError, struct.error, IndexError) as exc:
                    raise _encode_error(name, s.parsed, record, exc) from exc
            parsed, fp = s.parsed, s.fingerprint
        else:
            parsed = fastavro.parse_schema(schema)
            fp = int(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"), 16).to_bytes(8, "little")
        buf = io.BytesIO()
        buf.write(MARKER)
        buf.write(fp)
        try:
            fastavro.schemaless_writer(buf, parsed, record)
        except (ValueError, TypeError, KeyError, AttributeError, struct.error) as exc:
            raise InvalidMessageError(f"{name} record does not match its schema: {exc}") from exc
        return buf.getvalue()

    def decode(self, data: bytes, *, validate_record: bool = True) -> tuple[str, dict[str, Any]]:
        """Decode one single-object-encoded message into ``(record name, record in this codec's reader schema)``.

        Raises :class:`CorruptMessageError`, :class:`UnknownSchemaError` or :class:`InvalidMessageError`.
        """
        if data is None or len(data) < HEADER_SIZE or data[:2] != MARKER:
            raise CorruptMessageError("not an Avro single-object message (missing C3 01 marker or header)")
        reg = self.registry
        writer = reg.by_fingerprint.get(bytes(data[2:HEADER_SIZE]))
        if writer is None:
            raise UnknownSchemaError(bytes(data[2:HEADER_SIZE]))
        reader = reg.current[writer.name]
        buf = io.BytesIO(data)
        buf.seek(HEADER_SIZE)
        try:  # no schema resolution when the writer's schema is the reader's (a third faster)
            record = fastavro.schemaless_reader(buf, writer.parsed,
                                                None if reader.fingerprint == writer.fingerprint else reader.parsed)
        except Exception as exc:  # fastavro raises many types on garbage (EOFError, UnicodeDecodeError, IndexError...)
            raise CorruptMessageError(f"{writer.name} payload could not be read: {type(exc).__name__}: {exc}") from exc
        if buf.tell() != len(data):
            raise CorruptMessageError(f"{writer.name} payload has {len(data) - buf.tell()} trailing bytes")
        if validate_record:
            validate(writer.name, record)
        return writer.name, record


def _from_env() -> tuple[str, ...] | None:
    raw = os.environ.get(KNOWN_VERSIONS_ENV, "").strip()
    if not raw or raw.lower() == "all":
        return None
    return _check_versions(raw.split(","), AVSC_DIR, source=KNOWN_VERSIONS_ENV)


_ENV_VERSIONS = _from_env()  # validated at import: a bad value stops the process at start
_active: Codec | None = None


def active() -> Codec:
    """The codec behind the module-level :func:`encode` / :func:`decode` (``SOP_CODEC_KNOWN_VERSIONS`` or
    :func:`restrict_to` decide its releases)."""
    global _active
    if _active is None:
        _active = Codec(_ENV_VERSIONS)
    return _active


def restrict_to(known_versions: Iterable[str] | None) -> Codec:
    """Make the module-level encode/decode know only ``known_versions`` (``None``: every release again)."""
    global _active
    _active = Codec(known_versions)
    return _active


def encode(name: str, record: dict[str, Any], *, schema: dict | None = None) -> bytes:
    """Encode ``record`` as the current ``name`` schema (or an explicit writer ``schema``, for tests of old versions)."""
    return (_active or active()).encode(name, record, schema=schema)


def decode(data: bytes, *, validate_record: bool = True) -> tuple[str, dict[str, Any]]:
    """Decode one single-object-encoded message into ``(record name, record in the current schema)``.

    Raises :class:`CorruptMessageError`, :class:`UnknownSchemaError` or :class:`InvalidMessageError`.
    """
    return (_active or active()).decode(data, validate_record=validate_record)


def _finite(name: str, field: str, values: Any) -> None:  # noqa: ANN401 - list or array of numbers
    # Avro floats are float32, so their sum cannot overflow a double: a non-finite sum means a NaN or an
    # infinity among them (one pass in C instead of a Python loop). Hand-made doubles may overflow the
    # sum; the loop then finds nothing and the values pass.
    if not isfinite(sum(values)):
        for i, v in enumerate(values):
            if not isfinite(v):
                raise InvalidMessageError(f"{name}.{field}[{i}] is {v}; values must be finite")


def validate(name: str, record: dict[str, Any]) -> None:
    """Rules of the contract that Avro types alone do not express. Raises :class:`InvalidMessageError`."""
    for key in ("episode_id", "actor_id", "task"):
        if not record.get(key):
            raise InvalidMessageError(f"{name}.{key} is empty")
    if record.get("event_time_us", 0) <= 0:
        raise InvalidMessageError(f"{name}.event_time_us must be positive, got {record.get('event_time_us')}")
    if name == "Step":
        if record["step_index"] < 0:
            raise InvalidMessageError(f"Step.step_index must be >= 0, got {record['step_index']}")
        action = record["action"]
        if not action:
            raise InvalidMessageError("Step.action is empty")
        proposed = record.get("policy_action")
        if proposed is not None and len(proposed) != len(action):
            raise InvalidMessageError(
                f"Step.policy_action has {len(proposed)} values but action has {len(action)}"
            )
        _finite(name, "proprio", record["proprio"])
        _finite(name, "action", action)
        if proposed is not None:
            _finite(name, "policy_action", proposed)
        reward = record.get("env_reward")
        if reward is not None and not isfinite(reward):
            raise InvalidMessageError(f"Step.env_reward is {reward}; it must be finite")
        for img in record["images"]:
            if img["width"] <= 0 or img["height"] <= 0 or not img["data"]:
                raise InvalidMessageError(f"Step image {img['camera']!r} is empty or has no size")
            captured = img.get("capture_time_us")
            if captured is not None and captured <= 0:
                raise InvalidMessageError(f"Step image {img['camera']!r}: capture_time_us must be positive, "
                                          f"got {captured}")
    elif name == "EpisodeEvent":
        if record["kind"] == "ENDED" and (record.get("outcome") is None or record.get("num_steps") is None):
            raise InvalidMessageError("EpisodeEvent ENDED needs an outcome and num_steps")
    elif name == "InterventionEvent" and record["step_index"] < 0:
        raise InvalidMessageError(f"InterventionEvent.step_index must be >= 0, got {record['step_index']}")
