"""`sop up` / `status` / `loadgen` / `down` as a newcomer runs them (their own broker on a free port)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from infra.kafka import _pid_alive


def _sop(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sop", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_up_twice_status_loadgen_down(tmp_path) -> None:
    env = {**os.environ, "SOP_RUN_DIR": str(tmp_path / "run"), "SOP_KAFKA_PORT": "0", "COLUMNS": "200"}
    env.pop("SOP_KAFKA_BOOTSTRAP", None)
    first = _sop("up", env=env)
    assert first.returncode == 0, first.stderr
    state = json.loads((tmp_path / "run" / "kafka" / "broker.json").read_text())
    try:
        assert "created sop.steps, sop.episodes, sop.interventions, sop.deadletter" in first.stdout
        again = _sop("up", env=env)  # harmless: same broker, nothing created
        assert again.returncode == 0 and "created" not in again.stdout
        assert json.loads((tmp_path / "run" / "kafka" / "broker.json").read_text())["pid"] == state["pid"]

        gen = _sop("loadgen", "--robots", "3", "--hz", "0", "--episodes", "9", "--image-size", "32", env=env)
        assert gen.returncode == 0, gen.stderr
        assert "9 episodes" in gen.stdout and "failed 0" in gen.stdout

        status = _sop("status", env=env)
        assert status.returncode == 0
        assert "running" in status.stdout and state["bootstrap"] in status.stdout
        steps_line = next(line for line in status.stdout.splitlines() if "sop.episodes" in line)
        assert "18 messages" in steps_line  # 9 STARTED + 9 ENDED
    finally:
        down = _sop("down", env=env)
    assert down.returncode == 0 and "kafka: stopped" in down.stdout
    assert not _pid_alive(state["pid"])
    assert "stopped" in _sop("status", env=env).stdout


def test_bad_setting_fails_at_start_naming_the_variable(tmp_path) -> None:
    env = {**os.environ, "SOP_RUN_DIR": str(tmp_path), "SOP_TOPIC_PARTITIONS": "zero"}
    out = _sop("status", env=env)
    assert out.returncode == 2
    assert "SOP_TOPIC_PARTITIONS" in out.stderr
