"""Every kept schema version reads every other (backward and forward), and old messages decode forever."""

import io
import json
from pathlib import Path

import fastavro
import pytest

from schemas import codec
from schemas.records import RECORD_NAMES

GOLDEN = Path(__file__).parent / "golden"
GOLDEN_FILES = sorted(GOLDEN.glob("v*-*.bin"))

# The CRC-64-AVRO fingerprints of released schemas (wire bytes 2..10, hex). A release is immutable: messages
# carrying these fingerprints are on topics and in spools; change a schema by releasing a new vN instead.
RELEASED = {
    ("v1", "Step"): "5adb223f244f5e51",
    ("v1", "EpisodeEvent"): "18dc8bb408c79ff0",
    ("v1", "InterventionEvent"): "9a0d0ec7f2ff16fd",
    ("v2", "Step"): "e3cf48ced03ad65d",
    ("v2", "EpisodeEvent"): "18dc8bb408c79ff0",
    ("v2", "InterventionEvent"): "9a0d0ec7f2ff16fd",
}


def _named(schema: dict) -> dict[str, dict]:
    """Named types (records, enums) declared anywhere in ``schema``, by short name."""
    out: dict[str, dict] = {}

    def walk(t) -> None:  # noqa: ANN001
        if isinstance(t, list):
            for x in t:
                walk(x)
        elif isinstance(t, dict):
            if t["type"] in ("record", "enum"):
                out[t["name"]] = t
            for f in t.get("fields", []):
                walk(f["type"])
            if t["type"] == "array":
                walk(t["items"])

    walk(schema)
    return out


def _example(schema: dict) -> dict:
    """A record that exercises every field of ``schema`` (non-default values where possible)."""
    named = _named(schema)

    def value(t):  # noqa: ANN001, ANN202
        if isinstance(t, list):
            non_null = [x for x in t if x != "null"]
            return value(non_null[0]) if non_null else None
        if isinstance(t, str):
            if t in named:
                return value(named[t])
            return {"string": "x", "int": 3, "long": 1_700_000_000_000_000, "float": 0.5, "double": 0.25,
                    "boolean": True, "bytes": b"\x01\x02"}[t]
        kind = t["type"]
        if kind == "record":
            return {f["name"]: value(f["type"]) for f in t["fields"]}
        if kind == "array":
            return [value(t["items"]), value(t["items"])]
        if kind == "enum":
            return t["symbols"][-1]
        return value(kind)

    return value(schema)


def _expected(value, writer_t, reader_t, wnamed: dict, rnamed: dict):  # noqa: ANN001, ANN202
    """What a reader of ``reader_t`` must see for ``value`` written as ``writer_t`` (Avro resolution rules:
    fields the writer lacks take the reader's default, fields the reader lacks are skipped)."""
    writer_t = wnamed.get(writer_t, writer_t) if isinstance(writer_t, str) else writer_t
    reader_t = rnamed.get(reader_t, reader_t) if isinstance(reader_t, str) else reader_t
    if value is None:
        return None
    if isinstance(writer_t, list):
        writer_t = next(x for x in writer_t if x != "null")
    if isinstance(reader_t, list):
        reader_t = next(x for x in reader_t if x != "null")
    if isinstance(reader_t, dict) and reader_t["type"] == "record":
        writer_fields = {f["name"]: f for f in writer_t["fields"]}
        out = {}
        for f in reader_t["fields"]:
            if f["name"] in writer_fields:
                out[f["name"]] = _expected(value[f["name"]], writer_fields[f["name"]]["type"], f["type"], wnamed, rnamed)
            else:
                assert "default" in f, f"reader field {f['name']} has no default: old messages cannot be read"
                out[f["name"]] = f["default"]
        return out
    if isinstance(reader_t, dict) and reader_t["type"] == "array":
        return [_expected(v, writer_t["items"], reader_t["items"], wnamed, rnamed) for v in value]
    return value


def test_releases_are_numbered_and_current_is_the_newest() -> None:
    releases = codec.released_versions()
    assert releases[:2] == ("v1", "v2")
    newest = releases[-1]
    for name in RECORD_NAMES:
        current = json.loads((codec.AVSC_DIR / f"{name}.avsc").read_text())
        released = json.loads((codec.AVSC_DIR / "history" / newest / f"{name}.avsc").read_text())
        assert current == released, f"{name}.avsc differs from history/{newest}: release it as a new version"


@pytest.mark.parametrize(("version", "name"), sorted(RELEASED))
def test_released_schemas_never_change(version: str, name: str) -> None:
    reg = codec.registry(known_versions=(version,))
    assert reg.current[name].fingerprint.hex() == RELEASED[(version, name)]


@pytest.mark.parametrize("name", RECORD_NAMES)
def test_every_version_reads_every_other(name: str) -> None:
    versions = codec.schema_versions(name)
    assert {"v1", "v2", "current"} <= set(versions)
    for writer_label, writer in versions.items():
        record = _example(writer)
        data = codec.encode(name, record, schema=writer)
        for reader_label, reader in versions.items():
            buf = io.BytesIO(data[codec.HEADER_SIZE:])
            got = fastavro.schemaless_reader(buf, fastavro.parse_schema(writer), fastavro.parse_schema(reader))
            want = _expected(record, writer, reader, _named(writer), _named(reader))
            assert got == want, (writer_label, reader_label)


def test_step_v1_and_v2_resolve_the_capture_time_both_ways() -> None:
    v1, v2 = codec.Codec(known_versions=["v1"]), codec.Codec()
    step = _example(codec.schema_versions("Step")["v2"])
    assert step["images"][0]["capture_time_us"] is not None
    # a v2 message read by today's codec keeps the capture time
    assert v2.decode(v2.encode("Step", step))[1] == step
    # a v1 producer: today's codec reads it with capture_time_us = null
    got = v2.decode(v1.encode("Step", step))[1]
    assert [img["capture_time_us"] for img in got["images"]] == [None, None]
    assert got["proprio"] == step["proprio"]
    # a v1 consumer sees v2 bytes through schema resolution without the new field ...
    data = v2.encode("Step", step)
    old = fastavro.schemaless_reader(io.BytesIO(data[codec.HEADER_SIZE:]), v2.registry.current["Step"].parsed,
                                     v1.registry.current["Step"].parsed)
    assert all("capture_time_us" not in img for img in old["images"]) and old["task"] == step["task"]
    # ... but a v1-only codec cannot know the v2 fingerprint: the processor dead-letters it as unknown-schema
    with pytest.raises(codec.UnknownSchemaError):
        v1.decode(data)


def _jsonable(v):  # noqa: ANN001, ANN202
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


def test_golden_messages_of_every_release_are_checked_in() -> None:
    names = {p.name for p in GOLDEN_FILES}
    assert {f"v1-{n}.bin" for n in RECORD_NAMES} <= names
    assert "v2-Step.bin" in names


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=lambda p: p.stem)
def test_released_messages_still_decode(path: Path) -> None:
    """The checked-in messages (tests/unit/schemas/golden) must decode with today's codec, forever."""
    version, name = path.stem.split("-", 1)
    expected = json.loads(path.with_suffix(".json").read_text())
    data = path.read_bytes()
    assert data[2:10].hex() == RELEASED[(version, name)]
    got_name, got = codec.decode(data, validate_record=False)
    assert got_name == name
    for key, want in expected.items():
        assert _jsonable(got[key]) == want, key
    if name == "Step" and version == "v1":
        assert all(img["capture_time_us"] is None for img in got["images"])
    # and with a codec that knows only this release (a consumer of that time)
    assert codec.Codec(known_versions=[version]).decode(data, validate_record=False)[0] == name
