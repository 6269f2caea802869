"""An episode as an MCAP file for Foxglove: camera images with Foxglove's own protobuf schema, the robot's
numbers as JSON with JSON schemas, the takeovers as their own topic.

    write_mcap(episode, "episode.mcap")       # then open the file in Foxglove

Topics (log time = when the step was executed, or when the frame was exposed for images that carry it):

``/camera/<name>``    ``foxglove.CompressedImage`` (protobuf): the JPEG/PNG bytes as stored, ``frame_id`` = camera
``/robot/state``      ``sop.RobotState`` (JSON): step index, proprio vector, controller
``/robot/action``     ``sop.RobotAction`` (JSON): executed action, the policy's proposal, who drove
``/rewards``          ``sop.StepRewards`` (JSON): reward, mc_return, value, advantage, success
``/interventions``    ``sop.Intervention`` (JSON): one message per STARTED / ENDED event (operator, reason)
``/events``           ``foxglove.Log`` (protobuf): takeovers, hand-backs, policy version, the outcome (Log panel)
``/episode``          ``sop.Episode`` (JSON): the episode's summary, once at its start

Images use protobuf because JSON would carry the bytes as base64 (a third larger, decoded in the viewer);
the numbers use JSON so that every field is plottable in Foxglove's Plot panel by name
(``/robot/action.executed[0]``) without a compiled schema. The summary is also an MCAP metadata record.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from datetime import date, datetime
from pathlib import Path
from typing import Any

from foxglove_schemas_protobuf.CompressedImage_pb2 import CompressedImage
from foxglove_schemas_protobuf.Log_pb2 import Log
from mcap.well_known import MessageEncoding, SchemaEncoding
from mcap.writer import CompressionType, Writer
from mcap_protobuf.schema import register_schema

from views.episodes import Episode

PROFILE = ""  # not a ROS profile: the messages are protobuf and JSON (see the module doc)
NUMBER = {"type": "number"}
NUMBERS = {"type": "array", "items": NUMBER}
OPTIONAL_NUMBER = {"type": ["number", "null"]}
SCHEMAS: Mapping[str, dict[str, Any]] = {
    "sop.RobotState": {"type": "object", "properties": {
        "step_index": {"type": "integer"}, "proprio": NUMBERS, "controller": {"type": "string"}}},
    "sop.RobotAction": {"type": "object", "properties": {
        "step_index": {"type": "integer"}, "executed": NUMBERS, "proposed": {"type": ["array", "null"], "items": NUMBER},
        "controller": {"type": "string"}, "human": {"type": "boolean"},
        "policy_version": {"type": ["integer", "null"]}, "policy_version_text": {"type": "string"}}},
    "sop.StepRewards": {"type": "object", "properties": {
        "step_index": {"type": "integer"}, "reward": NUMBER, "mc_return": NUMBER, "value": OPTIONAL_NUMBER,
        "advantage": OPTIONAL_NUMBER, "advantage_source": {"type": ["string", "null"]}, "success": {"type": "boolean"}}},
    "sop.Intervention": {"type": "object", "properties": {
        "kind": {"type": "string", "enum": ["STARTED", "ENDED"]}, "step_index": {"type": "integer"},
        "operator_id": {"type": "string"}, "reason": {"type": "string"}}},
    "sop.Episode": {"type": "object"},
}
TOPIC_SCHEMA = {"/robot/state": "sop.RobotState", "/robot/action": "sop.RobotAction", "/rewards": "sop.StepRewards",
                "/interventions": "sop.Intervention", "/episode": "sop.Episode"}


def _ns(us: int) -> int:
    return int(us) * 1000


def _stamp(us: int) -> dict[str, int]:
    return {"seconds": int(us) // 1_000_000, "nanos": (int(us) % 1_000_000) * 1000}


def _plain(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class _Channels:
    def __init__(self, writer: Writer) -> None:
        self.writer = writer
        self.ids: dict[str, int] = {}
        self.sequence: dict[str, int] = {}
        self.json_schemas: dict[str, int] = {}
        self.proto_schemas: dict[str, int] = {}

    def _channel(self, topic: str, schema_id: int, encoding: str) -> int:
        if topic not in self.ids:
            self.ids[topic] = self.writer.register_channel(topic=topic, message_encoding=encoding, schema_id=schema_id)
        return self.ids[topic]

    def _put(self, topic: str, channel: int, data: bytes, time_us: int) -> None:
        seq = self.sequence.get(topic, 0)
        self.sequence[topic] = seq + 1
        self.writer.add_message(channel_id=channel, log_time=_ns(time_us), publish_time=_ns(time_us), data=data,
                                sequence=seq)

    def json(self, topic: str, message: Mapping[str, Any], time_us: int) -> None:
        name = TOPIC_SCHEMA[topic]
        if name not in self.json_schemas:
            self.json_schemas[name] = self.writer.register_schema(
                name=name, encoding=SchemaEncoding.JSONSchema, data=json.dumps(SCHEMAS[name]).encode())
        channel = self._channel(topic, self.json_schemas[name], MessageEncoding.JSON)
        self._put(topic, channel, json.dumps({k: _plain(v) for k, v in message.items()}).encode(), time_us)

    def proto(self, topic: str, message: Any, time_us: int) -> None:
        name = type(message).DESCRIPTOR.full_name
        if name not in self.proto_schemas:
            self.proto_schemas[name] = register_schema(self.writer, type(message))
        channel = self._channel(topic, self.proto_schemas[name], MessageEncoding.Protobuf)
        self._put(topic, channel, message.SerializeToString(), time_us)


def _log(channels: _Channels, time_us: int, level: int, text: str) -> None:
    channels.proto("/events", Log(timestamp=_stamp(time_us), level=level, message=text, name="sop"), time_us)


def write_mcap(episode: Episode, path: str | Path, *, compression: str = "zstd",
               progress: Callable[[int], None] | None = None) -> Path:
    """Write ``episode`` to ``path`` (see the module doc for its topics); ``compression``: zstd | lz4 | none."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    kind = {"zstd": CompressionType.ZSTD, "lz4": CompressionType.LZ4, "none": CompressionType.NONE}[compression]
    with out.open("wb") as stream:
        writer = Writer(stream, compression=kind)
        writer.start(profile=PROFILE, library="sop export mcap")
        channels = _Channels(writer)
        first_us = int(episode.time_us[0])
        summary = {k: _plain(v) for k, v in (episode.summary or {}).items()}
        about = {"episode_id": episode.episode_id, "table": episode.table, "task": episode.task,
                 "instruction": episode.instruction, "actor_id": episode.actor_id, "outcome": episode.outcome,
                 "num_steps": episode.num_steps, "cameras": episode.cameras,
                 "policy_versions": [v for _, v in episode.policy_versions()], **summary}
        channels.json("/episode", about, first_us)
        writer.add_metadata("episode", {k: v if isinstance(v, str) else json.dumps(v) for k, v in about.items()})

        # messages in log-time order within each topic; images may be exposed a little before their step
        version = None
        for n, step in enumerate(episode.steps):
            t = int(step["event_time_us"])
            for image in step["images"] or ():
                when = int(image.get("capture_time_us") or t)
                channels.proto(f"/camera/{image['camera']}", CompressedImage(
                    timestamp=_stamp(when), frame_id=image["camera"], data=image["data"],
                    format=str(image["encoding"]).lower()), when)
            human = step["controller"] == "HUMAN"
            channels.json("/robot/state", {"step_index": step["step_index"], "proprio": step["proprio"],
                                           "controller": step["controller"]}, t)
            channels.json("/robot/action", {"step_index": step["step_index"], "executed": step["action"],
                                            "proposed": step["policy_action"], "controller": step["controller"],
                                            "human": human, "policy_version": step["policy_version"],
                                            "policy_version_text": step["policy_version_text"]}, t)
            channels.json("/rewards", {k: step[k] for k in ("step_index", "reward", "mc_return", "value", "advantage",
                                                            "advantage_source", "success")}, t)
            if step["policy_version_text"] != version:
                version = step["policy_version_text"]
                _log(channels, t, Log.Level.INFO, f"policy version {version}")
            if progress is not None:
                progress(n + 1)
        for row in episode.interventions:
            channels.json("/interventions", {k: row[k] for k in ("kind", "step_index", "operator_id", "reason")},
                          int(row["event_time_us"]))
        for span in episode.takeovers():
            _log(channels, span.start_time_us, Log.Level.WARNING, f"takeover by {span.operator_id}: {span.reason}")
            if span.end_reason is not None and span.end_time_us is not None:
                _log(channels, span.end_time_us, Log.Level.INFO, f"handed back: {span.end_reason}")
        _log(channels, int(episode.time_us[-1]), Log.Level.INFO if episode.outcome == "SUCCESS" else Log.Level.WARNING,
             f"episode ended: {episode.outcome}")
        writer.finish()
    return out
