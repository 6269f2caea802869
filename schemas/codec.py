"""Avro single-object encoding for SOP's wire records. The only module that imports fastavro.

Encoding: ``C3 01`` + 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's
parsing canonical form + Avro binary payload (Avro specification, "Single-object encoding").
Decoding resolves the writer schema by fingerprint among every schema version kept in
``avsc/`` and ``avsc/history/`` and reads the payload into the *current* reader schema, so
old messages keep decoding after a compatible schema change.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from schemas.records import RECORD_NAMES

MARKER = b"\xc3\x01"
HEADER_SIZE = len(MARKER) + 8
AVSC_DIR = Path(__file__).parent / "avsc"


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
    current: dict[str, _Schema]
    by_fingerprint: dict[bytes, _Schema]

    def versions(self, name: str) -> list[_Schema]:
        return sorted({s.version: s for s in self.by_fingerprint.values() if s.name == name}.values(), key=lambda s: s.version)


@cache
def registry(avsc_dir: Path = AVSC_DIR) -> SchemaRegistry:
    current = {name: _load(avsc_dir / f"{name}.avsc", "current") for name in RECORD_NAMES}
    by_fp: dict[bytes, _Schema] = {}
    history = avsc_dir / "history"
    for version_dir in sorted(history.iterdir()) if history.exists() else []:
        for path in sorted(version_dir.glob("*.avsc")):
            s = _load(path, version_dir.name)
            by_fp.setdefault(s.fingerprint, s)
    for s in current.values():
        by_fp.setdefault(s.fingerprint, s)
    return SchemaRegistry(current=current, by_fingerprint=by_fp)


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


def schema_versions(name: str) -> dict[str, dict]:
    """Every kept version of a record's schema (``{"v1": {...}, "current": {...}}``) as JSON dicts."""
    out: dict[str, dict] = {}
    history = AVSC_DIR / "history"
    for version_dir in sorted(history.iterdir()):
        path = version_dir / f"{name}.avsc"
        if path.exists():
            out[version_dir.name] = json.loads(path.read_text())
    out["current"] = json.loads((AVSC_DIR / f"{name}.avsc").read_text())
    return out


def encode(name: str, record: dict[str, Any], *, schema: dict | None = None) -> bytes:
    """Encode ``record`` as the current ``name`` schema (or an explicit writer ``schema``, for tests of old versions)."""
    if schema is None:
        s = registry().current[name]
        if s.fast_encoder is not None:
            try:
                return s.fast_encoder(record, MARKER + s.fingerprint)
            except (KeyError, TypeError, AttributeError, ValueError, struct.error, IndexError):
                pass  # fastavro below raises a precise InvalidMessageError
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


def decode(data: bytes, *, validate_record: bool = True) -> tuple[str, dict[str, Any]]:
    """Decode one single-object-encoded message into ``(record name, record in the current schema)``.

    Raises :class:`CorruptMessageError`, :class:`UnknownSchemaError` or :class:`InvalidMessageError`.
    """
    if data is None or len(data) < HEADER_SIZE or data[:2] != MARKER:
        raise CorruptMessageError("not an Avro single-object message (missing C3 01 marker or header)")
    reg = registry()
    writer = reg.by_fingerprint.get(bytes(data[2:HEADER_SIZE]))
    if writer is None:
        raise UnknownSchemaError(bytes(data[2:HEADER_SIZE]))
    reader = reg.current[writer.name]
    buf = io.BytesIO(data)
    buf.seek(HEADER_SIZE)
    try:  # no schema resolution when the writer's schema is the current one (a third faster)
        record = fastavro.schemaless_reader(buf, writer.parsed,
                                            None if reader.fingerprint == writer.fingerprint else reader.parsed)
    except Exception as exc:  # fastavro raises many types on garbage (EOFError, UnicodeDecodeError, IndexError...)
        raise CorruptMessageError(f"{writer.name} payload could not be read: {type(exc).__name__}: {exc}") from exc
    if buf.tell() != len(data):
        raise CorruptMessageError(f"{writer.name} payload has {len(data) - buf.tell()} trailing bytes")
    if validate_record:
        validate(writer.name, record)
    return writer.name, record


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
        if not record["action"]:
            raise InvalidMessageError("Step.action is empty")
        proposed = record.get("policy_action")
        if proposed is not None and len(proposed) != len(record["action"]):
            raise InvalidMessageError(
                f"Step.policy_action has {len(proposed)} values but action has {len(record['action'])}"
            )
        for img in record["images"]:
            if img["width"] <= 0 or img["height"] <= 0 or not img["data"]:
                raise InvalidMessageError(f"Step image {img['camera']!r} is empty or has no size")
    elif name == "EpisodeEvent":
        if record["kind"] == "ENDED" and (record.get("outcome") is None or record.get("num_steps") is None):
            raise InvalidMessageError("EpisodeEvent ENDED needs an outcome and num_steps")
    elif name == "InterventionEvent" and record["step_index"] < 0:
        raise InvalidMessageError(f"InterventionEvent.step_index must be >= 0, got {record['step_index']}")
