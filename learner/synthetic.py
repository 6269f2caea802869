"""Synthetic step rows shaped like the ``steps`` / ``demonstrations`` tables, for tests and benchmarks.

Frames are real JPEGs (a pre-encoded pool of tabletop-looking images, so generating is cheap), proprio and
actions have the simulator's sizes, and the RECAP columns are filled as the stream processor fills them.
``HashEmbedder`` stands in for MiniLM where loading BERT would only cost time.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from lakehouse import Lakehouse
from rewards.recap import episode_targets
from schemas.images import jpeg_pool

SYNTHETIC_INSTRUCTIONS = {
    "pick-place-v3": "pick up the puck and place it at the goal",
    "assembly-v3": "pick up the nut and place it onto the peg",
    "drawer-open-v3": "open the drawer",
    "box-close-v3": "pick up the lid and close the box",
}
T0_US = 1_795_000_000_000_000  # 2026-11-18, UTC


class HashEmbedder:
    """A deterministic text embedder without BERT: a unit vector per string, from its hash."""

    dim = 384

    def __init__(self) -> None:
        self._cache: dict[str, np.ndarray] = {}  # as SentenceEncoder's memory cache

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            if text not in self._cache:
                seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
                v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
                self._cache[text] = v / np.linalg.norm(v)
            out[i] = self._cache[text]
        return out

    def table(self, texts: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(texts) if texts is not None else list(SYNTHETIC_INSTRUCTIONS.values())
        return dict(zip(names, self.embed(names), strict=True))


def synthetic_episode(task: str, length: int, rng: np.random.Generator, *, episode_id: str, demo: bool,
                      frames: Sequence[bytes], human_steps: Iterable[int] = (), outcome: str = "SUCCESS",
                      proprio_dim: int = 39, action_dim: int = 4, image_size: int = 64,
                      policy_version: str = "1", t0_us: int = T0_US, max_episode_length: int = 150,
                      cameras: Sequence[str] = ("corner",)) -> list[dict[str, Any]]:
    """The rows of one closed episode: a demonstration (expert label in ``policy_action``) or an online one."""
    human = set(human_steps)
    values = np.linspace(-0.6, -0.1, length)
    targets = episode_targets(outcome, length, max_episode_length=max_episode_length, values=values)
    w = np.random.default_rng(zlib.crc32(task.encode())).normal(0, 1, (proprio_dim, action_dim)) / np.sqrt(proprio_dim)
    rows = []
    for t in range(length):
        proprio = rng.normal(0, 1, proprio_dim).astype(np.float32)
        clean = np.tanh(proprio @ w).astype(np.float32)
        if demo:
            executed = np.clip(clean + rng.normal(0, 0.2, action_dim), -1, 1)
        else:
            executed = clean if t in human else rng.uniform(-1, 1, action_dim)
        rows.append({
            "episode_id": episode_id, "actor_id": "demo-expert" if demo else "synthetic-0", "task": task,
            "instruction": SYNTHETIC_INSTRUCTIONS.get(task, f"do {task}"), "step_index": t,
            "event_time_us": t0_us + t * 33_000, "policy_version": "expert" if demo else policy_version,
            "images": [{"camera": camera, "encoding": "jpeg", "width": image_size, "height": image_size,
                        "data": frames[int(rng.integers(len(frames)))]} for camera in cameras],
            "proprio": proprio.tolist(), "action": [float(a) for a in executed],
            "policy_action": [float(a) for a in clean] if demo else [float(a) for a in rng.uniform(-1, 1, action_dim)],
            "controller": "HUMAN" if demo or t in human else "POLICY", "env_reward": None,
            "success": outcome == "SUCCESS" and t == length - 1,
            "reward": float(targets.rewards[t]), "mc_return": float(targets.normalised_returns[t]),
            "value": None if demo else float(values[t]),
            "advantage": None if demo or targets.advantages is None else float(targets.advantages[t]),
            "advantage_source": None if demo else "running_baseline", "outcome": outcome, "episode_length": length,
        })
    return rows


def write_rows(lake: Lakehouse, table: str, rows: Sequence[dict[str, Any]], *, app_id_prefix: str = "sop-synthetic"
               ) -> int | None:
    """Append rows (no Kafka origin) to ``table`` in one commit; returns the Delta version written."""
    return lake.writer(table, app_id_prefix=app_id_prefix).write(list(rows)).version


def fill_tables(lake: Lakehouse, *, tasks: Sequence[str] = tuple(SYNTHETIC_INSTRUCTIONS), demos_per_task: int = 4,
                online_per_task: int = 4, length: int = 40, image_size: int = 64, proprio_dim: int = 39,
                seed: int = 0, human_share: float = 0.3, cameras: Sequence[str] = ("corner",)) -> dict[str, int | None]:
    """Demonstrations and closed online episodes for every task; one commit per table and task."""
    rng = np.random.default_rng(seed)
    frames = jpeg_pool(32, image_size, seed)
    versions: dict[str, int | None] = {}
    for task in tasks:
        demos = [r for i in range(demos_per_task)
                 for r in synthetic_episode(task, length, rng, episode_id=f"demo:{task}:{seed}:{i}", demo=True,
                                            frames=frames, proprio_dim=proprio_dim, image_size=image_size,
                                            cameras=cameras)]
        online = []
        for i in range(online_per_task):
            start = int(rng.integers(0, max(1, length // 2)))
            human = range(start, start + int(length * human_share))
            online += synthetic_episode(task, length, rng, episode_id=f"online:{task}:{seed}:{i}", demo=False,
                                        frames=frames, human_steps=human, proprio_dim=proprio_dim,
                                        image_size=image_size, outcome="SUCCESS" if i % 2 else "TIMEOUT",
                                        cameras=cameras)
        if demos:
            versions["demonstrations"] = write_rows(lake, "demonstrations", demos)
        if online:
            versions["steps"] = write_rows(lake, "steps", online)
    return versions


def episode_summary(episode_id: str, *, task: str, policy_version: str, outcome: str, num_steps: int = 50,
                    t0_us: int = T0_US) -> dict[str, Any]:
    """One ``episodes`` row (no Kafka origin), e.g. live outcomes of a candidate for the promotion gate."""
    from datetime import UTC, datetime

    return {
        "episode_id": episode_id, "actor_id": "synthetic-0", "task": task,
        "instruction": SYNTHETIC_INSTRUCTIONS.get(task, f"do {task}"), "policy_version": policy_version,
        "policy_versions": [policy_version], "outcome": outcome, "num_steps": num_steps, "num_interventions": 0,
        "human_steps": 0, "mc_return": -float(num_steps), "closed_by": "end_event",
        "start_time": datetime.fromtimestamp(t0_us / 1e6, tz=UTC),
        "end_time": datetime.fromtimestamp((t0_us + num_steps * 33_000) / 1e6, tz=UTC),
    }
