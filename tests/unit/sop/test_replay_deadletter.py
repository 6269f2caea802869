"""The decisions of `sop replay deadletter`: which letters go back, where, with which timestamp and progress."""

import click
import pytest

from consumers.deadletter import Reason, deadletter_headers, parse_headers
from schemas import codec
from sop.commands.replay import (
    coordinate,
    decide_letter,
    decode_progress,
    encode_progress,
    origin_timestamp_ms,
)

DATA = {"sop.steps", "sop.episodes", "sop.interventions"}


def _letter(reason: Reason = Reason.UNKNOWN_SCHEMA, topic: str = "sop.steps", offset: int = 7,
            timestamp_ms: int | None = 1_760_000_000_000) -> dict[str, str]:
    return parse_headers(deadletter_headers(error=codec.UnknownSchemaError(b"\x00" * 8), reason=reason, topic=topic,
                                            partition=1, offset=offset, timestamp_ms=timestamp_ms))


def test_a_letter_goes_back_to_its_origin_topic() -> None:
    assert decide_letter(_letter(), "sop.deadletter/0/3", reasons=None, data_topics=DATA, replayed=set()) == \
        ("sop.steps", "replay")
    assert decide_letter(_letter(), "sop.deadletter/0/3", reasons=frozenset({"unknown-schema"}), data_topics=DATA,
                         replayed=set()) == ("sop.steps", "replay")


@pytest.mark.parametrize(("headers", "reasons", "replayed", "why"), [
    (_letter(Reason.CORRUPT), frozenset({"unknown-schema"}), set(), "other-reason"),
    (_letter(topic="elsewhere"), None, set(), "not-a-data-topic"),
    ({"sop.reason": "unknown-schema"}, None, set(), "no-origin"),
    (_letter(), None, {"sop.deadletter/0/3"}, "already-replayed"),  # this letter, before a crash
    (_letter(), None, {coordinate("sop.steps", 1, 7)}, "already-replayed"),  # the same event, dead-lettered twice
])
def test_letters_that_are_skipped_say_why(headers: dict, reasons, replayed: set, why: str) -> None:  # noqa: ANN001
    assert decide_letter(headers, "sop.deadletter/0/3", reasons=reasons, data_topics=DATA, replayed=replayed) == \
        (None, why)


def test_the_origin_timestamp_is_kept_when_the_letter_has_one() -> None:
    assert origin_timestamp_ms(_letter()) == 1_760_000_000_000
    assert origin_timestamp_ms(_letter(timestamp_ms=None)) is None
    assert origin_timestamp_ms({"sop.origin.timestamp_ms": "garbage"}) is None


def test_progress_metadata_round_trips_and_stays_within_the_broker_limit() -> None:
    ends = {"sop.steps": {0: 10, 1: 12}, "sop.episodes": {0: 3}}
    assert decode_progress(encode_progress(clean=False, origin_ends=ends)) == (False, ends)
    assert decode_progress(encode_progress(clean=True, origin_ends={})) == (True, {})
    assert decode_progress(None) == (True, {}) and decode_progress("") == (True, {})
    with pytest.raises(click.ClickException, match="metadata"):
        encode_progress(clean=False, origin_ends={"sop.steps": {p: 10**12 for p in range(400)}})
