import copy
import math
import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import codec
from schemas.codec import CorruptMessageError, InvalidMessageError, UnknownSchemaError

STEP = {
    "episode_id": "a-1", "actor_id": "a", "task": "pick-place-v3", "instruction": "pick up the puck",
    "step_index": 3, "event_time_us": 1_700_000_000_000_000, "policy_version": "7",
    "images": [{"camera": "corner", "encoding": "jpeg", "width": 64, "height": 64, "data": b"\xff\xd8jpeg",
                "capture_time_us": 1_699_999_999_980_000}],
    "proprio": [0.5] * 39, "action": [0.25, -0.5, 1.0, -1.0], "policy_action": [0.0, 0.0, 0.0, 1.0],
    "controller": "HUMAN", "env_reward": 0.5, "success": False,
}
EPISODE = {"episode_id": "a-1", "kind": "ENDED", "actor_id": "a", "task": "pick-place-v3", "instruction": "x",
           "policy_version": "7", "event_time_us": 1_700_000_000_000_000, "seed": 4, "outcome": "SUCCESS",
           "num_steps": 10}
INTERVENTION = {"episode_id": "a-1", "kind": "STARTED", "actor_id": "a", "task": "pick-place-v3", "step_index": 2,
                "event_time_us": 1_700_000_000_000_000, "operator_id": "op", "reason": "divergence"}


@pytest.mark.parametrize(("name", "record"), [("Step", STEP), ("EpisodeEvent", EPISODE),
                                              ("InterventionEvent", INTERVENTION)])
def test_round_trip(name: str, record: dict) -> None:
    data = codec.encode(name, record)
    assert data[:2] == b"\xc3\x01"
    got_name, got = codec.decode(data)
    assert got_name == name
    assert got == record


def test_fingerprint_is_little_endian_crc64_of_canonical_form() -> None:
    # The Avro spec's example: the fingerprint of the schema "int" is 0x8f5c393f1ad57572 (written LE).
    from fastavro.schema import fingerprint

    assert fingerprint('"int"', "CRC-64-AVRO") == "8f5c393f1ad57572"
    s = codec.registry().current["Step"]
    assert codec.encode("Step", STEP)[2:10] == s.fingerprint


def test_corrupt_bytes_raise_typed_errors() -> None:
    data = codec.encode("Step", STEP)
    with pytest.raises(CorruptMessageError):
        codec.decode(b"not avro at all")
    with pytest.raises(CorruptMessageError):
        codec.decode(data[:-20])  # truncated payload
    with pytest.raises(CorruptMessageError):
        codec.decode(data + b"\x00\x01")  # trailing garbage
    with pytest.raises(UnknownSchemaError) as exc:
        codec.decode(data[:2] + b"\x01" * 8 + data[10:])
    assert exc.value.fingerprint == b"\x01" * 8


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda r: r.update(step_index=-1), "step_index"),
    (lambda r: r.update(episode_id=""), "episode_id"),
    (lambda r: r.update(action=[]), "action"),
    (lambda r: r.update(policy_action=[1.0]), "policy_action"),
    (lambda r: r.update(event_time_us=0), "event_time_us"),
    (lambda r: r["images"][0].update(capture_time_us=-5), "capture_time_us"),
    (lambda r: r["proprio"].__setitem__(7, math.nan), r"proprio\[7\]"),
    (lambda r: r["proprio"].__setitem__(0, -math.inf), r"proprio\[0\]"),
    (lambda r: r["action"].__setitem__(2, math.inf), r"Step.action\[2\]"),
    (lambda r: r["policy_action"].__setitem__(3, math.nan), r"policy_action\[3\]"),
    (lambda r: r.update(env_reward=math.nan), "env_reward"),
    (lambda r: r.update(env_reward=-math.inf), "env_reward"),
])
def test_validation_rejects_contract_violations(mutate, message: str) -> None:
    record = copy.deepcopy(STEP)
    mutate(record)
    with pytest.raises(InvalidMessageError, match=message):
        codec.decode(codec.encode("Step", record))


def test_ended_episode_needs_outcome() -> None:
    bad = {**EPISODE, "outcome": None}
    with pytest.raises(InvalidMessageError, match="outcome"):
        codec.decode(codec.encode("EpisodeEvent", bad))


def test_encode_rejects_wrong_types() -> None:
    with pytest.raises(InvalidMessageError):
        codec.encode("Step", {**STEP, "step_index": "three"})
    with pytest.raises(InvalidMessageError):
        codec.encode("Step", {**STEP, "controller": "ROBOT"})


def test_a_step_without_capture_times_encodes_them_as_null() -> None:
    record = copy.deepcopy(STEP)
    del record["images"][0]["capture_time_us"]  # a producer written against v1 records
    assert codec.decode(codec.encode("Step", record))[1]["images"][0]["capture_time_us"] is None


@given(st.lists(st.floats(width=32), min_size=1, max_size=64))
def test_non_finite_floats_are_rejected_exactly_when_present(values: list[float]) -> None:
    record = {**STEP, "proprio": values}
    data = codec.encode("Step", record)
    if all(math.isfinite(v) for v in values):
        assert codec.decode(data)[1]["proprio"] == values
    else:
        with pytest.raises(InvalidMessageError, match="proprio"):
            codec.decode(data)


def test_large_finite_doubles_are_not_mistaken_for_infinities() -> None:
    # validate() also sees hand-made records whose doubles overflow a sum; only real infinities fail
    codec.validate("Step", {**STEP, "proprio": [1e308, 1e308]})


def test_a_codec_of_older_releases_reads_and_writes_like_a_v1_consumer() -> None:
    v1 = codec.Codec(known_versions=["v1"])
    assert v1.known_versions == ("v1",)
    assert codec.Codec().known_versions[:2] == ("v1", "v2")
    old_bytes = v1.encode("Step", STEP)  # the capture time is not in v1: dropped by the v1 writer
    assert old_bytes[2:10] != codec.encode("Step", STEP)[2:10]
    assert "capture_time_us" not in v1.decode(old_bytes)[1]["images"][0]
    with pytest.raises(UnknownSchemaError):
        v1.decode(codec.encode("Step", STEP))
    # EpisodeEvent did not change in v2: the same bytes for both
    assert v1.decode(codec.encode("EpisodeEvent", EPISODE)) == ("EpisodeEvent", EPISODE)
    with pytest.raises(ValueError, match="v9"):
        codec.Codec(known_versions=["v9"])


def test_restrict_to_switches_the_module_level_codec() -> None:
    data = codec.encode("Step", STEP)
    try:
        codec.restrict_to(["v1"])
        with pytest.raises(UnknownSchemaError):
            codec.decode(data)
    finally:
        codec.restrict_to(None)
    assert codec.decode(data)[1] == STEP


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=60)


def test_known_versions_env_var_makes_an_old_process() -> None:
    data = codec.encode("Step", STEP).hex()
    probe = ("from schemas import codec\n"
             f"try:\n    codec.decode(bytes.fromhex('{data}'))\n    print('decoded')\n"
             "except codec.UnknownSchemaError:\n    print('unknown-schema')\n")
    assert _python(probe, SOP_CODEC_KNOWN_VERSIONS="v1").stdout.strip() == "unknown-schema"
    assert _python(probe, SOP_CODEC_KNOWN_VERSIONS="v1,v2").stdout.strip() == "decoded"
    assert _python(probe, SOP_CODEC_KNOWN_VERSIONS="").stdout.strip() == "decoded"
    bad = _python("import schemas", SOP_CODEC_KNOWN_VERSIONS="v1,v7")
    assert bad.returncode != 0 and "SOP_CODEC_KNOWN_VERSIONS" in bad.stderr and "v7" in bad.stderr
