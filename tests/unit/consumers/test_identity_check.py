"""Who produced an event (Kafka security on): the robot's signature proves its principal, and the principal decides
which actor ids it may claim; everything else is dead-lettered as identity-mismatch."""

from __future__ import annotations

import base64
import json
from collections import Counter

import pytest

from consumers.deadletter import Reason, Rejected
from consumers.machine import Kind
from consumers.validation import RobotIdentity, check_identity, parse_keyring
from schemas import codec
from schemas.identity import HEADER_PRINCIPAL, HEADER_SIGNATURE, Signer
from tests.unit.consumers.world import World, end_record, start_record, step_record

KEY_A, KEY_B = bytes(range(32)), bytes(range(1, 33))
ROBOTS = {"robot-a": RobotIdentity(name="robot-a", key=KEY_A, actors=("a1",)),
          "robot-b": RobotIdentity(name="robot-b", key=KEY_B, actors=("b1",)),
          "cell": RobotIdentity(name="cell", key=KEY_B, actors=("cell-*",))}
TOPIC = "sop.steps"


def signed(record: dict, *, signer: Signer, topic: str = TOPIC, key: bytes = b"e") -> tuple[bytes, list]:
    value = codec.encode("Step", record)
    return value, signer.headers(topic, key=key, value=value)


def check(record: dict, value: bytes, headers, *, topic: str = TOPIC, key: bytes = b"e") -> str:  # noqa: ANN001
    return check_identity(record, topic=topic, key=key, value=value, headers=headers, identities=ROBOTS)


def test_a_robot_signing_its_own_actor_is_accepted() -> None:
    record = {**step_record("e", 0), "actor_id": "a1"}
    value, headers = signed(record, signer=Signer("robot-a", KEY_A))
    assert check(record, value, headers) == "robot-a"
    assert check(record, value, dict(headers)) == "robot-a"  # faust may hand a mapping


def test_a_group_principal_claims_the_actors_of_its_pattern_only() -> None:
    signer = Signer("cell", KEY_B)
    for actor in ("cell-1", "cell-22"):
        record = {**step_record("e", 0), "actor_id": actor}
        value, headers = signed(record, signer=signer)
        assert check(record, value, headers) == "cell"
    record = {**step_record("e", 0), "actor_id": "b1"}
    value, headers = signed(record, signer=signer)
    with pytest.raises(Rejected, match="may produce for actors"):
        check(record, value, headers)


@pytest.mark.parametrize("case", ["unsigned", "forged-actor", "unknown-principal", "wrong-key", "claims-other-principal",
                                  "altered-value", "other-topic", "other-key", "garbage-signature"])
def test_what_does_not_prove_its_actor_is_refused_as_identity_mismatch(case: str) -> None:
    record = {**step_record("e", 0), "actor_id": "a1"}
    value, headers = signed(record, signer=Signer("robot-a", KEY_A))
    topic, key = TOPIC, b"e"
    if case == "unsigned":
        headers = []
    elif case == "forged-actor":  # robot-b, signing correctly, claims robot-a's actor
        value, headers = signed(record, signer=Signer("robot-b", KEY_B))
    elif case == "unknown-principal":  # revoked, or never added
        value, headers = signed(record, signer=Signer("robot-z", KEY_A))
    elif case == "wrong-key":  # says robot-a, but does not hold robot-a's key
        value, headers = signed(record, signer=Signer("robot-a", KEY_B))
    elif case == "claims-other-principal":  # robot-b's signature, with the principal header rewritten
        _, headers = signed(record, signer=Signer("robot-b", KEY_B))
        headers = [(HEADER_PRINCIPAL, b"robot-a"), headers[1]]
    elif case == "altered-value":
        value = codec.encode("Step", {**record, "action": [0.9]})
    elif case == "other-topic":
        topic = "sop.interventions"
    elif case == "other-key":
        key = b"another-episode"
    elif case == "garbage-signature":
        headers = [(HEADER_PRINCIPAL, b"robot-a"), (HEADER_SIGNATURE, b"v1:!!!")]
    with pytest.raises(Rejected) as info:
        check(record, value, headers, topic=topic, key=key)
    assert info.value.reason is Reason.IDENTITY_MISMATCH


def test_a_second_forged_header_does_not_override_the_first() -> None:
    record = {**step_record("e", 0), "actor_id": "b1"}
    value, headers = signed(record, signer=Signer("robot-a", KEY_A))
    with pytest.raises(Rejected):  # robot-a appends a principal header claiming robot-b: the first one counts
        check(record, value, [*headers, (HEADER_PRINCIPAL, b"robot-b")])


def test_the_keyring_file_parses_and_names_what_is_wrong() -> None:
    text = json.dumps({"version": 1, "robots": {"r": {"key": base64.b64encode(KEY_A).decode(), "actors": ["r", "x-*"]},
                                                "s": {"key": base64.b64encode(KEY_B).decode()}}})
    robots = parse_keyring(text)
    assert robots["r"].actors == ("r", "x-*") and robots["r"].key == KEY_A
    assert robots["s"].actors == ("s",)  # default: its own name
    with pytest.raises(ValueError, match="robot 'r'"):
        parse_keyring(json.dumps({"robots": {"r": {"key": "c2hvcnQ="}}}))
    with pytest.raises(ValueError, match="not a robot keyring"):
        parse_keyring("[]")


def test_the_machine_dead_letters_a_forged_actor_and_keeps_the_rest() -> None:
    world = World(partitions=1)
    topics = world.config.topics

    def authenticator(name: str, record: dict, topic: str, msg) -> None:  # noqa: ANN001
        check_identity(record, topic=topic, key=msg.key, value=msg.value, headers=msg.headers, identities=ROBOTS)

    world.machine.authenticator = authenticator
    robot_a = Signer("robot-a", KEY_A)
    robot_b = Signer("robot-b", KEY_B)

    def sign_as(signer: Signer):  # noqa: ANN202
        return lambda topic, key, value: signer.headers(topic, key=key, value=value)

    world.publish(Kind.EPISODE, start_record("good"), eid="good", headers=sign_as(robot_a))
    world.publish(Kind.STEP, step_record("good", 0), eid="good", headers=sign_as(robot_a))
    world.publish(Kind.STEP, step_record("good", 1), eid="good", headers=sign_as(robot_b))  # b claims a1: forged
    world.publish(Kind.STEP, step_record("good", 1), eid="good")  # unsigned
    world.publish(Kind.STEP, step_record("good", 1), eid="good", headers=sign_as(robot_a))
    world.publish(Kind.EPISODE, end_record("good", 2), eid="good", headers=sign_as(robot_a))
    world.settle()
    assert Counter(x.reason for x in world.deadletters) == Counter({Reason.IDENTITY_MISMATCH: 2})
    assert Counter((r["episode_id"], r["step_index"]) for r in world.tables["steps"].rows.values()) == \
        Counter({("good", 0): 1, ("good", 1): 1})
    assert set(topics) == {Kind.STEP, Kind.EPISODE, Kind.INTERVENTION}


def test_without_an_authenticator_unsigned_events_are_stored_as_before() -> None:
    world = World(partitions=1)
    world.publish(Kind.EPISODE, start_record("e"), eid="e")
    world.publish(Kind.STEP, step_record("e", 0), eid="e")
    world.publish(Kind.EPISODE, end_record("e", 1), eid="e")
    world.settle()
    assert world.deadletters == [] and len(world.tables["steps"].rows) == 1


def test_a_dead_letter_keeps_the_robots_signature_so_a_replay_is_accepted_again() -> None:
    """A signed step dead-lettered as late must come back through `sop replay deadletter` still signed: the
    processor with security on would otherwise dead-letter the replayed event as identity-mismatch."""
    from consumers.deadletter import deadletter_headers, parse_headers
    from schemas.identity import identity_headers
    from sop.commands.replay import republished_headers

    world = World(partitions=1)
    world.machine.authenticator = lambda name, record, topic, msg: check_identity(  # noqa: ARG005
        record, topic=topic, key=msg.key, value=msg.value, headers=msg.headers, identities=ROBOTS)
    robot_a = Signer("robot-a", KEY_A)

    def sign(topic: str, key: bytes, value: bytes) -> list:
        return robot_a.headers(topic, key=key, value=value)

    world.publish(Kind.EPISODE, start_record("e"), eid="e", headers=sign)
    world.publish(Kind.STEP, step_record("e", 0), eid="e", headers=sign)
    world.publish(Kind.EPISODE, end_record("e", 1), eid="e", headers=sign)
    world.settle()
    world.publish(Kind.STEP, step_record("e", 1), eid="e", headers=sign)  # beyond the announced end
    world.settle()
    [letter] = world.deadletters
    assert letter.reason is Reason.LATE_STEP and dict(letter.identity)[HEADER_PRINCIPAL] == b"robot-a"
    stored = parse_headers(deadletter_headers(error=letter.error, reason=letter.reason, topic=letter.topic,
                                              partition=letter.partition, offset=letter.offset,
                                              origin_identity=letter.identity))
    again = republished_headers(stored, letter="sop.deadletter/0/0", origin=f"{letter.topic}/0/{letter.offset}")
    record = step_record("e", 1)
    assert check(record, letter.value, again, topic=letter.topic, key=letter.key) == "robot-a"
    assert identity_headers(again) == letter.identity
    with pytest.raises(Rejected):  # without the kept headers the replay would be refused
        check(record, letter.value, republished_headers({}, letter="l", origin="o"), topic=letter.topic, key=letter.key)
