import copy

import pytest

from schemas import codec
from schemas.codec import CorruptMessageError, InvalidMessageError, UnknownSchemaError

STEP = {
    "episode_id": "a-1", "actor_id": "a", "task": "pick-place-v3", "instruction": "pick up the puck",
    "step_index": 3, "event_time_us": 1_700_000_000_000_000, "policy_version": "7",
    "images": [{"camera": "corner", "encoding": "jpeg", "width": 64, "height": 64, "data": b"\xff\xd8jpeg"}],
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
