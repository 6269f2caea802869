from collections import Counter

import pytest

from producers.loadgen import LoadGenConfig, iter_fleet
from schemas import codec


def test_streams_are_valid_complete_episodes() -> None:
    records = list(iter_fleet(LoadGenConfig(robots=3, hz=0, duration_s=None, episodes=15, intervention_rate=0.5,
                                            seed=1)))
    names = Counter(name for name, _ in records)
    assert names["EpisodeEvent"] == 30
    steps: dict[str, list[int]] = {}
    ended: dict[str, int] = {}
    open_takeovers: Counter = Counter()
    for name, rec in records:
        codec.validate(name, rec)
        codec.decode(codec.encode(name, rec))
        if name == "Step":
            steps.setdefault(rec["episode_id"], []).append(rec["step_index"])
        elif name == "EpisodeEvent" and rec["kind"] == "ENDED":
            ended[rec["episode_id"]] = rec["num_steps"]
        elif name == "InterventionEvent":
            open_takeovers[rec["episode_id"]] += 1 if rec["kind"] == "STARTED" else -1
    assert set(steps) == set(ended)
    for eid, idx in steps.items():
        assert idx == list(range(ended[eid]))
    assert all(v == 0 for v in open_takeovers.values())  # every takeover is handed back
    assert names["InterventionEvent"] > 0


def test_human_steps_are_inside_takeovers() -> None:
    inside: dict[str, bool] = {}
    for name, rec in iter_fleet(LoadGenConfig(robots=1, hz=0, duration_s=None, episodes=20, intervention_rate=1.0)):
        if name == "InterventionEvent":
            inside[rec["episode_id"]] = rec["kind"] == "STARTED"
        elif name == "Step":
            assert (rec["controller"] == "HUMAN") == inside.get(rec["episode_id"], False)


@pytest.mark.parametrize("kwargs", [{"robots": 0}, {"hz": -1}, {"duration_s": None, "episodes": None},
                                    {"min_steps": 10, "max_steps": 5}, {"image_size": 4}])
def test_bad_config_is_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="LoadGenConfig"):
        LoadGenConfig(**kwargs)
