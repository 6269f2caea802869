"""`sop replay publish`: stored rows go back onto the topics with the policy version as the events carry it
(text), whether the table stores it as a number (current) or as text (written before)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lakehouse import STEPS, Lakehouse, query
from learner.synthetic import synthetic_episode
from schemas import codec
from schemas.images import jpeg_pool
from sop.commands.replay import publish_episodes
from tests.old_tables import create_old, write_old


class Collect:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict]] = []

    def publish(self, record_name: str, record: dict, *, key: str) -> None:
        codec.decode(codec.encode(record_name, record))  # what a publisher would put on the wire
        self.records.append((record_name, record))


def _rows(lake: Lakehouse) -> list[dict]:
    return query(lake, "SELECT * FROM steps ORDER BY episode_id, step_index").to_pylist()


def test_versions_go_back_as_text_from_new_and_old_tables(tmp_path: Path) -> None:
    rng, frames = np.random.default_rng(0), jpeg_pool(2, 16, 0)
    episode = synthetic_episode("reach-v3", 3, rng, episode_id="e", demo=False, frames=frames, image_size=16,
                                policy_version="12")
    new, old = Lakehouse(tmp_path / "new"), Lakehouse(tmp_path / "old")
    new.writer("steps", app_id_prefix="t").write(episode)
    create_old(old, STEPS)
    write_old(old, STEPS, episode)
    for lake in (new, old):
        rows = _rows(lake)
        assert rows[0]["policy_version"] == 12  # read as a number either way
        sink = Collect()
        publish_episodes(rows, sink, keep_ids=True)
        assert [(name, rec["policy_version"]) for name, rec in sink.records] == \
            [("EpisodeEvent", "12")] + [("Step", "12")] * 3 + [("EpisodeEvent", "12")]
