"""The whole loop, small: `sop run --algorithm recap --promotion gated` on a fresh run directory, as a newcomer would
start it (the other e2e runs use HG-DAgger and auto promotion, the defaults).

RECAP: value model trained and frozen before the loop, RECAP-pretrained base, every advantage from that value model.
Gated promotion: a canary actor plays each candidate, the gate promotes a good one (the noisy scripted expert, put up
by hand) and rejects a broken one (a policy whose zero weights make the arm do nothing), registry garbage collection
runs, and held-out checkpoints (operator off) reach the report."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from confluent_kafka import Consumer
from mlflow.tracking import MlflowClient

from infra.metrics import announcements, scrape
from lakehouse import Lakehouse, query
from schemas import codec


def _ended_episodes(bootstrap: str, topic: str) -> set[str]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex, "auto.offset.reset": "earliest",
                  "enable.auto.commit": False})
    c.subscribe([topic])
    ended, idle = set(), 0
    while idle < 10:
        m = c.poll(0.5)
        if m is None:
            idle += 1
            continue
        idle = 0
        if m.error():
            continue
        name, rec = codec.decode(m.value())
        if name == "EpisodeEvent" and rec["kind"] == "ENDED":
            ended.add(rec["episode_id"])
    c.close()
    return ended


def _learner_version(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "learner" / "status.json").read_text()).get("last_version") or 0)
    except (FileNotFoundError, json.JSONDecodeError, ValueError):
        return 0


def _learner_status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "learner" / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _wait(what: str, predicate, timeout_s: float, proc: subprocess.Popen) -> None:  # noqa: ANN001
    deadline = time.time() + timeout_s
    while not predicate():
        assert proc.poll() is None, f"sop run exited while waiting for {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def _put_up(uri: str, version: str, run_dir: Path, proc: subprocess.Popen) -> None:
    """Make ``version`` the candidate by hand, as `sop promote --alias candidate` does, until the gate judges it
    (the learner may move the alias to its own next version in the same moment)."""
    from learner.promotion import promote

    def judged_or_pending() -> bool:
        gate = _learner_status(run_dir).get("gate") or {}
        if str(gate.get("pending")) == version or "sop.gate" in MlflowClient(uri).get_model_version(
                "sop-policy", version).tags:
            return True
        promote(version, name="sop-policy", tracking_uri=uri, alias="candidate", reason="e2e: put up by hand")
        return False

    _wait(f"the gate to take v{version} as its candidate", judged_or_pending, 120, proc)


def _broken_policy(uri: str, like: str) -> str:
    """A version of ``like``'s architecture and instructions with every weight zero: the arm does nothing."""
    from learner import registry

    runtime = registry.load_version("sop-policy", like, tracking_uri=uri).runtime
    with torch.no_grad():
        for p in runtime.model.parameters():
            p.zero_()
    return registry.register_policy(runtime.model, alias=None, tracking_uri=uri, experiment="sop",
                                    embeddings=runtime.text.as_dict())


def _gate_tag(uri: str, version: str) -> dict | None:
    tags = MlflowClient(uri).get_model_version("sop-policy", version).tags
    return json.loads(tags["sop.gate"]) if "sop.gate" in tags else None


def _two_free_ports() -> int:
    """A port P with P + 1 free too (for the two actors' fixed ports)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no two consecutive free ports")


@pytest.mark.timeout(900)  # ~5 min on 2 cores; the gate waits for live episodes at 30 Hz
def test_sop_run_registers_versions_actors_follow_and_ctrl_c_loses_nothing(tmp_path) -> None:
    """Ctrl-C as a terminal sends it: SIGINT to the whole foreground process group of `sop run`."""
    run_dir = tmp_path / "run"
    actor_port = _two_free_ports()
    env = {**os.environ, "SOP_RUN_DIR": str(run_dir), "SOP_KAFKA_PORT": "0", "SOP_PRETRAIN_STEPS": "40",
           "SOP_VALUE_STEPS": "30", "SOP_LEARN_PUBLISH_EVERY": "20", "SOP_ACTOR_IMAGE_SIZE": "48", "SOP_TOPIC_PARTITIONS": "2",
           "SOP_ACTOR_METRICS_PORT": str(actor_port), "SOP_GATE_MIN_EPISODES": "4",
           "SOP_GATE_CHECK_S": "1", "SOP_REGISTRY_GC_KEEP_LAST": "3", "SOP_REGISTRY_GC_EVERY_S": "2",
           "SOP_REGISTRY_GC_ACTIVE_S": "20"}
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    log = open(tmp_path / "sop-run.log", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "sop", "run", "--actors", "2", "--minutes", "8", "--demos-per-task", "2",
         "--tasks", "drawer-open-v3,reach-v3", "--keep-stack", "--promotion", "gated", "--canary-share", "0.5",
         "--eval-every", "1", "--eval-episodes", "2", "--algorithm", "recap"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while _learner_version(run_dir) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(1)
        assert _learner_version(run_dir) >= 3, "the learner registered no versions after the base"
        base = str(MlflowClient(uri).get_model_version_by_alias("sop-policy", "champion").version)
        # a good candidate, put up by hand: the noisy scripted expert; the gate promotes it on the canary's episodes
        from sim.expert_version import register_expert_policy

        good = register_expert_policy(uri, noise_sigma=0.1, alias=None, artifact_location=str(run_dir / "mlartifacts"))
        _put_up(uri, good, run_dir, proc)
        _wait("the gate's verdict on the expert", lambda: _gate_tag(uri, good) is not None, 240, proc)
        assert _gate_tag(uri, good)["decision"] == "promote", _gate_tag(uri, good)
        assert str(MlflowClient(uri).get_model_version_by_alias("sop-policy", "champion").version) == good
        # a broken candidate: zero weights, the arm does nothing and the operator rescues every episode
        broken = _broken_policy(uri, base)
        _put_up(uri, broken, run_dir, proc)
        _wait("the gate's verdict on the broken policy", lambda: _gate_tag(uri, broken) is not None, 240, proc)
        verdict = _gate_tag(uri, broken)
        assert verdict["decision"] == "reject", verdict
        assert str(MlflowClient(uri).get_model_version_by_alias("sop-policy", "champion").version) == good
        def shown() -> set:  # what the live view reads: the learner's status file, rewritten every 2 s
            return {(d["version"], d["decision"]) for d in (_learner_status(run_dir).get("gate") or {}).get("recent")
                    or []}

        _wait("the learner's status to show both decisions", lambda: shown() >= {(good, "promote"), (broken, "reject")},
              30, proc)
        # every part serves its Prometheus endpoint; actor i on SOP_ACTOR_METRICS_PORT + i, the others on free ports
        found = announcements(run_dir / "metrics")
        assert sorted(a.role for a in found) == ["actor", "actor", "learner", "processor"], found
        assert sorted(a.url for a in found if a.role == "actor") == [
            f"http://127.0.0.1:{actor_port + i}/metrics" for i in range(2)]
        assert all(scrape(a.url).value("process_start_time_seconds") for a in found)
        status = subprocess.run([sys.executable, "-m", "sop", "status"], env={**env, "COLUMNS": "250"},
                                capture_output=True, text=True, timeout=120)
        for part in ("actor actor-00", "actor actor-01", "learner learner@", "processor sop-processor@", "ω_on"):
            assert part in status.stdout, status.stdout
        time.sleep(30)  # the actors finish episodes with the learner's versions
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=300) == 0, (tmp_path / "sop-run.log").read_text()[-3000:]
        assert json.loads((run_dir / "last-run.json").read_text())["stop_reason"] == "stopped by Ctrl-C"
        bootstrap = json.loads((run_dir / "kafka" / "broker.json").read_text())["bootstrap"]

        client = MlflowClient(tracking_uri=uri)
        versions = client.search_model_versions("name = 'sop-policy'")
        assert len(versions) >= 3, "the base policy and at least two learner versions"
        lake = Lakehouse(str(run_dir / "lake"))
        acted = query(lake, "SELECT DISTINCT actor_id, policy_version FROM episodes").to_pylist()
        followed = {r["actor_id"] for r in acted if r["policy_version"] is not None and r["policy_version"] > int(base)}
        assert followed == {"actor-00", "actor-01"}, acted  # both actors switched to newer versions
        played = {(r["actor_id"], str(r["policy_version"])) for r in acted}
        assert ("actor-01", broken) in played and ("actor-00", broken) not in played  # only the canary ran it
        assert ("actor-00", good) in played  # the rest of the fleet follows the champion once it is promoted

        # the history log shows both decisions; garbage collection kept every champion, alias and running version
        from learner.promotion import history_log

        entries = history_log(name="sop-policy", tracking_uri=uri)
        gates = {(e["version"], e["decision"]) for e in entries if e["event"] == "gate"}
        assert {(good, "promote"), (broken, "reject")} <= gates, gates
        left = {str(v.version) for v in versions}
        champions = {str(e["to"]) for e in entries if e["event"] == "move" and e["alias"] == "champion"}
        newest: dict[str, tuple] = {}
        for r in query(lake, "SELECT actor_id, policy_version, end_time FROM episodes").to_pylist():
            if r["actor_id"] not in newest or r["end_time"] > newest[r["actor_id"]][1]:
                newest[r["actor_id"]] = (str(r["policy_version"]), r["end_time"])
        running = {v for v, _ in newest.values()}
        assert champions | {base, good} | running <= left
        assert broken in left or broken not in running  # a rejected candidate goes once no actor runs it
        registered = set(range(int(base), max(int(v) for v in left) + 1))
        assert registered - {int(v) for v in left}, "garbage collection deleted nothing"

        in_delta = set(query(lake, "SELECT episode_id FROM episodes").column(0).to_pylist())
        published = _ended_episodes(bootstrap, "sop.episodes")
        assert in_delta == published and len(published) > 0
        steps = query(lake, "SELECT count(*) AS n FROM steps").to_pylist()[0]
        assert steps["n"] == query(lake, "SELECT sum(num_steps) FROM episodes").column(0)[0].as_py()

        reports = list((run_dir / "reports").glob("*/report.md"))
        assert len(reports) == 1
        folder = reports[0].parent
        for name in ("success_vs_time.png", "interventions_vs_time.png", "episodes_per_hour.png", "summary.json"):
            assert (folder / name).stat().st_size > 0, name
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["episodes"] == len(in_delta)
        ran = sorted({r["policy_version"] for r in acted if r["policy_version"] is not None})
        assert {k: summary["versions"][k] for k in ("first", "last", "count")} == \
            {"first": ran[0], "last": ran[-1], "count": len(ran)}
        report = reports[0].read_text()
        assert f"v{ran[0]}–v{ran[-1]} ({len(ran)} versions)" in report and "Autonomous success" in report
        assert summary["held_out_checkpoints"] and "Held-out checkpoints (operator off" in report
        assert {c["version"] for c in summary["held_out_checkpoints"]} <= left
        assert any(v["version"] == broken and v["autonomous_success"] == 0.0 for v in summary["per_version"])
        run_log = (tmp_path / "sop-run.log").read_text()
        assert "behaviour cloning" in run_log and "loss" in run_log, run_log[-3000:]  # pretraining showed progress
        assert "value model" in run_log and "sop-value v1 (frozen" in run_log, run_log[-3000:]

        # RECAP as the paper runs it: the value model was trained before the loop (on the demonstrations), the base
        # policy pretrained on its advantages, and every stored advantage comes from that one frozen version.
        values = client.search_model_versions("name = 'sop-value'")
        assert [str(v.version) for v in values] == ["1"] and values[0].tags["lineage.phase"] == "value"
        base_tags = client.get_model_version("sop-policy", str(base)).tags
        assert base_tags["lineage.algorithm"] == "recap" and base_tags["lineage.value_model"] == "sop-value/1"
        sources = query(lake, "SELECT advantage_source, count(*) AS n FROM steps GROUP BY 1").to_pylist()
        assert sources == [{"advantage_source": "value_model:sop-value/1", "n": steps["n"]}], sources
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        subprocess.run([sys.executable, "-m", "sop", "down"], env=env, capture_output=True, timeout=120)
