"""`sop actor`, `sop fleet` and `sop demos` as people run them, against the real broker, registry and lake."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from infra.metrics import announcements, scrape
from lakehouse import Lakehouse
from producers.fleet import ActorStatus
from tests.integration.test_actor_stack import consume_all, episodes_of

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore")]


def stack_env(kafka, topics: dict[str, str], mlflow_uri: str, run_dir: Path) -> dict[str, str]:  # noqa: ANN001
    return {
        **os.environ,
        "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"),
        "SOP_RUN_DIR": str(run_dir),
        "SOP_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "SOP_TOPIC_PREFIX": topics["Step"].removesuffix("steps"),
        "SOP_MLFLOW_TRACKING_URI": mlflow_uri,
        "SOP_MAX_EPISODE_STEPS": "120",
        "SOP_ACTOR_IMAGE_SIZE": "32",
        "SOP_ACTOR_STATUS_INTERVAL_S": "0.1",
        "SOP_ACTOR_POLL_INTERVAL_S": "0.2",
    }


def sop(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "sop", *args], env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_until(condition, what: str, process: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"never saw {what}; exit {process.poll()}; log:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def test_sop_actor_sigterm_aborts_the_episode_in_progress_and_flushes(kafka, topics, mlflow_uri, tmp_path) -> None:
    env = stack_env(kafka, topics, mlflow_uri, tmp_path)
    status_file, log = tmp_path / "actor.json", tmp_path / "actor.log"
    actor = sop("actor", "--tasks", "drawer-open-v3", "--hz", "30", "--actor-id", "cli-actor", "--status-file",
                str(status_file), "--register-expert-if-missing", env=env, log=log)

    def mid_first_episode() -> bool:
        st = ActorStatus.read(status_file)
        return st is not None and st.steps >= 5 and st.episodes == 0  # at 30 Hz it has seconds still to run

    wait_until(mid_first_episode, "the first episode under way", actor, log)
    (endpoint,) = announcements(tmp_path / "metrics")  # SOP_ACTOR_METRICS_PORT=0: a free port, announced
    assert (endpoint.role, endpoint.name) == ("actor", "cli-actor")
    wait_until(lambda: scrape(endpoint.url).value("sop_actor_steps_total", 0) >= 5, "the steps scraped", actor, log)
    assert scrape(endpoint.url).value("sop_actor_policy_version") == 1
    assert scrape(endpoint.url).value("sop_actor_control_rate_target_hz") == 30
    actor.send_signal(signal.SIGTERM)
    assert actor.wait(60) == 0, log.read_text()[-3000:]
    assert announcements(tmp_path / "metrics") == []
    final = ActorStatus.read(status_file)
    assert final is not None and final.state == "done" and final.aborted == final.episodes == 1
    assert final.failed == 0 and final.in_flight == 0 and final.versions == {"1": final.steps}
    (episode,) = episodes_of(consume_all(kafka, topics, final.delivered))
    assert episode.ended["outcome"] == "ABORTED" and episode.ended["num_steps"] == len(episode.steps) == final.steps
    assert episode.started["actor_id"] == "cli-actor" and episode.started["seed"] == 10_000
    assert "registered the noisy scripted expert" in log.read_text()


def test_sop_fleet_runs_actors_with_distinct_seeds_and_stops_them_cleanly(kafka, topics, mlflow_uri, tmp_path) -> None:
    env = stack_env(kafka, topics, mlflow_uri, tmp_path)
    log = tmp_path / "fleet.log"
    fleet = sop("fleet", "--actors", "2", "--hz", "0", "--tasks", "reach-v3,drawer-open-v3",
                "--register-expert-if-missing", env=env, log=log)

    def statuses() -> list[ActorStatus]:
        return [st for p in sorted(tmp_path.glob("fleet/*/actor-*.json")) if (st := ActorStatus.read(p))]

    wait_until(lambda: len(statuses()) == 2 and all(st.episodes >= 1 for st in statuses()),
               "both actors finish an episode", fleet, log)
    fleet.send_signal(signal.SIGTERM)  # what Ctrl-C does to the supervisor
    assert fleet.wait(90) == 0, log.read_text()[-3000:]
    final = statuses()
    assert [st.state for st in final] == ["done", "done"] and sum(st.failed for st in final) == 0
    episodes = episodes_of(consume_all(kafka, topics, sum(st.delivered for st in final)))
    by_actor: dict[str, list] = {}
    for e in episodes:
        by_actor.setdefault(e.started["actor_id"], []).append(e)
    assert sorted(by_actor) == ["actor-00", "actor-01"]
    assert [len(by_actor[a]) for a in sorted(by_actor)] == [st.episodes for st in final]
    seeds = [e.started["seed"] for e in episodes]
    assert len(set(seeds)) == len(seeds)  # no placement run twice in the fleet
    assert {e.started["seed"] % 2 for e in by_actor["actor-00"]} == {0}
    assert {e.started["seed"] % 2 for e in by_actor["actor-01"]} == {1}
    assert by_actor["actor-00"][0].started["task"] == "reach-v3"  # task rotations start apart
    assert by_actor["actor-01"][0].started["task"] == "drawer-open-v3"
    assert all(e.ended["outcome"] in ("SUCCESS", "TIMEOUT", "ABORTED") for e in episodes)
    assert "fleet:" in log.read_text()


def test_sop_demos_is_idempotent_per_task_and_seed(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sop.commands.demos import command as demos

    lake_root = tmp_path / "lake"
    for name, value in {"SOP_RUN_DIR": str(tmp_path), "SOP_LAKE_URI": str(lake_root),
                        "SOP_MAX_EPISODE_STEPS": "60", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}.items():
        monkeypatch.setenv(name, value)
    args = ["--episodes-per-task", "2", "--noise", "0.2", "--tasks", "reach-v3,drawer-open-v3", "--image-size", "16"]
    runner = CliRunner()

    def rows() -> list[dict]:
        table = Lakehouse(str(lake_root)).table("demonstrations")
        return table.to_pyarrow_table(columns=["episode_id", "step_index", "reward", "mc_return", "outcome",
                                               "episode_length", "controller", "policy_action"]).to_pylist()

    first = runner.invoke(demos, args)
    assert first.exit_code == 0, first.output
    written = rows()
    again = runner.invoke(demos, args)
    assert again.exit_code == 0, again.output
    assert "skipped 4 already in the table" in " ".join(again.output.split())
    assert len(rows()) == len(written)  # the rerun added nothing

    more = runner.invoke(demos, [*args[:1], "3", *args[2:]])  # one more seed per task: only that is new
    assert more.exit_code == 0 and "wrote 2 episode(s)" in " ".join(more.output.split()), more.output
    final = rows()
    episodes = {r["episode_id"] for r in final}
    assert episodes == {f"demo:{t}:{s}" for t in ("reach-v3", "drawer-open-v3") for s in range(3)}
    for episode_id in episodes:
        steps = sorted((r for r in final if r["episode_id"] == episode_id), key=lambda r: r["step_index"])
        assert [r["step_index"] for r in steps] == list(range(len(steps))) == list(range(steps[0]["episode_length"]))
        last = steps[-1]
        assert last["reward"] == (0.0 if last["outcome"] == "SUCCESS" else -60.0)
        assert all(r["reward"] == -1.0 for r in steps[:-1]) and all(r["controller"] == "HUMAN" for r in steps)
        assert all(r["policy_action"] is not None and -1.0 <= r["mc_return"] <= 0.0 for r in steps)
