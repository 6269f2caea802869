"""Fixtures of the lakehouse unit tests: a fresh lakehouse in tmp_path and row factories shaped like the wire."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lakehouse import Lakehouse

T0_US = 1_795_000_000_000_000  # 2026-11-18, UTC
Row = dict[str, Any]


@pytest.fixture
def lake(tmp_path: Path) -> Lakehouse:
    return Lakehouse(tmp_path / "lake")


def step_rows(
    episode_id: str = "e0",
    *,
    n: int = 5,
    task: str = "reach-v3",
    actor_id: str = "robot-0",
    policy_version: str = "1",
    outcome: str = "SUCCESS",
    partition: int | None = 0,
    offsets: list[int] | None = None,
    topic: str = "sop.steps",
    t0_us: int = T0_US,
    human_steps: frozenset[int] = frozenset(),
) -> list[Row]:
    """The rows of one closed episode, as the processor writes them (offsets default to 0..n-1)."""
    offsets = offsets if offsets is not None else list(range(n))
    rows = []
    for i in range(n):
        reward = 0.0 if (outcome == "SUCCESS" and i == n - 1) else -1.0
        rows.append({
            "episode_id": episode_id, "actor_id": actor_id, "task": task,
            "instruction": f"do {task}", "step_index": i, "event_time_us": t0_us + i * 50_000,
            "policy_version": policy_version,
            "images": [{"camera": "corner", "encoding": "png", "width": 4, "height": 4, "data": bytes([i % 256]) * 48}],
            "proprio": [0.1 * i] * 4, "action": [0.5, -0.5, 0.0, 1.0],
            "policy_action": None if i in human_steps else [0.4, -0.4, 0.0, 1.0],
            "controller": "HUMAN" if i in human_steps else "POLICY",
            "env_reward": None, "success": outcome == "SUCCESS" and i == n - 1,
            "reward": reward, "mc_return": float(-(n - 1 - i)), "value": None, "advantage": None,
            "advantage_source": "running_baseline", "outcome": outcome, "episode_length": n,
            "kafka_topic": topic if partition is not None else None,
            "kafka_partition": partition, "kafka_offset": offsets[i] if partition is not None else None,
        })
    return rows


def episode_row(
    episode_id: str = "e0",
    *,
    task: str = "reach-v3",
    actor_id: str = "robot-0",
    policy_version: str = "1",
    outcome: str = "SUCCESS",
    num_steps: int = 5,
    num_interventions: int = 0,
    human_steps: int = 0,
    partition: int | None = 0,
    offset: int | None = 0,
    t0_us: int = T0_US,
) -> Row:
    from datetime import UTC, datetime

    start = datetime.fromtimestamp(t0_us / 1e6, tz=UTC)
    end = datetime.fromtimestamp((t0_us + num_steps * 50_000) / 1e6, tz=UTC)
    return {
        "episode_id": episode_id, "actor_id": actor_id, "task": task, "instruction": f"do {task}",
        "policy_version": policy_version, "policy_versions": [policy_version], "outcome": outcome,
        "num_steps": num_steps, "num_interventions": num_interventions, "human_steps": human_steps,
        "mc_return": float(-(num_steps - 1)), "start_time": start, "end_time": end, "seed": 7,
        "closed_by": "end_event", "advantage_source": "running_baseline",
        "kafka_topic": "sop.episodes" if partition is not None else None,
        "kafka_partition": partition, "kafka_offset": offset,
    }


def intervention_row(
    episode_id: str = "e0",
    *,
    kind: str = "STARTED",
    step_index: int = 1,
    actor_id: str = "robot-0",
    task: str = "reach-v3",
    partition: int = 0,
    offset: int = 0,
) -> Row:
    return {
        "episode_id": episode_id, "kind": kind, "actor_id": actor_id, "task": task, "step_index": step_index,
        "event_time_us": T0_US + step_index * 50_000, "operator_id": "scripted-expert",
        "reason": "divergence" if kind == "STARTED" else "on-track",
        "kafka_topic": "sop.interventions", "kafka_partition": partition, "kafka_offset": offset,
    }


@pytest.fixture
def steps_of() -> Callable[..., list[Row]]:
    return step_rows


@pytest.fixture
def episode_of() -> Callable[..., Row]:
    return episode_row


@pytest.fixture
def intervention_of() -> Callable[..., Row]:
    return intervention_row
