"""Poisoned rows in real Delta tables: every kind is quarantined and counted, none reaches a batch, nothing crashes.

The rows are planted in ``demonstrations`` and ``steps``, some before the feeder's first load and some in a
later commit its poll picks up; a prefetch thread builds batches and the learner trains on them.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lakehouse import Lakehouse
from learner import quarantine as q
from learner.algorithms import make_algorithm
from learner.batch import Batch, BatchBuilder, Row
from learner.config import EncoderConfig, ModelConfig, RecapConfig, SamplerConfig, TrainConfig
from learner.feeder import DeltaFeeder, FeederConfig
from learner.model import VLAPolicy
from learner.sampler import AdaptiveSampler, Prefetcher
from learner.synthetic import HashEmbedder, synthetic_episode, write_rows
from learner.trainer import Learner
from schemas.images import jpeg_pool

SIZE = 16
ENC = EncoderConfig(image_size=SIZE, proprio_dim=39, cnn_channels=(8, 16))
MODEL = ModelConfig(encoder=ENC, action_dim=4, hidden=(32,))
FRAMES = jpeg_pool(4, SIZE)
BIG_FRAME = jpeg_pool(1, 2 * SIZE, seed=3)[0]
NAN, INF = float("nan"), float("inf")


def _image(row: dict[str, Any], **changes: Any) -> None:
    row["images"] = [{**row["images"][0], **changes}]


# reason -> how a healthy row is broken into one with that reason
POISONS: dict[str, Any] = {
    q.IMAGE_UNDECODABLE: lambda r: _image(r, data=b"\xff\xd8 this is not a jpeg"),
    q.MISSING_CAMERA: lambda r: _image(r, camera="wrist"),
    q.IMAGE_SIZE: lambda r: _image(r, data=BIG_FRAME, width=SIZE, height=SIZE),  # bytes larger than declared
    q.PROPRIO_LENGTH: lambda r: r.update(proprio=r["proprio"][:-1]),
    q.ACTION_LENGTH: lambda r: r.update(action=r["action"][:3]),
    q.PROPRIO_NON_FINITE: lambda r: r.update(proprio=[NAN, *r["proprio"][1:]]),
    q.ACTION_NON_FINITE: lambda r: r.update(action=[INF, *r["action"][1:]]),
    q.POLICY_ACTION_NON_FINITE: lambda r: r.update(policy_action=[*r["policy_action"][:-1], NAN]),
    q.REWARD_NON_FINITE: lambda r: r.update(reward=NAN),
    q.ADVANTAGE_NON_FINITE: lambda r: r.update(advantage=-INF),
    q.RETURN_NON_FINITE: lambda r: r.update(mc_return=NAN),
}


def truncate(row: dict[str, Any]) -> None:
    """A JPEG whose header is intact but whose scan data was cut: only a full decode finds it."""
    data = row["images"][0]["data"]
    _image(row, data=data[: len(data) - 40])


def episode(task: str, eid: str, *, demo: bool, seed: int, length: int = 14) -> list[dict[str, Any]]:
    return synthetic_episode(task, length, np.random.default_rng(seed), episode_id=eid, demo=demo, frames=FRAMES,
                             human_steps=range(4, 8), image_size=SIZE, t0_us=1_795_000_000_000_000 + seed * 10**6)


def poisoned_episode(task: str, eid: str, *, demo: bool, seed: int, kinds: Sequence[str],
                     truncated: int = 0) -> tuple[list[dict[str, Any]], set[tuple[str, int]]]:
    """An episode with one row per poison of ``kinds`` (advantage poisons skip demonstrations, which have
    none) and ``truncated`` rows with a cut JPEG; returns the rows and the (episode, step) of the bad ones."""
    rows = episode(task, eid, demo=demo, seed=seed, length=len(kinds) + truncated + 4)
    bad: set[tuple[str, int]] = set()
    for i, kind in enumerate(kinds):
        POISONS[kind](rows[2 + i])
        bad.add((eid, rows[2 + i]["step_index"]))
    for j in range(truncated):
        row = rows[2 + len(kinds) + j]
        truncate(row)
        bad.add((eid, row["step_index"]))
    return rows, bad


class RecordingBuilder:
    """The real batch builder, remembering which rows went into the batches it built."""

    def __init__(self, build: BatchBuilder) -> None:
        self._build = build
        self.seen: set[tuple[str, int]] = set()

    def __call__(self, rows: Sequence[Row], online: Sequence[bool]) -> Batch:
        batch = self._build(rows, online)
        self.seen.update((str(r["episode_id"]), int(r["step_index"])) for r in rows)
        return batch


def test_every_kind_of_poisoned_row_is_quarantined_and_counted(tmp_path: Path) -> None:
    lake = Lakehouse(tmp_path / "lake")
    all_kinds = list(POISONS)
    online_kinds = all_kinds
    demo_kinds = [k for k in all_kinds if k != q.ADVANTAGE_NON_FINITE]  # demonstrations store no advantage
    bad: set[tuple[str, int]] = set()
    planted: dict[str, int] = {}

    def plant(kinds: Sequence[str], truncated: int) -> None:
        for k in kinds:
            planted[k] = planted.get(k, 0) + 1
        if truncated:
            planted[q.IMAGE_UNDECODABLE] = planted.get(q.IMAGE_UNDECODABLE, 0) + truncated

    # Before the first load: healthy and poisoned episodes in both tables.
    demos, b = poisoned_episode("drawer-open-v3", "demo-bad", demo=True, seed=1, kinds=demo_kinds, truncated=1)
    bad |= b
    plant(demo_kinds, 1)
    online, b = poisoned_episode("drawer-open-v3", "online-bad", demo=False, seed=2, kinds=online_kinds, truncated=1)
    bad |= b
    plant(online_kinds, 1)
    write_rows(lake, "demonstrations", episode("drawer-open-v3", "demo-ok", demo=True, seed=3) + demos
               + episode("box-close-v3", "demo-ok2", demo=True, seed=4))
    write_rows(lake, "steps", episode("drawer-open-v3", "online-ok", demo=False, seed=5) + online)

    builder = RecordingBuilder(BatchBuilder(ENC, HashEmbedder(), chunk=MODEL.chunk, action_dim=MODEL.action_dim))
    algorithm = make_algorithm("recap", RecapConfig())  # RECAP keeps every online row, so all can be sampled
    sampler = AdaptiveSampler(SamplerConfig(batch_size=16, seed=7), builder, chunk=MODEL.chunk,
                              accept=algorithm.accepts, spec=q.RowSpec.for_policy(MODEL))
    feeder = DeltaFeeder(lake, sampler, FeederConfig())
    feeder.load_initial()

    # A later commit, read by a poll.
    late, b = poisoned_episode("box-close-v3", "online-late", demo=False, seed=6, kinds=online_kinds, truncated=1)
    bad |= b
    plant(online_kinds, 1)
    write_rows(lake, "steps", late)
    assert feeder.poll_once() == 1

    torch.manual_seed(0)
    model = VLAPolicy(MODEL)
    with Prefetcher(sampler, depth=2) as batches:
        learner = Learner(model, algorithm, batches, TrainConfig(algorithm="recap", publish_every=10**6),
                          feedback=sampler)
        losses = learner.run(8)
        assert batches._thread.is_alive()  # the prefetch thread kept going
    # Cut JPEGs are found only when a batch decodes them: sample until every one was met (seeded, so this
    # is the same sequence each run; the bound only keeps a regression from looping for ever).
    for _ in range(500):
        if sampler.quarantine.counts().get(q.IMAGE_UNDECODABLE, 0) >= planted[q.IMAGE_UNDECODABLE]:
            break
        sampler.next_batch()

    assert sampler.quarantine.counts() == planted
    assert sampler.quarantine.total == len(bad)
    assert not builder.seen & bad, "a poisoned row reached a batch"
    assert builder.seen, "no batch was built"
    assert all(np.isfinite(losses))
    assert learner.skipped_steps == 0
    assert all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())
    buffered = {(str(r["episode_id"]), int(r["step_index"])) for bufs in sampler._buffers.values()
                for buf in bufs.values() for r in buf.items()}
    assert not buffered & bad
    assert feeder.stats().errors == 0
    metrics = sampler.quarantine.metrics()
    assert metrics["quarantined"] == len(bad)
    assert metrics[f"quarantined/{q.PROPRIO_NON_FINITE}"] == 3


def test_a_flood_of_bad_rows_logs_a_few_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lake = Lakehouse(tmp_path / "lake")
    rows = episode("drawer-open-v3", "flood", demo=True, seed=1, length=200)
    for row in rows[1:]:
        POISONS[q.PROPRIO_NON_FINITE](row)
    write_rows(lake, "demonstrations", rows)
    sampler = AdaptiveSampler(SamplerConfig(batch_size=4),
                              BatchBuilder(ENC, HashEmbedder(), chunk=1, action_dim=4), spec=q.RowSpec.for_policy(MODEL))
    with caplog.at_level("WARNING", logger="sop.learner.quarantine"):
        DeltaFeeder(lake, sampler, FeederConfig()).load_initial()
    assert sampler.quarantine.counts() == {q.PROPRIO_NON_FINITE: 199}
    lines = [r for r in caplog.records if r.name == "sop.learner.quarantine"]
    assert 1 <= len(lines) <= 6  # the first five, then at most one summary a minute
    assert "episode flood step 1" in lines[0].getMessage() and q.PROPRIO_NON_FINITE in lines[0].getMessage()
    assert sampler.sizes()["drawer-open-v3"]["offline"] == 1
    assert sampler.next_batch().size == 4
