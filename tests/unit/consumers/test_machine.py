"""The processor's state machine, driven directly: scenarios by hand, and random interleavings of steps, ends,
interventions, duplicates, late and poisoned events with crashes and rebalances (hypothesis), checking that
every input event ends stored, dead-lettered or counted, and nothing is stored twice."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.deadletter import Reason, Rejected
from consumers.machine import Kind
from schemas import codec
from tests.unit.consumers.world import World, end_record, intervention_record, start_record, step_record


def stored_steps(world: World) -> Counter:
    return Counter((r["episode_id"], r["step_index"]) for r in world.tables["steps"].rows.values())


def stored_episodes(world: World) -> Counter:
    rows = [*world.tables["episodes"].rows.values(), *world.tables["aborted"].rows.values()]
    return Counter(r["episode_id"] for r in rows)


def episode_row(world: World, eid: str) -> dict:
    rows = [r for t in ("episodes", "aborted") for r in world.tables[t].rows.values() if r["episode_id"] == eid]
    assert len(rows) == 1, rows
    return rows[0]


def letters(world: World, reason: Reason) -> list:
    return [x for x in world.deadletters if x.reason == reason]


def publish_episode(world: World, eid: str, n: int, *, end: bool = True) -> None:
    world.publish(Kind.EPISODE, start_record(eid), eid=eid)
    for i in range(n):
        world.publish(Kind.STEP, step_record(eid, i), eid=eid)
    if end:
        world.publish(Kind.EPISODE, end_record(eid, n), eid=eid)


def test_complete_episodes_are_stored_once_with_data_quality_columns() -> None:
    world = World()
    for k in range(6):
        publish_episode(world, f"e{k}", 3 + k)
    world.settle()
    assert stored_steps(world) == Counter({(f"e{k}", i): 1 for k in range(6) for i in range(3 + k)})
    row = episode_row(world, "e5")
    assert (row["closed_by"], row["announced_steps"], row["num_steps"], row["missing_steps"]) == ("end_event", 8, 8, 0)
    assert world.deadletters == []


def test_an_episode_whose_steps_arrive_after_a_long_backlog_is_not_force_closed() -> None:
    # The end (small topic) is read long before the steps (a backlog): wall-clock silence alone must not close
    # it short while the steps partition is not caught up.
    world = World()
    publish_episode(world, "slow", 5)
    p = sum(b"slow") % world.partitions
    for _ in range(2):  # STARTED and ENDED
        world.deliver((Kind.EPISODE, p))
    world.deliver((Kind.STEP, p))
    world.tick(3600.0)  # an hour without news, but four steps still wait on the broker
    world.flush_write()
    world.flush_done()
    assert stored_episodes(world) == Counter()
    world.settle()
    assert episode_row(world, "slow")["closed_by"] == "end_event"
    assert sum(stored_steps(world).values()) == 5


def test_missing_steps_force_a_close_once_caught_up_and_a_late_step_is_dead_lettered() -> None:
    world = World()
    world.publish(Kind.STEP, step_record("e", 0), eid="e")
    world.publish(Kind.EPISODE, end_record("e", 3), eid="e")
    world.settle()
    row = episode_row(world, "e")
    assert (row["closed_by"], row["num_steps"], row["missing_steps"]) == ("forced", 1, 2)
    world.publish(Kind.STEP, step_record("e", 2), eid="e")  # far too late
    world.settle()
    assert [x.offset for x in letters(world, Reason.LATE_STEP)] == [1]
    assert stored_steps(world) == Counter({("e", 0): 1})


def test_steps_beyond_the_announced_end_are_dead_lettered_not_dropped() -> None:
    world = World()
    for i in range(4):
        world.publish(Kind.STEP, step_record("e", i), eid="e")
    world.publish(Kind.EPISODE, end_record("e", 2), eid="e")
    world.settle()
    assert sorted(stored_steps(world)) == [("e", 0), ("e", 1)]
    assert sorted(x.offset for x in letters(world, Reason.LATE_STEP)) == [2, 3]
    assert episode_row(world, "e")["late_steps"] == 2


def test_duplicates_are_counted_and_conflicting_duplicates_dead_lettered() -> None:
    world = World()
    world.publish(Kind.STEP, step_record("e", 0), eid="e")
    world.publish(Kind.STEP, step_record("e", 0), eid="e")  # identical copy
    world.publish(Kind.STEP, step_record("e", 0, variant=7), eid="e")  # same index, other content
    world.publish(Kind.STEP, step_record("e", 1), eid="e")
    world.publish(Kind.EPISODE, end_record("e", 2), eid="e")
    world.publish(Kind.EPISODE, end_record("e", 2), eid="e")  # a second identical end
    world.publish(Kind.EPISODE, end_record("e", 5, "FAILURE"), eid="e")  # a contradicting end
    world.settle()
    assert stored_steps(world) == Counter({("e", 0): 1, ("e", 1): 1})
    assert world.machine.counts["steps_duplicate"] == 1
    conflicts = letters(world, Reason.DUPLICATE_CONFLICT)
    assert sorted((x.topic, x.offset) for x in conflicts) == [("episodes", 2), ("steps", 2)]
    assert episode_row(world, "e")["duplicate_steps"] == 1


def test_duplicate_interventions_are_stored_once() -> None:
    world = World()
    for _ in range(2):  # read before the episode closes (an intervention read after it is a row, not counted in it)
        world.publish(Kind.INTERVENTION, intervention_record("e", "STARTED", 1), eid="e")
    publish_episode(world, "e", 3)
    world.settle()
    assert len(world.tables["interventions"].rows) == 1
    assert world.machine.counts["interventions_duplicate"] == 1
    assert episode_row(world, "e")["num_interventions"] == 1


def test_an_episode_without_end_is_aborted_once_both_partitions_are_caught_up() -> None:
    world = World()
    publish_episode(world, "dead", 4, end=False)
    world.settle()
    row = episode_row(world, "dead")
    assert (row["outcome"], row["closed_by"], row["num_steps"]) == ("ABORTED", "aborted", 4)


def test_garbage_and_wrong_topic_records_are_dead_lettered_with_reasons() -> None:
    world = World()
    world.publish(Kind.STEP, b"\x00 not avro", eid="e")
    world.publish(Kind.STEP, b"\xc3\x01" + b"\x11" * 8 + b"payload", eid="e")  # unknown fingerprint
    from schemas import codec

    world.publish(Kind.STEP, codec.encode("EpisodeEvent", end_record("e", 1)), eid="e")  # on the steps topic
    publish_episode(world, "e", 1)
    world.settle()
    assert Counter(x.reason for x in world.deadletters) == Counter(
        {Reason.CORRUPT: 1, Reason.UNKNOWN_SCHEMA: 1, Reason.WRONG_TOPIC: 1})
    assert stored_steps(world) == Counter({("e", 0): 1})


def test_the_validator_rejects_with_its_reason() -> None:
    def validator(name: str, record: dict, key: bytes | None, now_us: int) -> None:
        if key != record["episode_id"].encode():
            raise Rejected(Reason.KEY_MISMATCH, "key is not the episode id")

    world = World()
    world.machine.validator = validator
    world.publish(Kind.STEP, step_record("e", 0), eid="e")
    world.topics[(Kind.STEP, sum(b"e") % world.partitions)][0].key = b"other"
    publish_episode(world, "e", 1)
    world.settle()
    assert [x.reason for x in world.deadletters] == [Reason.KEY_MISMATCH]
    assert stored_steps(world) == Counter({("e", 0): 1})


def test_one_poisoned_episode_among_fifty_never_stalls_the_partition() -> None:
    world = World(partitions=1)
    for k in range(50):
        publish_episode(world, f"ok{k}", 3)
    publish_episode(world, "poison", 3)
    import consumers.assembly as assembly

    original = assembly.close_episode

    def close(meta: dict, *args, **kwargs):  # noqa: ANN001, ANN202
        if meta["episode_id"] == "poison":
            raise OverflowError("date value out of range")
        return original(meta, *args, **kwargs)

    assembly.close_episode = close
    try:
        world.settle()
    finally:
        assembly.close_episode = original
    assert set(stored_episodes(world)) == {f"ok{k}" for k in range(50)}
    poisoned = letters(world, Reason.POISON_EPISODE)
    assert sorted((x.topic, x.offset) for x in poisoned if x.topic == "steps") == [("steps", 150 + i) for i in range(3)]
    assert any(x.topic == "episodes" for x in poisoned)


# -- random interleavings with crashes and rebalances ----------------------------------------------

@st.composite
def scenarios(draw: st.DrawFn) -> dict:
    episodes = []
    for k in range(draw(st.integers(1, 5))):
        n = draw(st.integers(1, 6))
        episodes.append({"eid": f"ep{k}", "n": n, "end": draw(st.booleans()) or k == 0,
                         "dup": draw(st.lists(st.integers(0, n - 1), max_size=2)),
                         "interventions": draw(st.lists(st.integers(0, n - 1), max_size=2, unique=True))})
    return {"episodes": episodes, "seed": draw(st.integers(0, 2**32 - 1)),
            "actions": draw(st.lists(st.sampled_from(["deliver"] * 8 + ["tick", "flush", "done", "letters",
                                                                          "commit", "crash", "rebalance", "again"]),
                                     min_size=10, max_size=120))}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_every_event_ends_stored_dead_lettered_or_counted_exactly_once(sc: dict) -> None:
    rng = random.Random(sc["seed"])
    world = World(rng=rng)
    planned: list[tuple[Kind, str, dict | None]] = []
    for ep in sc["episodes"]:
        eid = ep["eid"]
        planned += [(Kind.STEP, eid, step_record(eid, i)) for i in range(ep["n"])]
        planned += [(Kind.STEP, eid, step_record(eid, i)) for i in ep["dup"]]
        planned += [(Kind.INTERVENTION, eid, intervention_record(eid, "STARTED", i)) for i in ep["interventions"]]
        if ep["end"]:
            planned.append((Kind.EPISODE, eid, end_record(eid, ep["n"])))
    rng.shuffle(planned)
    for kind, eid, rec in planned:
        world.publish(kind, rec, eid=eid)
    for action in sc["actions"]:
        if action == "deliver" and world.deliverable():
            world.deliver(rng.choice(world.deliverable()))
        elif action == "again" and world.redeliverable():
            tp = rng.choice(world.redeliverable())
            world.deliver(tp, again=rng.randrange(world.committed[tp], world.position[tp]))
        elif action == "tick":
            world.tick(rng.choice([0.5, 3.0, 30.0]))
        elif action == "flush":
            world.flush_write()
        elif action == "done":
            world.flush_done()
        elif action == "letters":
            world.deliver_letters()
        elif action == "commit":
            world.commit()
        elif action == "crash":
            world.crash()
        elif action == "rebalance":
            world.rebalance()
    world.settle()

    steps = stored_steps(world)
    assert all(c == 1 for c in steps.values()), "a step stored twice"
    assert all(c == 1 for c in stored_episodes(world).values()), "an episode stored twice"
    inter = Counter((r["episode_id"], r["kind"], r["step_index"]) for r in world.tables["interventions"].rows.values())
    assert all(c == 1 for c in inter.values()), "an intervention stored twice"
    letters_at = {(x.topic, x.partition, x.offset) for x in world.deadletters}
    for ep in sc["episodes"]:
        eid = ep["eid"]
        assert stored_episodes(world)[eid] == 1, f"{eid} not stored"
        for i in range(ep["n"]):
            if steps[(eid, i)] == 0:  # not stored: then every copy of it was dead-lettered
                p = sum(eid.encode()) % 2
                offsets = [m.offset for m in world.topics[(Kind.STEP, p)]
                           if m.key == eid.encode() and _index(m.value) == i]
                assert all(("steps", p, o) in letters_at for o in offsets), f"step {i} of {eid} lost"
        for i in ep["interventions"]:
            assert inter[(eid, "STARTED", i)] == 1, f"intervention {i} of {eid} lost"
    # every input offset was acknowledged in the end: nothing holds a partition back
    for tp, log in world.topics.items():
        assert world.committed[tp] == len(log), f"{tp} stalled at {world.committed[tp]} of {len(log)}"


def _index(raw: bytes) -> int:
    from schemas import codec

    return codec.decode(raw)[1]["step_index"]


def test_an_episode_with_steps_of_an_unknown_schema_waits_for_their_replay() -> None:
    # a fleet upgraded before its processor: steps the processor cannot read yet are dead-lettered as
    # unknown-schema; their episode is not forced short meanwhile, and completes when they are re-published
    world = World()
    world.publish(Kind.STEP, step_record("e", 0), eid="e")
    future = codec.encode("Step", step_record("e", 1))
    unknown = future[:2] + b"\x99" * 8 + future[10:]
    world.publish(Kind.STEP, unknown, eid="e")
    world.publish(Kind.EPISODE, end_record("e", 2), eid="e")
    world.settle(rounds=5)  # 150 s: far past the end grace
    assert stored_episodes(world) == Counter()
    assert [x.reason for x in world.deadletters] == [Reason.UNKNOWN_SCHEMA]
    world.publish(Kind.STEP, step_record("e", 1), eid="e")  # `sop replay deadletter` after the upgrade
    world.settle()
    assert episode_row(world, "e")["closed_by"] == "end_event"
    assert stored_steps(world) == Counter({("e", 0): 1, ("e", 1): 1})


def test_a_broker_outage_does_not_count_as_silence() -> None:
    # robots spool while the broker is away and drain once it is back: their episodes get a fresh timeout then
    world = World()
    publish_episode(world, "e", 2, end=False)
    while world.deliverable():
        world.deliver(world.deliverable()[0])
    world.machine.broker_unreachable(now_s=world.now)
    world.now += 1000.0  # a long outage
    world.machine.broker_reachable(now_s=world.now)
    world.tick(1.0)  # caught up, but silent only since the broker came back
    world.flush_write()
    world.flush_done()
    assert stored_episodes(world) == Counter()
    world.publish(Kind.STEP, step_record("e", 2), eid="e")  # drained from a robot's spool
    world.publish(Kind.EPISODE, end_record("e", 3), eid="e")
    world.settle()
    assert episode_row(world, "e")["closed_by"] == "end_event"


def test_a_phantom_unknown_schema_key_holds_nothing_open() -> None:
    world = World()
    future = codec.encode("Step", step_record("ghost", 0))
    world.publish(Kind.STEP, future[:2] + b"\x99" * 8 + future[10:], eid="ghost")
    world.settle()
    assert world.machine.open_count == 0 and "ghost" in world.machine.unknown_schema_keys


def test_a_gap_between_ticks_is_not_silence() -> None:
    # ticks travel through the broker: when they stop (an outage), the episodes' silence stops counting
    import dataclasses

    world = World()
    world.machine.config = dataclasses.replace(world.config, tick_gap_s=10.0)
    publish_episode(world, "e", 2, end=False)
    while world.deliverable():
        world.deliver(world.deliverable()[0])
    world.tick(1.0)
    world.tick(25.0)  # the next tick comes 25 s later: past the abort timeout (20 s), but it was a gap
    world.tick(1.0)  # and the one after it, a second later
    world.flush_write()
    world.flush_done()
    assert stored_episodes(world) == Counter()
    world.publish(Kind.STEP, step_record("e", 2), eid="e")  # drained from a robot's spool after the outage
    world.publish(Kind.EPISODE, end_record("e", 3), eid="e")
    world.settle()
    assert episode_row(world, "e")["closed_by"] == "end_event"
