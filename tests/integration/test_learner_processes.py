"""The learner as separate processes: killed with SIGKILL it resumes from its last registered version, and
under torchrun (DDP, gloo, 2 CPU processes) it trains and registers each version exactly once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from infra.metrics import announcements, scrape
from lakehouse import Lakehouse
from learner import registry
from learner.synthetic import fill_tables

pytestmark = pytest.mark.integration
SMALL_MODEL = {"hidden": [64, 64], "encoder": {"image_size": 32, "cnn_channels": [16, 32, 32]}}


def learner_env(tmp_path: Path, mlflow_uri: str, **extra: str) -> dict[str, str]:
    lake = Lakehouse(tmp_path / "lake")
    if not lake.exists("demonstrations"):
        fill_tables(lake, tasks=("drawer-open-v3", "box-close-v3"), demos_per_task=2, online_per_task=1, length=20,
                    image_size=32)
    return {**os.environ, "SOP_RUN_DIR": str(tmp_path / "run"), "SOP_LAKE_URI": str(tmp_path / "lake"),
            "SOP_MLFLOW_TRACKING_URI": mlflow_uri, "SOP_POLICY_MODEL": json.dumps(SMALL_MODEL),
            "SOP_LEARN_BATCH_SIZE": "16", "SOP_LEARN_THREADS": "1", "SOP_LEARN_PUBLISH_EVERY": "5",
            "SOP_LEARN_POLL_S": "0.5", "SOP_LEARN_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", **extra}


def registered(uri: str) -> dict[int, dict[str, str]]:
    try:
        return {int(v.version): v.tags for v in MlflowClient(uri).search_model_versions("name='sop-policy'")}
    except Exception:
        return {}


def learner_step(tags: dict[str, str]) -> int:
    return int(tags["lineage.learner_step"])


def test_a_killed_learner_resumes_from_its_last_version(tmp_path: Path, mlflow_uri: str) -> None:
    env = learner_env(tmp_path, mlflow_uri)
    cmd = [sys.executable, "-m", "sop.commands.learn", "--quiet"]
    log = open(tmp_path / "first.log", "wb")  # noqa: SIM115 - closed below
    first = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while len(registered(mlflow_uri)) < 3:  # the champion alias moves only after the upload completed
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no versions registered in time"
            time.sleep(0.2)
        (endpoint,) = announcements(tmp_path / "run" / "metrics")  # SOP_LEARN_METRICS_PORT=0: announced
        while (scrape(endpoint.url).value("sop_learner_policy_version_registered") or 0) < 1:
            assert time.monotonic() < deadline, "the endpoint never showed a registered version"
            time.sleep(0.2)
        assert scrape(endpoint.url).value("sop_learner_steps_total") >= 5
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        log.close()
    assert not endpoint.alive  # SIGKILLed: its announcement stays, `sop status` drops it
    before = registered(mlflow_uri)
    # The newest version may have been cut off mid-upload; the learner resumes from the newest that loads.
    loadable = [v for v in sorted(before, reverse=True) if _loads(mlflow_uri, v)]
    resume_version = loadable[0]
    resume_step = learner_step(before[resume_version])

    second = subprocess.run([*cmd, "--max-steps", "10"], env=env, capture_output=True, timeout=180)
    assert second.returncode == 0, second.stderr.decode()[-3000:]
    after = registered(mlflow_uri)
    new = {v: t for v, t in after.items() if v not in before}
    assert [learner_step(t) for _, t in sorted(new.items())] == [resume_step + 5, resume_step + 10]
    first_new = new[min(new)]
    assert first_new["lineage.parent_version"] == str(resume_version)
    run = MlflowClient(mlflow_uri).get_run(first_new["lineage.run_id"])
    assert run.data.tags["sop.resumed_from"] == str(resume_version)
    status = json.loads((tmp_path / "run" / "learner" / "status.json").read_text())
    assert status["state"] == "stopped (budget)" and status["step"] == resume_step + 10
    assert status["resumed_from"] == str(resume_version)


def _loads(uri: str, version: int) -> bool:
    try:
        registry.load_version("sop-policy", str(version), tracking_uri=uri)
        return True
    except Exception:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ddp_with_two_processes_registers_once(tmp_path: Path, mlflow_uri: str) -> None:
    env = learner_env(tmp_path, mlflow_uri, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "sop.commands.learn", "--max-steps", "10", "--quiet"]
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=240)
    assert done.returncode == 0, done.stderr.decode()[-4000:]
    versions = registered(mlflow_uri)
    assert sorted(versions) == [1, 2]  # steps 5 and 10, each registered by rank 0 only
    assert [learner_step(versions[v]) for v in (1, 2)] == [5, 10]
    assert json.loads(versions[2]["lineage.world_size"]) == 2
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("sop").experiment_id],
                              filter_string="tags.`sop.role` = 'learner'")
    assert len(runs) == 1 and runs[0].data.params["world_size"] == "2"
    assert runs[0].info.status == "FINISHED"
