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
    # exercise the optional branches too
    records.append(("Step", {**records[1][1], "policy_action": None, "env_reward": -1.5, "success": True,
                             "step_index": 100_000, "images": []}))
    seen = set()
    for name, rec in records:
        schema = codec.registry().current[name]
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, schema.parsed, rec)
        assert codec.encode(name, rec) == codec.MARKER + schema.fingerprint + buf.getvalue()
        seen.add(name)
    assert seen == set(RECORD_NAMES)
