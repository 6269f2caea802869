"""Stored episodes for the tests of ``views`` and of `sop view` / `sop export mcap`: a small lakehouse with stored episodes shaped like the processor's rows: real JPEG frames, a takeover.

``online``: 30 steps, cameras ``corner`` and ``wrist``, the human drives steps 8..14 (STARTED at 8, ENDED at
15), value and advantage filled, outcome SUCCESS. ``second``: 12 steps of another task, TIMEOUT, no takeover.
``demo:reach-v3:0``: an offline demonstration (every step HUMAN) in ``demonstrations``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lakehouse import Lakehouse
from schemas.images import jpeg_pool

T0_US = 1_795_000_000_000_000
STEP_US = 33_333
ONLINE, SECOND, DEMO = "online", "second", "demo:reach-v3:0"
TAKEOVER = (8, 15)  # the human drives steps 8 .. 14


def step_rows(episode_id: str, *, n: int, task: str, outcome: str, human: range = range(0),
              t0_us: int = T0_US, cameras: tuple[str, ...] = ("corner", "wrist"), version: str = "3") -> list[dict]:
    frames = jpeg_pool(4, 32, seed=len(episode_id))
    rows = []
    for i in range(n):
        driver = "HUMAN" if i in human else "POLICY"
        proposed = [0.1 * i, -0.05 * i, 0.2, 1.0]
        executed = [0.5, 0.5, -0.2, -1.0] if driver == "HUMAN" else proposed
        last = i == n - 1
        rows.append({
            "episode_id": episode_id, "actor_id": "robot-7", "task": task, "instruction": f"please {task}",
            "step_index": i, "event_time_us": t0_us + i * STEP_US, "policy_version": version,
            "images": [{"camera": c, "encoding": "jpeg", "width": 32, "height": 32, "data": frames[(i + k) % 4],
                        "capture_time_us": t0_us + i * STEP_US - 5_000} for k, c in enumerate(cameras)],
            "proprio": [0.01 * i + d for d in range(6)], "action": executed, "policy_action": proposed,
            "controller": driver, "env_reward": None, "success": outcome == "SUCCESS" and last,
            "reward": (0.0 if outcome == "SUCCESS" else -n) if last else -1.0,
            "mc_return": -(n - 1 - i) / n, "value": -0.5 + 0.01 * i, "advantage": 0.1 if i % 2 else -0.1,
            "advantage_source": "value_model", "outcome": outcome, "episode_length": n,
            "kafka_topic": "sop.steps", "kafka_partition": 0, "kafka_offset": i,
        })
    return rows


def episode_row(episode_id: str, *, task: str, n: int, outcome: str, interventions: int, human: int,
                t0_us: int = T0_US) -> dict[str, Any]:
    from datetime import UTC, datetime

    return {
        "episode_id": episode_id, "actor_id": "robot-7", "task": task, "instruction": f"please {task}",
        "policy_version": "3", "policy_versions": ["3"], "outcome": outcome, "num_steps": n,
        "num_interventions": interventions, "human_steps": human, "mc_return": -1.0,
        "start_time": datetime.fromtimestamp(t0_us / 1e6, tz=UTC),
        "end_time": datetime.fromtimestamp((t0_us + n * STEP_US) / 1e6, tz=UTC), "seed": 10_004,
        "closed_by": "end_event", "advantage_source": "value_model",
        "kafka_topic": "sop.episodes", "kafka_partition": 0, "kafka_offset": 0,
    }


def intervention_rows(episode_id: str, start: int, end: int, *, task: str) -> list[dict[str, Any]]:
    return [{"episode_id": episode_id, "kind": kind, "actor_id": "robot-7", "task": task, "step_index": step,
             "event_time_us": T0_US + step * STEP_US + 1_000, "operator_id": "teleop-anna", "reason": reason,
             "kafka_topic": "sop.interventions", "kafka_partition": 0, "kafka_offset": k}
            for k, (kind, step, reason) in enumerate((("STARTED", start, "divergence"), ("ENDED", end, "on-track")))]


def write_sample_lake(root: Path) -> Lakehouse:
    lake = Lakehouse(root)
    online = step_rows(ONLINE, n=30, task="drawer-open-v3", outcome="SUCCESS", human=range(*TAKEOVER))
    second = step_rows(SECOND, n=12, task="reach-v3", outcome="TIMEOUT", t0_us=T0_US + 10**7, cameras=("corner",))
    for k, row in enumerate(second):
        row["kafka_partition"], row["kafka_offset"] = 1, k
    lake.writer("steps", app_id_prefix="t.sop.steps").write(online + second, offsets={0: 30, 1: 12})
    second_ep = episode_row(SECOND, task="reach-v3", n=12, outcome="TIMEOUT", interventions=0, human=0,
                            t0_us=T0_US + 10**7)
    second_ep["kafka_offset"] = 1
    lake.writer("episodes", app_id_prefix="t.sop.episodes").write(
        [episode_row(ONLINE, task="drawer-open-v3", n=30, outcome="SUCCESS", interventions=1, human=7), second_ep],
        offsets={0: 2})
    lake.writer("interventions", app_id_prefix="t.sop.interventions").write(
        intervention_rows(ONLINE, *TAKEOVER, task="drawer-open-v3"), offsets={0: 2})
    demo = step_rows(DEMO, n=10, task="reach-v3", outcome="SUCCESS", human=range(10), cameras=("corner",))
    for row in demo:
        row["kafka_topic"] = row["kafka_partition"] = row["kafka_offset"] = None
        row["value"] = row["advantage"] = None
    lake.writer("demonstrations", app_id_prefix="t.demos").write(demo)
    return lake

