"""`sop view --save | --connect | --spawn` and `sop export mcap` as people run them, over the sample lake."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
import rerun as rr
import rerun.chunk as rc
from click.testing import CliRunner
from mcap.reader import make_reader
from test_rerun import frame_table, per_frame, texts
from view_samples import DEMO, ONLINE, SECOND, TAKEOVER

from lakehouse import Lakehouse
from sop.cli import cli
from views.rerun_log import spawn_problem


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


@pytest.fixture
def grpc_server() -> Iterator[str]:
    """A Rerun gRPC server started with rerun-sdk's own serve API, as a viewer-less machine would run one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    holder = rr.RecordingStream("sop-test-server", recording_id="server")
    url = rr.serve_grpc(grpc_port=port, recording=holder)
    yield url
    holder.disconnect()  # shuts the server down


def read_back(url: str, out_dir: Path, recording_id: str, *, frames: int, timeout_s: float = 60) -> pa.Table:
    """What the server holds, downloaded with Rerun's own CLI (`rerun download`, which follows the stream: stopped
    once the recording has every frame)."""
    out_dir.mkdir()
    downloader = subprocess.Popen([sys.executable, "-m", "rerun", "download", url, "-o", str(out_dir)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    table, deadline = None, time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            time.sleep(0.5)
            for path in out_dir.glob("*.rrd"):
                with contextlib.suppress(Exception), warnings.catch_warnings():  # still being written
                    warnings.simplefilter("ignore")
                    table = frame_table(path, recording_id)
            if table is not None and table.num_rows >= frames:
                return table
    finally:
        downloader.terminate()
        downloader.wait(timeout=30)
    raise AssertionError(f"the server did not hold {frames} frames of {recording_id} after {timeout_s} s: {table}")


def test_view_connect_streams_the_episode_to_a_grpc_server(run, grpc_server: str, tmp_path: Path) -> None:  # noqa: ANN001
    result = run("view", ONLINE, "--connect", grpc_server)
    assert result.exit_code == 0, result.output
    assert f"sent to the viewer at {grpc_server}" in " ".join(result.output.split())
    table = read_back(grpc_server, tmp_path / "download", ONLINE, frames=30)
    assert table.column("frame").to_pylist() == list(range(30))
    assert sorted(per_frame(table, "cameras/corner", "EncodedImage:blob")) == list(range(30))
    assert (TAKEOVER[0], "takeover by teleop-anna: divergence") in texts(table)


def test_view_connect_to_nothing_says_so(run) -> None:  # noqa: ANN001
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    t0 = time.monotonic()
    result = CliRunner().invoke(cli, ["view", SECOND, "--connect", f"rerun+http://127.0.0.1:{port}/proxy"])
    assert result.exit_code == 1 and "could not be delivered" in result.output, result.output
    assert "rerun --serve-grpc" in result.output
    assert time.monotonic() - t0 < 60


def test_view_spawn_without_a_display_says_what_to_do_instead(run, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "WAYLAND_SOCKET"):
        monkeypatch.delenv(name, raising=False)
    for args in ((ONLINE, "--spawn"), (ONLINE,)):  # spawning is also the default
        result = run("view", *args)
        output = " ".join(result.output.split())
        if sys.platform.startswith("linux"):
            assert result.exit_code == 1 and "there is no display" in output, output
            assert "--save FILE.rrd" in output and "--connect URL" in output


def test_spawn_problem_names_the_cause() -> None:
    assert "no display" in spawn_problem({}, "linux")
    assert spawn_problem({"DISPLAY": ":0"}, "linux") is None
    assert spawn_problem({}, "darwin") is None  # macOS and Windows need no display variable
