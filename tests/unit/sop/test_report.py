"""The run report: the version range instead of every version, and autonomous success as the headline."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from sop.report import curves, headline, summary, write_report

T0 = 1_800_000_000.0


def episodes(rows: list[tuple[str, str, int, int, str]], *, text_versions: bool = False) -> pa.Table:
    """(task, outcome, takeovers, human steps, version as the event said it) per episode, one a minute."""
    versions = [r[4] for r in rows]
    table = {
        "task": [r[0] for r in rows], "outcome": [r[1] for r in rows],
        "end_time": pa.array([datetime.fromtimestamp(T0 + 60 * (i + 1), UTC) for i in range(len(rows))],
                             pa.timestamp("us", tz="UTC")),
        "num_interventions": pa.array([r[2] for r in rows], pa.int32()),
        "human_steps": pa.array([r[3] for r in rows], pa.int32()),
    }
    if text_versions:  # a table written before policy_version became a number
        table["policy_version"] = pa.array(versions, pa.string())
    else:
        table["policy_version"] = pa.array([int(v) if v.isdigit() else None for v in versions], pa.int64())
        table["policy_version_text"] = pa.array(versions, pa.string())
    return pa.table(table)


ROWS = [
    ("reach", "SUCCESS", 0, 0, "99"),  # on its own
    ("reach", "SUCCESS", 1, 12, "190"),  # rescued by the operator
    ("reach", "FAILURE", 1, 30, "190"),
    ("reach", "SUCCESS", 0, 0, "2"),
    ("push", "SUCCESS", 2, 40, "190"),  # rescued
    ("push", "SUCCESS", 0, 0, "expert"),
]


@pytest.mark.parametrize("text_versions", [False, True])
def test_versions_are_a_numeric_range_and_success_is_split(text_versions: bool) -> None:
    s = summary(curves(episodes(ROWS, text_versions=text_versions), started_at_s=T0), window=20)
    assert s["versions"] == {"first": 2, "last": 190, "count": 3, "other": ["expert"]}  # as text, "99" > "190"
    assert s["tasks"]["reach"]["success_last_window"] == pytest.approx(3 / 4)
    assert s["tasks"]["reach"]["autonomous_success_last_window"] == pytest.approx(2 / 4)
    assert s["tasks"]["push"]["autonomous_success_last_window"] == pytest.approx(1 / 2)
    assert s["autonomous_success_last_window_mean"] == pytest.approx(0.5)
    assert s["success_last_window_mean"] == pytest.approx((3 / 4 + 1) / 2)


def test_time_to_target_counts_rescues_only_in_the_raw_figure() -> None:
    rescued = [("reach", "SUCCESS", 1, 10, "3")] * 4 + [("reach", "SUCCESS", 0, 0, "4")] * 4
    s = summary(curves(episodes(rescued), started_at_s=T0), window=4)
    assert s["time_to_0.8_min"] == pytest.approx(4.0)  # the 4th episode: four rescued successes
    assert s["time_to_0.8_autonomous_min"] == pytest.approx(8.0)  # only once four succeeded on their own
    lines = "\n".join(headline(s, window=4))
    assert "Autonomous success** (no human step), last 4 episodes per task: **1.00**" in lines
    assert "rolling autonomous success 0.8: **8.0 min** (raw: 4.0 min)" in lines
    assert "Held-out success (operator off): not measured by this run (`sop eval --version 4`)" in lines


def test_the_report_names_the_range_not_every_version(tmp_path: Path) -> None:
    many = [("reach", "SUCCESS" if i % 2 else "FAILURE", int(i % 3 == 0), 0, str(i)) for i in range(3, 177)]
    s = write_report(episodes(many), tmp_path, started_at_s=T0, title="run",
                     extra={"held_out": {"success": 0.71, "note": "sop eval, 30 episodes per task"}})
    report = (tmp_path / "report.md").read_text()
    assert "policy versions: v3–v176 (174 versions)" in report
    assert ", 17, " not in report and s["versions"]["count"] == 174
    assert "Held-out success (operator off): **0.71** (sop eval, 30 episodes per task)" in report
    assert (tmp_path / "success_vs_time.png").stat().st_size > 0


def test_per_version_rates_held_out_checkpoints_and_aborted_episodes(tmp_path: Path) -> None:
    rows = [("reach", "SUCCESS", 0, 0, "5"), ("reach", "SUCCESS", 1, 9, "6"), ("reach", "SUCCESS", 1, 9, "6"),
            ("reach", "ABORTED", 0, 0, "6")]  # stopped at the end of the run: counted, not rated
    checkpoints = [{"t_min": 2.0, "version": "5", "episodes_per_task": 4, "per_task": {"reach": 0.5}, "mean": 0.5}]
    s = write_report(episodes(rows), tmp_path, started_at_s=T0, title="run", window=20,
                     extra={"held_out_checkpoints": checkpoints})
    assert s["episodes"] == 4 and s["aborted"] == 1
    assert s["per_version"] == [
        {"version": "6", "episodes": 2, "autonomous_success": 0.0, "success": 1.0, "takeover_rate": 1.0},
        {"version": "5", "episodes": 1, "autonomous_success": 1.0, "success": 1.0, "takeover_rate": 0.0}]
    report = (tmp_path / "report.md").read_text()
    assert "| 6 | 2 | 0.00 | 1.00 | 1.00 |" in report
    assert "| 2.0 | v5 | 0.50 | 0.50 |" in report and "ABORTED episodes (not rated): 1" in report


def test_a_version_that_ran_only_aborted_episodes_still_ran(tmp_path: Path) -> None:
    """The canary can start a new candidate just before the stop: its one episode is ABORTED, not rated, but the
    version ran (the e2e loop compares the report's range with every episode's version)."""
    rows = [("reach", "SUCCESS", 0, 0, "5"), ("reach", "ABORTED", 0, 0, "9")]
    s = write_report(episodes(rows), tmp_path, started_at_s=T0, title="run", window=20)
    assert {k: s["versions"][k] for k in ("first", "last", "count")} == {"first": 5, "last": 9, "count": 2}
    assert [v["version"] for v in s["per_version"]] == ["5"]
