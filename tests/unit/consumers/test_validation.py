"""Validation at the edge: valid events pass, each kind of poison is refused with its reason, garbage never crashes."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.deadletter import Reason, Rejected, reason_of
from consumers.validation import (
    BadImage,
    Contracts,
    SkewWindow,
    TaskContract,
    UnknownTasks,
    jpeg_size,
    parse_task_contracts,
    png_size,
    task_contracts_json,
    validate_record,
    validate_step,
)
from producers.images import encode_image
from schemas import codec

NOW = 1_760_000_000_000_000  # a fixed processor clock (µs); tests never read the real one
SKEW = SkewWindow(future_us=60_000_000, past_us=7 * 86_400_000_000)
MAX_STEPS = 500

# Two tasks; "stack" has two cameras of different, non-square sizes so that a width/height swap shows.
CONTRACTS = Contracts(
    tasks={
        "stack": TaskContract(action_dim=4, proprio_dim=39, cameras={"corner": (40, 48), "wrist": (32, 24)}),
        "reach": TaskContract(action_dim=3, proprio_dim=7, cameras={"top": (16, 16)}, encodings=frozenset({"png"})),
    },
    max_steps=MAX_STEPS,
)


def _image(width: int, height: int, encoding: str, seed: int = 0, **save: Any) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    if not save:
        return encode_image(pixels, encoding=encoding)
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=encoding.upper(), **save)
    return buf.getvalue()


# A few real images per (encoding, width, height), made once.
POOL: dict[tuple[str, int, int], list[bytes]] = {
    (enc, w, h): [_image(w, h, enc, seed) for seed in range(3)]
    for enc in ("jpeg", "png") for (w, h) in {(40, 48), (32, 24), (16, 16)}
}


def _step(task: str = "stack", **overrides: Any) -> dict[str, Any]:
    c = CONTRACTS.tasks[task]
    enc = "png" if "png" in c.encodings and "jpeg" not in c.encodings else "jpeg"
    record = {
        "episode_id": "robot-7-ep-000042", "actor_id": "robot-7", "task": task, "instruction": "do it",
        "step_index": 12, "event_time_us": NOW - 2_000_000, "policy_version": "5",
        "images": [{"camera": cam, "encoding": enc, "width": w, "height": h, "data": POOL[(enc, w, h)][0]}
                   for cam, (w, h) in c.cameras.items()],
        "proprio": [0.25] * c.proprio_dim, "action": [0.5] * c.action_dim, "policy_action": [-0.5] * c.action_dim,
        "controller": "POLICY", "env_reward": 0.125, "success": False,
    }
    record.update(overrides)
    return record


def _episode(kind: str = "ENDED", **overrides: Any) -> dict[str, Any]:
    record = {"episode_id": "robot-7-ep-000042", "kind": kind, "actor_id": "robot-7", "task": "stack",
              "instruction": "do it", "policy_version": "5", "event_time_us": NOW, "seed": 3,
              "outcome": "SUCCESS" if kind == "ENDED" else None, "num_steps": 40 if kind == "ENDED" else None}
    record.update(overrides)
    return record


def _intervention(**overrides: Any) -> dict[str, Any]:
    record = {"episode_id": "robot-7-ep-000042", "kind": "STARTED", "actor_id": "robot-7", "task": "stack",
              "step_index": 9, "event_time_us": NOW, "operator_id": "op", "reason": "divergence"}
    record.update(overrides)
    return record


def _check(record: dict, *, key: bytes | None = None, contracts: Contracts = CONTRACTS, name: str = "Step",
           skew: SkewWindow = SKEW) -> None:
    validate_record(name, record, key=record["episode_id"].encode() if key is None else key, contracts=contracts,
                    now_us=NOW, skew=skew)


def _rejected(record: dict, reason: Reason, *, match: str | None = None, **kw: Any) -> Rejected:
    with pytest.raises(Rejected, match=match) as info:
        _check(record, **kw)
    assert info.value.reason is reason, str(info.value)
    return info.value


# -- hand-made poison, one per rule ---------------------------------------------------------------


def test_a_good_step_of_each_task_passes() -> None:
    _check(_step("stack"))
    _check(_step("reach"))
    _check(_step(policy_action=None, env_reward=None))


@pytest.mark.parametrize("field", ["proprio", "action", "policy_action"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_vectors_are_invalid(field: str, bad: float) -> None:
    record = _step()
    record[field] = list(record[field])
    record[field][2] = bad
    _rejected(record, Reason.INVALID_VALUE, match=rf"Step\.{field}\[2\] is")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_reward_is_invalid(bad: float) -> None:
    _rejected(_step(env_reward=bad), Reason.INVALID_VALUE, match=r"Step\.env_reward")


def test_a_huge_but_finite_vector_is_not_mistaken_for_non_finite() -> None:
    # float64 values whose sum overflows: the fast sum check must fall back to looking at each value.
    _check(_step(proprio=[1.7e308] * 39))


@pytest.mark.parametrize(("field", "length"), [("action", 3), ("action", 5), ("proprio", 38), ("proprio", 40),
                                               ("policy_action", 3), ("policy_action", 0)])
def test_lengths_must_match_the_declared_dims(field: str, length: int) -> None:
    err = _rejected(_step(**{field: [0.0] * length}), Reason.INVALID_VALUE, match=rf"Step\.{field} has {length} values")
    assert "'stack'" in str(err)


def _with_images(images: list[dict]) -> dict:
    return _step(images=images)


def _img(camera: str, width: int, height: int, encoding: str = "jpeg", data: bytes | None = None) -> dict:
    data = data if data is not None else POOL[(encoding, width, height)][0]
    return {"camera": camera, "encoding": encoding, "width": width, "height": height, "data": data}


def _without_frame_header(jpeg: bytes) -> bytes:
    sof = jpeg.index(b"\xff\xc0")
    return jpeg[:sof] + jpeg[sof + 2 + int.from_bytes(jpeg[sof + 2:sof + 4], "big"):]


CORNER = _img("corner", 40, 48)
WRIST = _img("wrist", 32, 24)


@pytest.mark.parametrize(("images", "match"), [
    ([CORNER], r"missing \['wrist'\]"),
    ([CORNER, WRIST, _img("top", 16, 16)], r"extra or repeated \['top'\]"),
    ([CORNER, CORNER], r"missing \['wrist'\], extra or repeated \['corner'\]"),
    ([], r"missing \['corner', 'wrist'\]"),
    ([CORNER, {**WRIST, "width": 24, "height": 32, "data": _image(24, 32, "jpeg")}], r"is 24x32 but the task declares 32x24"),
    ([CORNER, {**WRIST, "height": 25}], r"is 32x25 but the task declares 32x24"),
    ([CORNER, {**WRIST, "encoding": "webp"}], r"encoding 'webp' is not one of"),
    ([CORNER, {**WRIST, "encoding": "png"}], r"not a valid png"),  # JPEG bytes labelled PNG
    ([CORNER, {**WRIST, "data": WRIST["data"][:-1]}], r"no EOI"),
    ([CORNER, {**WRIST, "data": WRIST["data"][: len(WRIST["data"]) // 2]}], r"not a valid jpeg"),
    ([CORNER, {**WRIST, "data": WRIST["data"] + b"\x00"}], r"no EOI"),
    ([CORNER, {**WRIST, "data": b"\xff\xd8" + b"\x00" * 100 + b"\xff\xd9"}], r"not a valid jpeg"),
    ([CORNER, {**WRIST, "data": _image(32, 32, "jpeg")}], r"is a 32x32 jpeg but the record says 32x24"),
    ([CORNER, {**WRIST, "data": WRIST["data"].replace(b"\xff\xc0", b"\xff\xc3", 1)}], r"unsupported JPEG process"),
    ([CORNER, {**WRIST, "data": _without_frame_header(WRIST["data"])}], r"a scan \(SOS\) before any frame header"),
    ([CORNER, {**WRIST, "data": _image(24, 32, "jpeg")}], r"is a 24x32 jpeg but the record says 32x24"),
])
def test_images_must_match_the_declared_cameras_sizes_and_bytes(images: list[dict], match: str) -> None:
    _rejected(_with_images(images), Reason.INVALID_VALUE, match=match)


def test_an_encoding_the_task_does_not_allow_is_invalid() -> None:
    record = _step("reach", images=[_img("top", 16, 16, "jpeg")])
    _rejected(record, Reason.INVALID_VALUE, match=r"encoding 'jpeg' is not one of \['png'\]")


@pytest.mark.parametrize(("data", "match"), [
    (POOL[("png", 16, 16)][0][:-1], "no IEND"),
    (POOL[("png", 16, 16)][0][:60] + POOL[("png", 16, 16)][0][-12:], "chunk"),
    (POOL[("png", 16, 16)][0][:23] + b"\x11" + POOL[("png", 16, 16)][0][24:], "IHDR CRC"),
    (_image(16, 17, "png"), "is a 16x17 png but the record says 16x16"),
    (POOL[("jpeg", 16, 16)][0], "not a valid png"),
])
def test_png_bytes_must_be_whole_and_of_the_declared_size(data: bytes, match: str) -> None:
    _rejected(_step("reach", images=[_img("top", 16, 16, "png", data)]), Reason.INVALID_VALUE, match=match)


def test_the_full_decode_catches_what_the_structure_check_lets_through() -> None:
    # A PNG whose chunks are whole but whose image data is zeros (not zlib): structurally fine, does not decode.
    png = POOL[("png", 16, 16)][0]
    idat = png.index(b"IDAT")
    broken = png[: idat + 4] + bytes(len(png) - idat - 4 - 16) + png[-16:]  # keep IDAT's CRC and IEND
    reach = _step("reach", images=[_img("top", 16, 16, "png", broken)])
    _check(reach)  # the cheap filter passes it on, by design
    full = Contracts(tasks=CONTRACTS.tasks, max_steps=MAX_STEPS, full_image_decode=True)
    _rejected(reach, Reason.INVALID_VALUE, match="does not decode", contracts=full)
    _check(_step(), contracts=full)
    _check(_step("reach"), contracts=full)


def test_event_times_outside_the_skew_window_are_clock_skew() -> None:
    _check(_step(event_time_us=NOW + SKEW.future_us))
    _check(_step(event_time_us=NOW - SKEW.past_us))
    _rejected(_step(event_time_us=NOW + SKEW.future_us + 1), Reason.CLOCK_SKEW, match="ahead of the processor's clock")
    _rejected(_step(event_time_us=NOW - SKEW.past_us - 1), Reason.CLOCK_SKEW, match="behind the processor's clock")
    for name, record in (("EpisodeEvent", _episode()), ("InterventionEvent", _intervention())):
        _rejected({**record, "event_time_us": NOW + 61_000_000}, Reason.CLOCK_SKEW, name=name)
        _rejected({**record, "event_time_us": 1}, Reason.CLOCK_SKEW, name=name)


def test_a_replay_window_has_no_past_bound() -> None:
    replay = SkewWindow.from_seconds(future_s=60, past_s=0)  # the setting's 0 = no bound
    assert replay.past_us is None
    _check(_step(event_time_us=1), skew=replay)
    _check(_episode(event_time_us=1), skew=replay, name="EpisodeEvent")
    _rejected(_step(event_time_us=NOW + 61_000_000), Reason.CLOCK_SKEW, skew=replay)


@pytest.mark.parametrize("key", [b"robot-7-ep-000043", b"", b"ROBOT-7-EP-000042", None])
@pytest.mark.parametrize("name", ["Step", "EpisodeEvent", "InterventionEvent"])
def test_a_key_that_is_not_the_episode_id_is_a_key_mismatch(key: bytes | None, name: str) -> None:
    record = {"Step": _step, "EpisodeEvent": _episode, "InterventionEvent": _intervention}[name]()
    with pytest.raises(Rejected, match="Kafka key") as info:
        validate_record(name, record, key=key, contracts=CONTRACTS, now_us=NOW, skew=SKEW)
    assert info.value.reason is Reason.KEY_MISMATCH


def test_step_indices_and_episode_lengths_are_bounded() -> None:
    _check(_step(step_index=MAX_STEPS - 1))
    _rejected(_step(step_index=MAX_STEPS), Reason.INVALID_VALUE, match=r"Step\.step_index 500")
    _rejected(_step(step_index=-1), Reason.INVALID_VALUE)
    _check(_episode(num_steps=0), name="EpisodeEvent")
    _check(_episode(num_steps=MAX_STEPS), name="EpisodeEvent")
    _rejected(_episode(num_steps=-1), Reason.INVALID_VALUE, name="EpisodeEvent", match=r"num_steps -1")
    _rejected(_episode(num_steps=MAX_STEPS + 1), Reason.INVALID_VALUE, name="EpisodeEvent", match=r"num_steps 501")
    _rejected(_episode(num_steps=None), Reason.INVALID_VALUE, name="EpisodeEvent")
    _check(_intervention(step_index=MAX_STEPS), name="InterventionEvent")  # ENDED at the episode's end
    _rejected(_intervention(step_index=MAX_STEPS + 1), Reason.INVALID_VALUE, name="InterventionEvent",
              match=r"step_index 501")
    _rejected(_intervention(step_index=-1), Reason.INVALID_VALUE, name="InterventionEvent")


def test_kinds_outcomes_and_controllers_must_be_known() -> None:
    _check(_episode("STARTED"), name="EpisodeEvent")
    _rejected(_episode(kind="PAUSED"), Reason.INVALID_VALUE, name="EpisodeEvent", match="kind 'PAUSED'")
    _rejected(_episode(outcome="WON"), Reason.INVALID_VALUE, name="EpisodeEvent", match="outcome 'WON'")
    _rejected(_episode(outcome=None), Reason.INVALID_VALUE, name="EpisodeEvent")
    _rejected(_intervention(kind="PAUSED"), Reason.INVALID_VALUE, name="InterventionEvent")
    _rejected(_step(controller="ROBOT"), Reason.INVALID_VALUE, match="controller 'ROBOT'")


def test_unknown_tasks_follow_the_policy() -> None:
    stranger = {**_step(), "task": "juggle-v1", "action": [0.0] * 7, "policy_action": None,
                "images": [_img("any", 16, 16, "png")]}
    _check(stranger)  # default: accepted with the generic checks
    strict = Contracts(tasks=CONTRACTS.tasks, unknown_tasks=UnknownTasks.REJECT)
    _rejected(stranger, Reason.INVALID_VALUE, contracts=strict, match="'juggle-v1' of episode .* has no contract; known tasks: reach, stack")
    _rejected({**_episode(), "task": "juggle-v1"}, Reason.INVALID_VALUE, contracts=strict, name="EpisodeEvent")
    _rejected({**_intervention(), "task": "juggle-v1"}, Reason.INVALID_VALUE, contracts=strict, name="InterventionEvent")
    # The generic checks still hold for a task without a contract.
    _rejected({**stranger, "action": [0.0, math.nan]}, Reason.INVALID_VALUE, match=r"action\[1\]")
    _rejected({**stranger, "policy_action": [0.0]}, Reason.INVALID_VALUE, match="policy_action has 1 values but Step.action has 7")
    _rejected({**stranger, "action": []}, Reason.INVALID_VALUE, match="empty")
    _rejected({**stranger, "images": [_img("any", 16, 16, "png"), _img("any", 16, 16, "png")]}, Reason.INVALID_VALUE,
              match="repeats a camera")
    _rejected({**stranger, "images": [_img("any", 16, 16, "bmp", b"BM..")]}, Reason.INVALID_VALUE, match="'bmp'")
    _rejected({**stranger, "images": [_img("any", 16, 16, "png", POOL[("png", 32, 24)][0])]}, Reason.INVALID_VALUE,
              match="is a 32x24 png but the record says 16x16")


def test_an_unknown_record_name_is_a_wrong_topic() -> None:
    with pytest.raises(Rejected) as info:
        validate_record("Heartbeat", {}, key=b"", contracts=CONTRACTS, now_us=NOW, skew=SKEW)
    assert info.value.reason is Reason.WRONG_TOPIC


def _admit(raw: bytes, key: bytes) -> Reason | None:
    """What the processor does with one message: decode, then validate; the dead-letter reason, or None."""
    try:
        name, record = codec.decode(raw)
        validate_record(name, record, key=key, contracts=CONTRACTS, now_us=NOW, skew=SKEW)
    except (codec.DecodeError, Rejected) as exc:
        return reason_of(exc)
    return None


@pytest.mark.parametrize("field", ["proprio", "action", "policy_action", "env_reward"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused_end_to_end_after_the_codec(field: str, bad: float) -> None:
    record = _step()
    if field == "env_reward":
        record[field] = bad
    else:
        record[field] = [bad, *record[field][1:]]
    raw = codec.encode("Step", record)  # Avro itself carries nan and inf
    assert _admit(raw, record["episode_id"].encode()) is Reason.INVALID_VALUE
    assert _admit(codec.encode("Step", _step()), record["episode_id"].encode()) is None


# -- properties -----------------------------------------------------------------------------------

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@st.composite
def valid_steps(draw: st.DrawFn) -> dict[str, Any]:
    task = draw(st.sampled_from(sorted(CONTRACTS.tasks)))
    c = CONTRACTS.tasks[task]
    images = []
    for cam, (w, h) in c.cameras.items():
        enc = draw(st.sampled_from(sorted(c.encodings)))
        images.append({"camera": cam, "encoding": enc, "width": w, "height": h,
                       "data": draw(st.sampled_from(POOL[(enc, w, h)]))})
    eid = draw(st.text(min_size=1, max_size=40))
    return {
        "episode_id": eid, "actor_id": "robot", "task": task, "instruction": draw(st.text(max_size=20)),
        "step_index": draw(st.integers(0, MAX_STEPS - 1)),
        "event_time_us": draw(st.integers(NOW - SKEW.past_us, NOW + SKEW.future_us)),
        "policy_version": "1", "images": draw(st.permutations(images)),
        "proprio": draw(st.lists(finite32, min_size=c.proprio_dim, max_size=c.proprio_dim)),
        "action": draw(st.lists(finite32, min_size=c.action_dim, max_size=c.action_dim)),
        "policy_action": draw(st.none() | st.lists(finite32, min_size=c.action_dim, max_size=c.action_dim)),
        "controller": draw(st.sampled_from(["POLICY", "HUMAN"])), "env_reward": draw(st.none() | finite32),
        "success": draw(st.booleans()),
    }


@settings(max_examples=200, deadline=None)
@given(valid_steps())
def test_random_valid_steps_are_accepted_also_after_the_codec(record: dict) -> None:
    _check(record)
    assert _admit(codec.encode("Step", record), record["episode_id"].encode()) is None


Corruption = Callable[[dict, st.DrawFn], None]


def _nonfinite(d: dict, draw: st.DrawFn) -> None:
    field = draw(st.sampled_from(["proprio", "action", "policy_action", "env_reward"]))
    bad = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    if field == "env_reward":
        d[field] = bad
    else:
        d[field] = list(d[field] or [0.0] * len(d["action"]))
        d[field][draw(st.integers(0, len(d[field]) - 1))] = bad


def _length(d: dict, draw: st.DrawFn) -> None:
    field = draw(st.sampled_from(["proprio", "action", "policy_action"]))
    n = len(d[field] or d["action"])
    d[field] = [0.0] * draw(st.integers(0, 60).filter(lambda k: k != n))


def _camera_set(d: dict, draw: st.DrawFn) -> None:
    choice = draw(st.sampled_from(["drop", "extra", "repeat", "rename"]))
    if choice == "drop":
        d["images"].pop(draw(st.integers(0, len(d["images"]) - 1)))
    elif choice == "extra":
        d["images"].append({**d["images"][0], "camera": "spare"})
    elif choice == "repeat":
        d["images"].append(dict(d["images"][0]))
    else:
        d["images"][0]["camera"] = d["images"][0]["camera"] + "-x"


def _declared_size(d: dict, draw: st.DrawFn) -> None:
    img = draw(st.sampled_from(d["images"]))
    img[draw(st.sampled_from(["width", "height"]))] += draw(st.sampled_from([-1, 1, 7]))


def _encoding(d: dict, draw: st.DrawFn) -> None:
    img = draw(st.sampled_from(d["images"]))
    img["encoding"] = draw(st.sampled_from(["webp", "JPEG", "", "png" if img["encoding"] == "jpeg" else "jpeg"]))


def _image_bytes(d: dict, draw: st.DrawFn) -> None:
    img = draw(st.sampled_from(d["images"]))
    choice = draw(st.sampled_from(["truncate", "append", "garbage", "other-size"]))
    if choice == "truncate":
        img["data"] = img["data"][: draw(st.integers(0, len(img["data"]) - 1))]
    elif choice == "append":
        # Bytes after the image that end in another EOI are harmless (decoders stop at the first): not a corruption.
        img["data"] = img["data"] + draw(st.binary(min_size=1, max_size=8).filter(lambda b: not b.endswith(b"\xff\xd9")))
    elif choice == "garbage":
        img["data"] = draw(st.binary(min_size=1, max_size=200))
    else:
        img["data"] = _image(img["width"] + 1, img["height"], img["encoding"])


def _time_skew(d: dict, draw: st.DrawFn) -> None:
    d["event_time_us"] = draw(st.sampled_from([NOW + SKEW.future_us + draw(st.integers(1, 10**12)),
                                               NOW - SKEW.past_us - draw(st.integers(1, 10**12))]))


def _key(d: dict, draw: st.DrawFn) -> None:
    d["__key__"] = draw(st.none() | st.binary(max_size=40).filter(lambda k: k != d["episode_id"].encode()))


def _index(d: dict, draw: st.DrawFn) -> None:
    d["step_index"] = draw(st.integers(MAX_STEPS, 2**31 - 1) | st.integers(-(2**31), -1))


CORRUPTIONS: dict[str, tuple[Corruption, Reason]] = {
    "non-finite": (_nonfinite, Reason.INVALID_VALUE), "length": (_length, Reason.INVALID_VALUE),
    "camera-set": (_camera_set, Reason.INVALID_VALUE), "declared-size": (_declared_size, Reason.INVALID_VALUE),
    "encoding": (_encoding, Reason.INVALID_VALUE), "image-bytes": (_image_bytes, Reason.INVALID_VALUE),
    "step-index": (_index, Reason.INVALID_VALUE), "time": (_time_skew, Reason.CLOCK_SKEW),
    "key": (_key, Reason.KEY_MISMATCH),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_each_kind_of_corruption_is_rejected_with_its_reason(kind: str, data: st.DataObject) -> None:
    corrupt, reason = CORRUPTIONS[kind]
    record = copy.deepcopy(data.draw(valid_steps()))
    corrupt(record, data.draw)
    key = record.pop("__key__", record["episode_id"].encode())
    with pytest.raises(Rejected) as info:
        validate_step(record, key=key, contracts=CONTRACTS, now_us=NOW, skew=SKEW)
    assert info.value.reason is reason, str(info.value)


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=600), encoding=st.sampled_from(["jpeg", "png"]), full=st.booleans(),
       known=st.booleans())
def test_arbitrary_bytes_as_image_data_raise_nothing_but_rejected(data: bytes, encoding: str, full: bool,
                                                                  known: bool) -> None:
    contracts = Contracts(tasks=CONTRACTS.tasks if known else {}, max_steps=MAX_STEPS, full_image_decode=full)
    record = _step("reach", images=[_img("top", 16, 16, encoding, data)])
    record["task"] = "reach" if known else "juggle"
    try:
        _check(record, contracts=contracts)
    except Rejected as exc:
        assert exc.reason is Reason.INVALID_VALUE


@st.composite
def mutated_images(draw: st.DrawFn) -> tuple[str, bytes, bytes]:
    enc, w, h = draw(st.sampled_from(sorted(POOL)))
    good = draw(st.sampled_from(POOL[(enc, w, h)]))
    data = bytearray(good)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=4))
        else:
            del data[i:i + draw(st.integers(1, 8))]
    return enc, good, bytes(data)


@settings(max_examples=400, deadline=None)
@given(mutated_images())
def test_parsers_on_mutated_images_give_a_size_or_bad_image(case: tuple[str, bytes, bytes]) -> None:
    enc, good, data = case
    parse = jpeg_size if enc == "jpeg" else png_size
    try:
        width, height = parse(data)
    except BadImage:
        pass
    else:
        assert width > 0 and height > 0
    for cut in (1, len(good) // 3, len(good) - 1):  # every proper prefix is a truncation, always refused
        with pytest.raises(BadImage):
            parse(good[:cut])


@settings(max_examples=60, deadline=None)
@given(w=st.integers(1, 300), h=st.integers(1, 300), progressive=st.booleans(), grey=st.booleans(),
       quality=st.integers(5, 95))
def test_the_jpeg_parser_reads_the_size_pil_wrote(w: int, h: int, progressive: bool, grey: bool, quality: int) -> None:
    import io

    from PIL import Image

    pixels = np.random.default_rng(w * 1000 + h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    pil = Image.fromarray(pixels).convert("L") if grey else Image.fromarray(pixels)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=quality, progressive=progressive, optimize=progressive)
    assert jpeg_size(buf.getvalue()) == (w, h)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=1)
    assert png_size(buf.getvalue()) == (w, h)


# -- contracts from settings ----------------------------------------------------------------------


def test_contracts_round_trip_through_json_text_and_a_file(tmp_path: Path) -> None:
    text = task_contracts_json(CONTRACTS.tasks)
    assert parse_task_contracts(text) == dict(CONTRACTS.tasks)
    path = tmp_path / "contracts.json"
    path.write_text(text)
    assert parse_task_contracts(f" {path} ") == dict(CONTRACTS.tasks)
    named = parse_task_contracts('{"t": {"action_dim": 2, "proprio_dim": 0, "cameras": {"c": {"width": 8, "height": 6}}}}')
    assert named["t"].cameras["c"] == (8, 6) and named["t"].encodings == frozenset({"jpeg", "png"})


@pytest.mark.parametrize(("value", "match"), [
    ("{not json", "is not valid JSON"),
    ("/no/such/contracts.json", "neither JSON text"),
    ("[1]", "must be a JSON object"),
    ('{"t": {"action_dim": 4, "proprio_dim": 39}}', r"missing keys \['cameras'\]"),
    ('{"t": {"action_dim": 4, "proprio_dim": 39, "cameras": {}, "fps": 3}}', r"unknown keys \['fps'\]"),
    ('{"t": {"action_dim": 4, "proprio_dim": 39, "cameras": {"c": [64]}}}', "camera 'c' needs"),
    ('{"t": {"action_dim": 4, "proprio_dim": 39, "cameras": {"c": [64, 0]}}}', "positive"),
    ('{"t": {"action_dim": 0, "proprio_dim": 39, "cameras": {}}}', "action_dim must be >= 1"),
    ('{"t": {"action_dim": "4", "proprio_dim": 39, "cameras": {}}}', "must be integers"),
    ('{"t": {"action_dim": 4, "proprio_dim": 39, "cameras": {}, "encodings": ["gif"]}}', "encodings must be"),
])
def test_malformed_contracts_name_the_setting_and_the_problem(value: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        parse_task_contracts(value)
    assert "SOP_PROCESSOR_TASK_CONTRACTS" in str(info.value)


def test_a_contract_is_immutable() -> None:
    c = CONTRACTS.tasks["stack"]
    with pytest.raises(TypeError):
        c.cameras["corner"] = (1, 1)  # type: ignore[index]
    assert json.loads(task_contracts_json({"stack": c}))["stack"]["cameras"]["corner"] == [40, 48]
