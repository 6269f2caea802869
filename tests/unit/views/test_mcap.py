"""An episode written as MCAP and read back with the mcap reader (protobuf decoded by mcap-protobuf-support)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from mcap.decoder import DecoderFactory as McapDecoderFactory
from mcap.reader import make_reader
from mcap.records import Schema
from mcap_protobuf.decoder import DecoderFactory
from view_samples import DEMO, ONLINE, TAKEOVER

from lakehouse import Lakehouse
from views import load_episodes, write_mcap


class JsonDecoder(McapDecoderFactory):
    def decoder_for(self, message_encoding: str, schema: Schema | None):  # noqa: ANN201
        return json.loads if message_encoding == "json" else None


def read_back(path: Path) -> tuple[dict[str, list], dict[str, str], dict[str, str]]:
    """topic -> [(log time ns, decoded message)], topic -> schema name, the 'episode' metadata."""
    messages: dict[str, list] = defaultdict(list)
    schemas: dict[str, str] = {}
    with path.open("rb") as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory(), JsonDecoder()])
        for schema, channel, message, decoded in reader.iter_decoded_messages(log_time_order=True):
            schemas[channel.topic] = f"{schema.encoding}:{schema.name}"
            messages[channel.topic].append((message.log_time, decoded))
        f.seek(0)
        metadata = {m.name: m.metadata for m in make_reader(f).iter_metadata()}
    return messages, schemas, metadata["episode"]


def test_every_step_camera_and_takeover_is_in_the_file(sample_lake: Lakehouse, tmp_path: Path) -> None:
    (episode,) = load_episodes(sample_lake, [ONLINE])
    messages, schemas, meta = read_back(write_mcap(episode, tmp_path / "e.mcap"))
    assert schemas["/camera/corner"] == "protobuf:foxglove.CompressedImage"
    assert schemas["/events"] == "protobuf:foxglove.Log"
    assert schemas["/robot/action"] == "jsonschema:sop.RobotAction"
    assert meta["task"] == "drawer-open-v3" and meta["outcome"] == "SUCCESS" and meta["num_steps"] == "30"

    for camera in ("corner", "wrist"):
        images = messages[f"/camera/{camera}"]
        assert len(images) == 30
        t, image = images[4]
        stored = next(i for i in episode.steps[4]["images"] if i["camera"] == camera)
        assert image.data == stored["data"] and image.format == "jpeg" and image.frame_id == camera
        assert t == stored["capture_time_us"] * 1000
        assert image.timestamp.ToNanoseconds() == t

    actions = [m for _, m in messages["/robot/action"]]
    assert [a["step_index"] for a in actions] == list(range(30))
    assert [a["human"] for a in actions] == [i in range(*TAKEOVER) for i in range(30)]
    assert actions[10]["executed"] == episode.steps[10]["action"] and actions[10]["proposed"] == episode.steps[10]["policy_action"]
    assert [t for t, _ in messages["/robot/action"]] == [s["event_time_us"] * 1000 for s in episode.steps]
    assert [m["proprio"] for _, m in messages["/robot/state"]] == [s["proprio"] for s in episode.steps]
    rewards = [m for _, m in messages["/rewards"]]
    assert [r["advantage"] for r in rewards] == [s["advantage"] for s in episode.steps]

    assert [(m["kind"], m["step_index"], m["operator_id"]) for _, m in messages["/interventions"]] == [
        ("STARTED", TAKEOVER[0], "teleop-anna"), ("ENDED", TAKEOVER[1], "teleop-anna")]
    logs = [m.message for _, m in messages["/events"]]
    assert logs == ["policy version 3", "takeover by teleop-anna: divergence", "handed back: on-track",
                    "episode ended: SUCCESS"]
    assert messages["/episode"][0][1]["num_interventions"] == 1


def test_a_demonstration_has_no_interventions_topic(sample_lake: Lakehouse, tmp_path: Path) -> None:
    (episode,) = load_episodes(sample_lake, [DEMO])
    messages, _, meta = read_back(write_mcap(episode, tmp_path / "d.mcap", compression="lz4"))
    assert "/interventions" not in messages and "/camera/wrist" not in messages
    assert len(messages["/camera/corner"]) == 10 and meta["table"] == "demonstrations"
    assert all(m["human"] for _, m in messages["/robot/action"])
