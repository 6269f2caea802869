"""Reading stored episodes back as one object each: steps in order, summary, takeovers paired."""

from __future__ import annotations

import pytest
from view_samples import DEMO, ONLINE, SECOND, TAKEOVER

from lakehouse import Lakehouse
from views import EpisodeNotFoundError, load_episodes
from views.episodes import Episode


def test_an_online_episode_comes_with_its_summary_and_takeover(sample_lake: Lakehouse) -> None:
    (ep,) = load_episodes(sample_lake, [ONLINE])
    assert ep.table == "steps" and ep.num_steps == 30 and ep.step_index.tolist() == list(range(30))
    assert ep.summary is not None and ep.summary["num_interventions"] == 1
    assert ep.cameras == ["corner", "wrist"] and ep.outcome == "SUCCESS" and ep.task == "drawer-open-v3"
    (span,) = ep.takeovers()
    assert (span.start_step, span.end_step) == TAKEOVER
    assert (span.operator_id, span.reason, span.end_reason) == ("teleop-anna", "divergence", "on-track")
    assert ep.human.nonzero()[0].tolist() == list(range(*TAKEOVER))
    assert ep.vectors("action").shape == (30, 4) and ep.vectors("proprio").shape == (30, 6)
    assert ep.policy_versions() == [(0, "3")]


def test_ids_are_found_in_either_step_table_in_the_order_asked(sample_lake: Lakehouse) -> None:
    eps = load_episodes(sample_lake, [DEMO, ONLINE])
    assert [(e.episode_id, e.table) for e in eps] == [(DEMO, "demonstrations"), (ONLINE, "steps")]
    assert eps[0].summary is None and eps[0].interventions == [] and eps[0].human.all()


def test_where_selects_by_condition_and_limit_bounds_it(sample_lake: Lakehouse) -> None:
    assert [e.episode_id for e in load_episodes(sample_lake, where="task = 'reach-v3'")] == [DEMO, SECOND]
    assert [e.episode_id for e in load_episodes(sample_lake, where="task = 'reach-v3'", table="steps")] == [SECOND]
    assert len(load_episodes(sample_lake, where="true", limit=2)) == 2


def test_missing_episodes_are_named(sample_lake: Lakehouse, tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(EpisodeNotFoundError, match="nope"):
        load_episodes(sample_lake, [ONLINE, "nope"])
    with pytest.raises(EpisodeNotFoundError, match="matches"):
        load_episodes(sample_lake, where="task = 'nothing'")
    with pytest.raises(EpisodeNotFoundError, match="no steps or demonstrations table"):
        load_episodes(Lakehouse(tmp_path / "empty"), ["x"])
    with pytest.raises(EpisodeNotFoundError):
        load_episodes(sample_lake, ["it's"])  # a quote in an id is escaped, not SQL


def test_takeover_without_end_lasts_to_the_end() -> None:
    steps = [{"step_index": i, "controller": "HUMAN" if i >= 2 else "POLICY"} for i in range(5)]
    started = {"kind": "STARTED", "step_index": 2, "event_time_us": 5, "operator_id": "op", "reason": "stalled"}
    (span,) = Episode("e", "steps", steps, None, [started]).takeovers()
    assert (span.start_step, span.end_step, span.end_reason) == (2, 5, None)
