"""`sop view --save` and `sop export mcap` as people run them, over the sample lake."""

from __future__ import annotations

from pathlib import Path

import pytest
import rerun.chunk as rc
from click.testing import CliRunner
from mcap.reader import make_reader
from view_samples import DEMO, ONLINE, SECOND

from lakehouse import Lakehouse
from sop.cli import cli


@pytest.fixture
def run(sample_lake: Lakehouse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    monkeypatch.setenv("SOP_LAKE_URI", sample_lake.root)
    monkeypatch.setenv("SOP_RUN_DIR", str(tmp_path / "run"))

    def invoke(*args: str):  # noqa: ANN202
        return CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return invoke


def test_view_saves_the_episodes_asked_for(run, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "sel.rrd"
    result = run("view", "--where", "task = 'reach-v3'", "--save", str(out))
    assert result.exit_code == 0, result.output
    assert "2 episode(s), 22 steps" in " ".join(result.output.split())
    assert sorted(s.recording_id for s in rc.RrdReader(out).recordings()) == sorted([DEMO, SECOND])


def test_view_names_what_is_missing(run, tmp_path: Path) -> None:  # noqa: ANN001
    result = run("view", "no-such-episode", "--save", str(tmp_path / "x.rrd"))
    assert result.exit_code != 0 and "no-such-episode" in result.output
    assert run("view").exit_code == 2  # neither ids nor --where
    assert run("view", ONLINE, "--save", "x.rrd", "--spawn").exit_code == 2


def test_export_mcap_one_file_or_one_per_episode(run, tmp_path: Path) -> None:  # noqa: ANN001
    one = tmp_path / "one.mcap"
    result = run("export", "mcap", ONLINE, "--out", str(one))
    assert result.exit_code == 0, result.output
    with one.open("rb") as f:
        summary = make_reader(f).get_summary()
    topics = {c.topic: summary.statistics.channel_message_counts[i] for i, c in summary.channels.items()}
    assert topics["/camera/corner"] == topics["/robot/action"] == 30 and topics["/interventions"] == 2

    many = tmp_path / "many"
    result = run("export", "mcap", "--where", "task = 'reach-v3'", "--out", str(many))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in many.iterdir()) == ["demo_reach-v3_0.mcap", "second.mcap"]
    assert run("export", "mcap", ONLINE, SECOND, "--out", str(tmp_path / "two.mcap")).exit_code == 2


def test_export_lists_its_formats(run) -> None:  # noqa: ANN001
    result = run("export", "--help")
    assert result.exit_code == 0 and "mcap" in result.output
