"""Validation at the edge: refuse, with a reason, the events the Avro codec accepts but nothing downstream survives.

Pure and synchronous; the processor calls one function per decoded event and dead-letters what raises::

    contracts = Contracts(tasks=parse_task_contracts(os.environ["SOP_PROCESSOR_TASK_CONTRACTS"]))
    skew = SkewWindow.from_seconds(future_s=60, past_s=7 * 86400)   # past_s=None: replay of old history
    try:
        validate_record(name, record, key=msg.key, contracts=contracts, now_us=time.time_ns() // 1000, skew=skew)
    except Rejected as exc:          # exc.reason: INVALID_VALUE, CLOCK_SKEW or KEY_MISMATCH
        dead_letter(msg, exc)

What it checks (each failure names the field and the values):

- the Kafka key is the record's episode id (``KEY_MISMATCH``);
- ``event_time_us`` lies in the skew window around the processor's clock (``CLOCK_SKEW``);
- the task has a contract, unless the policy for unknown tasks accepts them with the generic checks only;
- numbers are finite (proprio, action, policy_action, env_reward) and vectors have the declared lengths;
- step indices and episode lengths stay within ``max_steps``; event kinds and outcomes are known;
- images: exactly the declared cameras, each once, in an allowed encoding, with the declared size; the
  bytes are structurally a JPEG (SOI, segments, SOF0/1/2 giving the real size, SOS, EOI at the very end) or
  a PNG (signature, IHDR with a valid CRC, chunks up to IEND at the very end). A full decode is opt-in
  (``Contracts.full_image_decode``): the learner fully decodes later and quarantines what fails, so the
  edge is a cheap structural filter (about 1 µs per 64×64 JPEG instead of ~50 µs for a decode).

With Kafka security on (``SOP_KAFKA_SECURITY=scram-tls``) :func:`check_identity` also decides whether the event's
claimed ``actor_id`` belongs to the principal that produced it (``IDENTITY_MISMATCH``): the event must carry the
robot's signature headers (:mod:`schemas.identity`), the signature must verify under that robot's key, and the
actor id must be one of the robot's (docs/security.md).
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from consumers.deadletter import Reason, Rejected
from schemas.identity import HEADER_PRINCIPAL, HEADER_SIGNATURE, decode_key, header_values, verify_signature
from schemas.images import BadImage, jpeg_size, png_size

DEFAULT_ENCODINGS: frozenset[str] = frozenset({"jpeg", "png"})  # what the learner's decoder reads
DEFAULT_MAX_STEPS = 10_000
KINDS = frozenset({"STARTED", "ENDED"})
OUTCOMES = frozenset({"SUCCESS", "FAILURE", "TIMEOUT", "ABORTED"})
CONTROLLERS = frozenset({"POLICY", "HUMAN"})
SETTING = "SOP_PROCESSOR_TASK_CONTRACTS"


class UnknownTasks(StrEnum):
    """What to do with events of a task that has no contract."""

    ACCEPT = "accept"  # generic checks only (finite numbers, consistent lengths, well-formed images, time, key)
    REJECT = "reject"  # dead-letter as invalid-value


@dataclass(frozen=True, kw_only=True)
class TaskContract:
    """What every step of one task must look like.

    >>> TaskContract(action_dim=4, proprio_dim=39, cameras={"corner": (64, 64)})  # cameras: name -> (width, height)
    """

    action_dim: int
    proprio_dim: int
    cameras: Mapping[str, tuple[int, int]]
    encodings: frozenset[str] = DEFAULT_ENCODINGS

    def __post_init__(self) -> None:
        problems = []
        if self.action_dim < 1:
            problems.append(f"action_dim must be >= 1, got {self.action_dim}")
        if self.proprio_dim < 0:
            problems.append(f"proprio_dim must be >= 0, got {self.proprio_dim}")
        cams = {}
        for name, size in dict(self.cameras).items():
            try:
                if isinstance(size, str | bytes):
                    raise TypeError(size)
                w, h = (int(v) for v in size)
            except (TypeError, ValueError):
                problems.append(f"camera {name!r} needs (width, height), got {size!r}")
                continue
            if not name or w < 1 or h < 1:
                problems.append(f"camera {name!r} needs a name and a positive (width, height), got {size!r}")
            cams[str(name)] = (w, h)
        encodings = frozenset(self.encodings)
        unknown = sorted(encodings - DEFAULT_ENCODINGS)
        if unknown or not encodings:
            problems.append(f"encodings must be a non-empty subset of {sorted(DEFAULT_ENCODINGS)}, got {sorted(encodings)}")
        if problems:
            raise ValueError("TaskContract: " + "; ".join(problems))
        object.__setattr__(self, "cameras", MappingProxyType(cams))
        object.__setattr__(self, "encodings", encodings)


@dataclass(frozen=True, kw_only=True)
class Contracts:
    """The contracts of every known task and the rules for the rest.

    Unknown tasks are accepted with the generic checks by default: a site adds tasks over time, and a new
    task's first episodes should not end in the dead-letter topic because the processor's table lags behind.
    """

    tasks: Mapping[str, TaskContract] = field(default_factory=dict)
    unknown_tasks: UnknownTasks = UnknownTasks.ACCEPT
    encodings: frozenset[str] = DEFAULT_ENCODINGS  # allowed for tasks without a contract
    max_steps: int = DEFAULT_MAX_STEPS  # step_index < max_steps; num_steps and intervention step_index <= max_steps
    full_image_decode: bool = False  # also decode every image fully with PIL (slow; the learner does it anyway)

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"Contracts.max_steps must be >= 1, got {self.max_steps}")
        object.__setattr__(self, "tasks", MappingProxyType(dict(self.tasks)))
        object.__setattr__(self, "unknown_tasks", UnknownTasks(self.unknown_tasks))
        object.__setattr__(self, "encodings", frozenset(self.encodings))


@dataclass(frozen=True)
class SkewWindow:
    """Accepted event times: ``now - past_us <= event_time_us <= now + future_us``; ``past_us=None``: no lower bound."""

    future_us: int = 60_000_000
    past_us: int | None = 7 * 86_400_000_000

    def __post_init__(self) -> None:
        if self.future_us < 0 or (self.past_us is not None and self.past_us < 0):
            raise ValueError(f"SkewWindow bounds must be >= 0, got future_us={self.future_us} past_us={self.past_us}")

    @classmethod
    def from_seconds(cls, *, future_s: float, past_s: float | None) -> SkewWindow:
        """``past_s=None`` (or 0, as the setting writes it) disables the past bound, for replays of history."""
        return cls(int(future_s * 1e6), int(past_s * 1e6) if past_s else None)


# -- the checks -----------------------------------------------------------------------------------


def validate_step(record: Mapping[str, Any], *, key: bytes | None, contracts: Contracts, now_us: int,
                  skew: SkewWindow) -> None:
    """Raise :class:`Rejected` unless the ``Step`` record fits its task's contract.

    >>> validate_step(step, key=b"ep-1", contracts=contracts, now_us=time.time_ns() // 1000, skew=SkewWindow())
    """
    eid = record["episode_id"]
    _key(key, eid, "Step")
    _time(record["event_time_us"], now_us, skew, "Step", eid)
    task = _contract(record["task"], contracts, "Step", eid)
    index = record["step_index"]
    if not 0 <= index < contracts.max_steps:
        raise Rejected(Reason.INVALID_VALUE,
                       f"Step.step_index {index} of episode {eid!r} outside 0..{contracts.max_steps - 1}")
    if record["controller"] not in CONTROLLERS:
        raise Rejected(Reason.INVALID_VALUE, f"Step.controller {record['controller']!r} is not one of {sorted(CONTROLLERS)}")
    action = record["action"]
    proprio = record["proprio"]
    proposed = record.get("policy_action")
    if task is not None:
        if len(action) != task.action_dim:
            raise _dim("action", action, task.action_dim, record)
        if len(proprio) != task.proprio_dim:
            raise _dim("proprio", proprio, task.proprio_dim, record)
        if proposed is not None and len(proposed) != task.action_dim:
            raise _dim("policy_action", proposed, task.action_dim, record)
    else:
        if not action:
            raise Rejected(Reason.INVALID_VALUE, f"Step.action of episode {eid!r} step {index} is empty")
        if proposed is not None and len(proposed) != len(action):
            raise Rejected(Reason.INVALID_VALUE, f"Step.policy_action has {len(proposed)} values but Step.action has "
                                                 f"{len(action)} (episode {eid!r} step {index})")
    # One sum per vector: any inf or nan makes it non-finite (float32 values cannot overflow a float64 sum).
    if not math.isfinite(sum(action)):
        _finite("action", action, record)
    if not math.isfinite(sum(proprio)):
        _finite("proprio", proprio, record)
    if proposed is not None and not math.isfinite(sum(proposed)):
        _finite("policy_action", proposed, record)
    reward = record.get("env_reward")
    if reward is not None and not math.isfinite(reward):
        raise Rejected(Reason.INVALID_VALUE, f"Step.env_reward is {reward} (episode {eid!r} step {index})")
    _images(record["images"], task, contracts, eid, index)


def _event_head(name: str, record: Mapping[str, Any], *, key: bytes | None, contracts: Contracts, now_us: int,
                skew: SkewWindow) -> tuple[str, str]:
    """The checks every episode and intervention event shares (key, time, task, kind): its episode id and kind."""
    eid = record["episode_id"]
    _key(key, eid, name)
    _time(record["event_time_us"], now_us, skew, name, eid)
    _contract(record["task"], contracts, name, eid)
    kind = record["kind"]
    if kind not in KINDS:
        raise Rejected(Reason.INVALID_VALUE, f"{name}.kind {kind!r} of episode {eid!r} is not one of {sorted(KINDS)}")
    return eid, kind


def validate_episode_event(record: Mapping[str, Any], *, key: bytes | None, contracts: Contracts, now_us: int,
                           skew: SkewWindow) -> None:
    """Raise :class:`Rejected` unless the ``EpisodeEvent`` is acceptable (key, time, task, kind, outcome, num_steps)."""
    eid, kind = _event_head("EpisodeEvent", record, key=key, contracts=contracts, now_us=now_us, skew=skew)
    if kind == "ENDED":
        outcome, n = record.get("outcome"), record.get("num_steps")
        if outcome not in OUTCOMES:
            raise Rejected(Reason.INVALID_VALUE,
                           f"EpisodeEvent ENDED.outcome {outcome!r} of episode {eid!r} is not one of {sorted(OUTCOMES)}")
        if n is None or not 0 <= n <= contracts.max_steps:
            raise Rejected(Reason.INVALID_VALUE,
                           f"EpisodeEvent ENDED.num_steps {n!r} of episode {eid!r} outside 0..{contracts.max_steps}")


def validate_intervention(record: Mapping[str, Any], *, key: bytes | None, contracts: Contracts, now_us: int,
                          skew: SkewWindow) -> None:
    """Raise :class:`Rejected` unless the ``InterventionEvent`` is acceptable (key, time, task, kind, step_index)."""
    eid, _ = _event_head("InterventionEvent", record, key=key, contracts=contracts, now_us=now_us, skew=skew)
    index = record["step_index"]
    # <= max_steps: a takeover that lasts to the end is ENDED at step_index == the episode's length.
    if not 0 <= index <= contracts.max_steps:
        raise Rejected(Reason.INVALID_VALUE,
                       f"InterventionEvent.step_index {index} of episode {eid!r} outside 0..{contracts.max_steps}")


_VALIDATORS = {"Step": validate_step, "EpisodeEvent": validate_episode_event,
               "InterventionEvent": validate_intervention}


def validate_record(name: str, record: Mapping[str, Any], *, key: bytes | None, contracts: Contracts, now_us: int,
                    skew: SkewWindow) -> None:
    """The validator of record ``name`` (as :func:`schemas.codec.decode` returns it); raises :class:`Rejected`."""
    try:
        check = _VALIDATORS[name]
    except KeyError:
        raise Rejected(Reason.WRONG_TOPIC, f"no validator for a {name!r} record") from None
    check(record, key=key, contracts=contracts, now_us=now_us, skew=skew)


def _key(key: bytes | str | None, eid: str, name: str) -> None:
    if key != eid.encode() and key != eid:  # bytes from faust; a str from tools is fine too
        raise Rejected(Reason.KEY_MISMATCH, f"Kafka key {key!r} is not {name}.episode_id {eid!r}")


def _time(t: int, now_us: int, skew: SkewWindow, name: str, eid: str) -> None:
    if t - now_us > skew.future_us:
        raise Rejected(Reason.CLOCK_SKEW, f"{name}.event_time_us {t} of episode {eid!r} is {(t - now_us) / 1e6:.3f} s "
                                          f"ahead of the processor's clock {now_us} (at most {skew.future_us / 1e6:g} s)")
    if skew.past_us is not None and now_us - t > skew.past_us:
        raise Rejected(Reason.CLOCK_SKEW, f"{name}.event_time_us {t} of episode {eid!r} is {(now_us - t) / 1e6:.3f} s "
                                          f"behind the processor's clock {now_us} (at most {skew.past_us / 1e6:g} s)")


def _contract(task: str, contracts: Contracts, name: str, eid: str) -> TaskContract | None:
    found = contracts.tasks.get(task)
    if found is None and contracts.unknown_tasks is UnknownTasks.REJECT:
        raise Rejected(Reason.INVALID_VALUE, f"{name}.task {task!r} of episode {eid!r} has no contract; known tasks: "
                                             f"{', '.join(sorted(contracts.tasks)) or 'none'}")
    return found


def _dim(field_name: str, values: Sequence[float], expected: int, record: Mapping[str, Any]) -> Rejected:
    return Rejected(Reason.INVALID_VALUE,
                    f"Step.{field_name} has {len(values)} values but task {record['task']!r} declares {expected} "
                    f"(episode {record['episode_id']!r} step {record['step_index']})")


def _finite(field_name: str, values: Sequence[float], record: Mapping[str, Any]) -> None:
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise Rejected(Reason.INVALID_VALUE, f"Step.{field_name}[{i}] is {v} "
                                                 f"(episode {record['episode_id']!r} step {record['step_index']})")


def _images(images: Sequence[Mapping[str, Any]], task: TaskContract | None, contracts: Contracts, eid: str,
            index: int) -> None:
    where = f"episode {eid!r} step {index}"
    if task is not None:
        declared = task.cameras
        encodings = task.encodings
        if len(images) != len(declared) or any(img["camera"] not in declared for img in images) or \
                len({img["camera"] for img in images}) != len(images):
            got = [img["camera"] for img in images]
            missing = sorted(set(declared) - set(got))
            extra = sorted({c for c in got if c not in declared} | {c for c in got if got.count(c) > 1})
            raise Rejected(Reason.INVALID_VALUE, f"Step.images cameras {got} are not the declared {sorted(declared)} "
                                                 f"(missing {missing}, extra or repeated {extra}; {where})")
    else:
        declared = None
        encodings = contracts.encodings
        if len(images) > 1 and len({img["camera"] for img in images}) != len(images):
            raise Rejected(Reason.INVALID_VALUE,
                           f"Step.images repeats a camera: {[img['camera'] for img in images]} ({where})")
    for img in images:
        camera, encoding, w, h = img["camera"], img["encoding"], img["width"], img["height"]
        if encoding not in encodings:
            raise Rejected(Reason.INVALID_VALUE, f"Step.images[{camera!r}].encoding {encoding!r} is not one of "
                                                 f"{sorted(encodings)} ({where})")
        if declared is not None:
            dw, dh = declared[camera]
            if w != dw or h != dh:
                raise Rejected(Reason.INVALID_VALUE, f"Step.images[{camera!r}] is {w}x{h} but the task declares "
                                                     f"{dw}x{dh} (width x height; {where})")
        elif w < 1 or h < 1:
            raise Rejected(Reason.INVALID_VALUE, f"Step.images[{camera!r}] has size {w}x{h} ({where})")
        data = img["data"]
        try:
            rw, rh = jpeg_size(data) if encoding == "jpeg" else png_size(data)
        except BadImage as exc:
            raise Rejected(Reason.INVALID_VALUE, f"Step.images[{camera!r}].data is not a valid {encoding}: {exc} "
                                                 f"({len(data)} bytes; {where})") from None
        if rw != w or rh != h:
            raise Rejected(Reason.INVALID_VALUE, f"Step.images[{camera!r}].data is a {rw}x{rh} {encoding} but the "
                                                 f"record says {w}x{h} (width x height; {where})")
        if contracts.full_image_decode:
            problem = full_decode_problem(data, encoding, w, h)
            if problem:
                raise Rejected(Reason.INVALID_VALUE, f"Step.images[{camera!r}].data does not decode: {problem} ({where})")


# -- identity (Kafka security on) -----------------------------------------------------------------


@dataclass(frozen=True)
class RobotIdentity:
    """A robot principal as the processor knows it: its signing key and the actor ids it may claim
    (exact ids or shell-style patterns, e.g. ``cell-a-*`` for a principal shared by a group of robots)."""

    name: str
    key: bytes = field(repr=False)
    actors: tuple[str, ...]

    def owns(self, actor_id: str) -> bool:
        return any(actor_id == p or (any(c in p for c in "*?[") and fnmatch.fnmatchcase(actor_id, p))
                   for p in self.actors)


def parse_keyring(text: str, *, source: str = "robots.json") -> dict[str, RobotIdentity]:
    """The robots of a keyring file (``{"robots": {name: {"key": base64, "actors": [...]}}}``, what
    `sop robot add` writes); ValueError naming ``source`` and the robot."""
    try:
        robots = json.loads(text)["robots"]
        if not isinstance(robots, dict):
            raise TypeError(f"robots is a {type(robots).__name__}")
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{source} is not a robot keyring: {exc}") from None
    out = {}
    for name, entry in robots.items():
        try:
            actors = entry.get("actors") or [name]
            if not all(isinstance(a, str) and a for a in actors):
                raise ValueError(f"actors must be non-empty strings, got {actors!r}")
            out[name] = RobotIdentity(name=name, key=decode_key(entry["key"]), actors=tuple(actors))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: robot {name!r}: {exc}") from None
    return out


def check_identity(record: Mapping[str, Any], *, topic: str, key: bytes | str | None, value: bytes,
                   headers: Any, identities: Mapping[str, RobotIdentity]) -> str:
    """The producing principal of an event, or :class:`Rejected` (``IDENTITY_MISMATCH``) when the event is not
    signed, is signed by an unknown (or revoked) robot, carries a signature that does not verify, or claims an
    ``actor_id`` that is not one of its principal's.

    >>> check_identity(step, topic="sop.steps", key=b"ep-1", value=data, headers=msg.headers, identities=keyring)
    'robot-17'
    """
    found = header_values(headers)
    actor = record.get("actor_id")
    where = f"{topic} episode {record.get('episode_id')!r} actor {actor!r}"
    principal_raw, sig = found.get(HEADER_PRINCIPAL), found.get(HEADER_SIGNATURE)
    if not principal_raw or not sig:
        raise Rejected(Reason.IDENTITY_MISMATCH, f"unsigned event ({where}): with Kafka security on every robot signs "
                                                 f"its events ({HEADER_PRINCIPAL} and {HEADER_SIGNATURE} headers)")
    principal = principal_raw.decode(errors="replace")
    robot = identities.get(principal)
    if robot is None:
        raise Rejected(Reason.IDENTITY_MISMATCH, f"event signed as {principal!r}, which is not a robot the processor "
                                                 f"knows (never added, or revoked; {where})")
    if not verify_signature(robot.key, principal=principal, topic=topic, kafka_key=key, value=value, signature=sig):
        raise Rejected(Reason.IDENTITY_MISMATCH, f"the signature of {principal!r} does not verify ({where}): not "
                                                 "produced with that robot's key, or altered since")
    if not isinstance(actor, str) or not robot.owns(actor):
        raise Rejected(Reason.IDENTITY_MISMATCH, f"principal {principal!r} may produce for actors "
                                                 f"{list(robot.actors)}, not {actor!r} ({where})")
    return principal


# -- image structure ------------------------------------------------------------------------------


def full_decode_problem(data: bytes, encoding: str, width: int, height: int) -> str | None:
    """Decode the image fully with PIL; a description of what is wrong, or None when it decodes to ``width x height``."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as pil:
            if pil.format != {"jpeg": "JPEG", "png": "PNG"}[encoding]:
                return f"PIL reads it as {pil.format}, not {encoding}"
            pil.load()
            if pil.size != (width, height):
                return f"decodes to {pil.size[0]}x{pil.size[1]}, not {width}x{height}"
    except Exception as exc:  # PIL raises many types on garbage (OSError, SyntaxError, ValueError, struct.error ...)
        return f"{type(exc).__name__}: {exc}"
    return None


# -- contracts from settings ----------------------------------------------------------------------


def parse_task_contracts(value: str, *, setting: str = SETTING) -> dict[str, TaskContract]:
    """Task contracts from JSON text, or from the path of a JSON file; ValueError names ``setting`` and the problem.

    The JSON maps task name to contract; a camera's size is ``[width, height]`` or ``{"width": W, "height": H}``::

        {"pick-place-v3": {"action_dim": 4, "proprio_dim": 39, "cameras": {"corner": [64, 64]},
                           "encodings": ["jpeg", "png"]}}       # encodings optional (default: jpeg and png)
    """
    text = value.strip()
    source = "JSON text"
    if not text.startswith(("{", "[")):
        path = Path(text).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"{setting}: neither JSON text (starting with {{ or [) nor a readable file: {exc}") from None
        source = f"file {path}"
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{setting}: {source} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{setting}: {source} must be a JSON object of task name -> contract, got {type(raw).__name__}")
    out: dict[str, TaskContract] = {}
    allowed = {"action_dim", "proprio_dim", "cameras", "encodings"}
    for task, spec in raw.items():
        where = f"{setting}: task {task!r} in {source}"
        if not isinstance(spec, dict):
            raise ValueError(f"{where} must be an object with {sorted(allowed)}, got {spec!r}")
        extra = sorted(set(spec) - allowed)
        missing = sorted({"action_dim", "proprio_dim", "cameras"} - set(spec))
        if extra or missing:
            raise ValueError(f"{where}: unknown keys {extra}, missing keys {missing}")
        cameras = spec["cameras"]
        if not isinstance(cameras, dict):
            raise ValueError(f"{where}: cameras must map camera name -> [width, height], got {cameras!r}")
        sizes: dict[str, tuple[int, int]] = {}
        for camera, size in cameras.items():
            if isinstance(size, dict) and set(size) == {"width", "height"}:
                size = [size["width"], size["height"]]
            if not (isinstance(size, list) and len(size) == 2 and all(type(v) is int for v in size)):
                raise ValueError(f"{where}: camera {camera!r} needs [width, height] integers, got {size!r}")
            sizes[camera] = (size[0], size[1])
        dims = (spec["action_dim"], spec["proprio_dim"])
        if not all(type(v) is int for v in dims):
            raise ValueError(f"{where}: action_dim and proprio_dim must be integers, got {dims}")
        encodings = spec.get("encodings", sorted(DEFAULT_ENCODINGS))
        if not (isinstance(encodings, list) and all(isinstance(e, str) for e in encodings)):
            raise ValueError(f"{where}: encodings must be a list of names, got {encodings!r}")
        try:
            out[task] = TaskContract(action_dim=dims[0], proprio_dim=dims[1], cameras=sizes,
                                     encodings=frozenset(encodings))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return out


def task_contracts_json(tasks: Mapping[str, TaskContract]) -> str:
    """The JSON text :func:`parse_task_contracts` reads back (e.g. for ``SOP_PROCESSOR_TASK_CONTRACTS`` of a child)."""
    return json.dumps({name: {"action_dim": c.action_dim, "proprio_dim": c.proprio_dim,
                              "cameras": {cam: list(size) for cam, size in c.cameras.items()},
                              "encodings": sorted(c.encodings)} for name, c in tasks.items()}, sort_keys=True)
