"""Delta -> sampler: the newest whole episodes at start, then only new commits, images still compressed."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import HashEmbedder

from lakehouse import Lakehouse
from learner.algorithms import HGDagger
from learner.batch import BatchBuilder
from learner.config import ConfigError, EncoderConfig, SamplerConfig
from learner.feeder import DeltaFeeder, FeederConfig, in_shard, is_whole, newest_episodes
from learner.sampler import AdaptiveSampler
from learner.synthetic import synthetic_episode, write_rows
from schemas.images import jpeg_pool

ENC = EncoderConfig(image_size=32, proprio_dim=39, cnn_channels=(16, 32))
FRAMES = jpeg_pool(4, 32)


def episode(task: str, eid: str, *, demo: bool, length: int = 12, t0_us: int = 0, human: range = range(3, 6)
            ) -> list[dict]:
    rng = np.random.default_rng(abs(hash(eid)) % 1000)
    return synthetic_episode(task, length, rng, episode_id=eid, demo=demo, frames=FRAMES, human_steps=human,
                             image_size=32, t0_us=1_795_000_000_000_000 + t0_us)


def make_sampler(*, online_capacity: int = 1000, accept: object = None) -> AdaptiveSampler:
    build = BatchBuilder(ENC, HashEmbedder(), chunk=1, action_dim=4)
    return AdaptiveSampler(SamplerConfig(batch_size=8, online_capacity=online_capacity), build,
                           accept=accept)  # type: ignore[arg-type]


@pytest.fixture
def lake(tmp_path: Path) -> Lakehouse:
    return Lakehouse(tmp_path / "lake")


def test_initial_load_then_only_new_commits(lake: Lakehouse) -> None:
    write_rows(lake, "demonstrations", episode("drawer-open-v3", "d0", demo=True))
    v_steps = write_rows(lake, "steps", episode("drawer-open-v3", "o0", demo=False))
    sampler = make_sampler()
    feeder = DeltaFeeder(lake, sampler, FeederConfig())
    versions = feeder.load_initial()
    assert versions == {"demonstrations": 0 + 1, "steps": v_steps}
    assert sampler.sizes() == {"drawer-open-v3": {"online": 12, "offline": 12}}
    assert feeder.poll_once() == 0  # nothing new

    v2 = write_rows(lake, "steps", episode("box-close-v3", "o1", demo=False, t0_us=10**6)
                    + episode("drawer-open-v3", "o2", demo=False, t0_us=2 * 10**6))
    assert feeder.poll_once() == 2
    assert feeder.versions()["steps"] == v2
    assert sampler.sizes()["box-close-v3"] == {"online": 12, "offline": 0}
    assert feeder.stats().tables["steps"].episodes_added == 3
    rows, _ = sampler.sample_rows(32)
    row = rows[0]
    assert isinstance(row["images"][0]["data"], bytes)  # decoded only when a batch is built
    assert row["normalised_return"] == row["mc_return"] and -1.0 <= row["mc_return"] <= 0.0


def test_an_episode_is_added_only_once_all_its_rows_are_there(lake: Lakehouse) -> None:
    write_rows(lake, "demonstrations", episode("drawer-open-v3", "d0", demo=True))
    sampler = make_sampler()
    feeder = DeltaFeeder(lake, sampler, FeederConfig(incomplete_patience_polls=5))
    feeder.load_initial()
    rows = episode("drawer-open-v3", "late", demo=False)
    write_rows(lake, "steps", rows[:7])
    assert feeder.poll_once() == 0
    assert sampler.sizes()["drawer-open-v3"]["online"] == 0
    write_rows(lake, "steps", rows[7:])
    assert feeder.poll_once() == 1
    assert sampler.sizes()["drawer-open-v3"]["online"] == 12
    write_rows(lake, "steps", episode("drawer-open-v3", "never-finished", demo=False)[:3])
    for _ in range(6):
        feeder.poll_once()
    assert feeder.stats().tables["steps"].incomplete_dropped == 1


def test_the_algorithm_decides_which_online_rows_are_kept(lake: Lakehouse) -> None:
    write_rows(lake, "steps", episode("drawer-open-v3", "o0", demo=False, human=range(2, 5)))
    sampler = make_sampler(accept=HGDagger().accepts)
    feeder = DeltaFeeder(lake, sampler, FeederConfig(tables=("steps",)))
    feeder.load_initial()
    assert sampler.sizes()["drawer-open-v3"]["online"] == 3  # only the human-controlled steps are labels
    assert feeder.stats().tables["steps"].rows_added == 3


def test_initial_load_keeps_the_newest_episodes_that_fit(lake: Lakehouse) -> None:
    write_rows(lake, "steps", [r for i in range(5)
                               for r in episode("drawer-open-v3", f"o{i}", demo=False, t0_us=i * 10**6)])
    sampler = make_sampler(online_capacity=30)
    DeltaFeeder(lake, sampler, FeederConfig(tables=("steps",))).load_initial()
    kept = {r["episode_id"] for r in sampler._buffers["drawer-open-v3"]["online"].items()}
    assert kept == {"o3", "o4"}


def test_a_table_that_appears_later_is_read_from_its_start(lake: Lakehouse) -> None:
    sampler = make_sampler()
    feeder = DeltaFeeder(lake, sampler, FeederConfig())
    assert feeder.load_initial() == {"demonstrations": None, "steps": None}
    write_rows(lake, "demonstrations", episode("box-close-v3", "d0", demo=True))
    assert feeder.poll_once() == 1
    assert sampler.sizes()["box-close-v3"]["offline"] == 12


def test_newest_episodes_and_whole_checks() -> None:
    light = pa.table({"task": ["a"] * 5 + ["b"], "episode_id": ["x", "x", "y", "y", "y", "z"],
                      "step_index": [0, 1, 0, 1, 2, 0], "event_time_us": [1, 2, 5, 6, 7, 3],
                      "episode_length": [2, 2, 4, 4, 4, 1]})
    assert newest_episodes(light, 10, whole_only=False) == {"a": ["y", "x"], "b": ["z"]}
    assert newest_episodes(light, 10, whole_only=True) == {"a": ["x"], "b": ["z"]}  # y has 3 of its 4 steps
    assert newest_episodes(light, 2, whole_only=False) == {"a": ["y"], "b": ["z"]}  # at least one per task
    assert is_whole([{"episode_length": 2, "step_index": 0}, {"episode_length": 2, "step_index": 1}])
    assert not is_whole([{"episode_length": 2, "step_index": 0}, {"episode_length": 2, "step_index": 0}])


def test_shards_split_the_episodes() -> None:
    ids = [f"e{i}" for i in range(200)]
    shares = [sum(in_shard(e, (r, 3)) for e in ids) for r in range(3)]
    assert sum(shares) == 200 and min(shares) > 40
    assert all(in_shard(e, None) and in_shard(e, (0, 1)) for e in ids)


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="tables"):
        FeederConfig(tables=("interventions",))
    with pytest.raises(ConfigError, match="shard"):
        FeederConfig(shard=(2, 2))


def test_a_lake_written_before_versions_were_numbers_feeds_the_learner_across_its_migration(lake: Lakehouse) -> None:
    from lakehouse import DEMONSTRATIONS, STEPS
    from tests.old_tables import create_old, write_old

    create_old(lake, DEMONSTRATIONS)
    create_old(lake, STEPS)
    write_old(lake, DEMONSTRATIONS, episode("drawer-open-v3", "d0", demo=True))
    write_old(lake, STEPS, episode("drawer-open-v3", "o0", demo=False))
    sampler = make_sampler()
    feeder = DeltaFeeder(lake, sampler, FeederConfig())
    feeder.load_initial()  # reads the old tables as they are
    assert sampler.sizes() == {"drawer-open-v3": {"online": 12, "offline": 12}}
    write_old(lake, STEPS, episode("drawer-open-v3", "o1", demo=False, t0_us=10**6))  # the old processor, still on
    # the upgraded processor: migrates the table (a rewrite of every row), then appends
    write_rows(lake, "steps", episode("drawer-open-v3", "o2", demo=False, t0_us=2 * 10**6), app_id_prefix="new")
    assert feeder.poll_once() == 2  # o1 and o2, each once: the rewrite of o0 and o1 is not new data
    assert sampler.sizes()["drawer-open-v3"]["online"] == 36
    assert feeder.poll_once() == 0
