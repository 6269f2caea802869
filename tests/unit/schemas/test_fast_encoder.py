"""The generated encoders write exactly the bytes fastavro writes."""

import io

import fastavro
import pytest

from producers.loadgen import LoadGenConfig, iter_fleet
from schemas import codec
from schemas.records import RECORD_NAMES


@pytest.mark.parametrize("name", RECORD_NAMES)
def test_every_current_schema_gets_a_fast_encoder(name: str) -> None:
    assert codec.registry().current[name].fast_encoder is not None


def test_fast_encoder_is_byte_identical_to_fastavro() -> None:
    records = list(iter_fleet(LoadGenConfig(robots=3, hz=0, duration_s=None, episodes=12, intervention_rate=1.0,
                                            cameras=2, seed=9)))
    records += list(iter_fleet(LoadGenConfig(robots=2, hz=0, duration_s=None, episodes=4, cameras=3, seed=4,
                                             capture_times=True)))
    # exercise the optional branches too
    with_times = next(rec for name, rec in records if name == "Step" and "capture_time_us" in rec["images"][0])
    records.append(("Step", {**with_times, "images": [{**img, "capture_time_us": None} for img in with_times["images"]]}))
    records.append(("Step", {**records[1][1], "policy_action": None, "env_reward": -1.5, "success": True,
                             "step_index": 100_000, "images": []}))
    seen = set()
    for name, rec in records:
        schema = codec.registry().current[name]
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, schema.parsed, rec)
        want = codec.MARKER + schema.fingerprint + buf.getvalue()
        # the generated encoder itself, not its fastavro fallback inside codec.encode
        assert schema.fast_encoder(rec, codec.MARKER + schema.fingerprint) == want
        assert codec.encode(name, rec) == want
        seen.add(name)
    assert seen == set(RECORD_NAMES)


def _a_step() -> dict:
    return next(rec for name, rec in iter_fleet(LoadGenConfig(robots=1, hz=0, duration_s=None, episodes=1, seed=2))
                if name == "Step")


def test_a_record_the_fast_encoder_refuses_raises_naming_the_field() -> None:
    with pytest.raises(codec.InvalidMessageError, match=r"sop\.Step\.step_index is <x>"):
        codec.Codec().encode("Step", {**_a_step(), "step_index": "x"})


def test_a_fast_encoder_failure_on_a_valid_record_is_not_hidden() -> None:
    c = codec.Codec()
    schema = c.registry.current["Step"]  # in the cached registry every codec shares: put it back after
    working = schema.fast_encoder

    def broken(record: dict, header: bytes) -> bytes:
        raise IndexError("generated code out of step with the schema")

    object.__setattr__(schema, "fast_encoder", broken)  # a frozen dataclass
    try:
        with pytest.raises(codec.InvalidMessageError, match="generated encoder failed.*out of step"):
            c.encode("Step", _a_step())
    finally:
        object.__setattr__(schema, "fast_encoder", working)
