"""Every kept schema version reads every other (backward and forward), and old messages decode forever."""

import json
from pathlib import Path

import fastavro
import pytest

from schemas import codec
from schemas.records import RECORD_NAMES

GOLDEN = Path(__file__).parent / "golden"


def _example(schema: dict) -> dict:
    """A record that exercises every field of ``schema`` (non-default values where possible)."""
    named: dict[str, dict] = {}

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
            named[t["name"]] = t
            return {f["name"]: value(f["type"]) for f in t["fields"]}
        if kind == "array":
            return [value(t["items"])]
        if kind == "enum":
            named[t["name"]] = t
            return t["symbols"][-1]
        return value(kind)

    return value(schema)


@pytest.mark.parametrize("name", RECORD_NAMES)
def test_every_version_reads_every_other(name: str) -> None:
    versions = codec.schema_versions(name)
    assert "v1" in versions and "current" in versions
    for writer_label, writer in versions.items():
        record = _example(writer)
        data = codec.encode(name, record, schema=writer)
        for reader_label, reader in versions.items():
            import io

            buf = io.BytesIO(data[codec.HEADER_SIZE:])
            got = fastavro.schemaless_reader(buf, fastavro.parse_schema(writer), fastavro.parse_schema(reader))
            reader_fields = {f["name"] for f in reader["fields"]}
            shared = reader_fields & {f["name"] for f in writer["fields"]}
            assert {k: got[k] for k in shared} == {k: record[k] for k in shared}, (writer_label, reader_label)


@pytest.mark.parametrize("name", RECORD_NAMES)
def test_released_v1_messages_still_decode(name: str) -> None:
    """The checked-in v1 messages (tests/unit/schemas/golden) must decode with today's codec, forever."""
    data = (GOLDEN / f"v1-{name}.bin").read_bytes()
    expected = json.loads((GOLDEN / f"v1-{name}.json").read_text())
    got_name, got = codec.decode(data, validate_record=False)
    assert got_name == name
    for key, want in expected.items():
        have = got[key]
        if isinstance(have, bytes):
            have = have.hex()
        assert have == want, key
