"""Shared fixtures of the learner's unit tests: toy episodes with real JPEG frames, a cheap text embedder."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)

PROPRIO_DIM = 8
ACTION_DIM = 4
INSTRUCTIONS = {"reach-v3": "reach the red target", "drawer-open-v3": "open the drawer",
                "button-press-v3": "press the button"}


class HashEmbedder:
    """A deterministic stand-in for MiniLM: a unit vector per string, derived from its hash."""

    dim = 384

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            out[i] = v / np.linalg.norm(v)
        return out


@dataclass(frozen=True)
class Obs:
    images: dict[str, np.ndarray]
    proprio: np.ndarray
    instruction: str
    task: str


def jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def expert_action(proprio: np.ndarray, task: str) -> np.ndarray:
    """A smooth function of the state that a small network can learn (different per task)."""
    sign = 1.0 if task == "reach-v3" else -1.0
    return np.tanh(sign * proprio[:ACTION_DIM] * 1.5 + 0.3 * proprio[ACTION_DIM:2 * ACTION_DIM]).astype(np.float32)


def make_episode(task: str, length: int, rng: np.random.Generator, *, episode_id: str = "e",
                 human_steps: Sequence[int] = (), demo: bool = False, size: int = 32) -> list[dict[str, Any]]:
    rows = []
    for t in range(length):
        proprio = rng.uniform(-1, 1, PROPRIO_DIM).astype(np.float32)
        image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        clean = expert_action(proprio, task)
        human = t in human_steps
        executed = np.clip(clean + rng.normal(0, 0.2, ACTION_DIM), -1, 1) if demo else (
            clean if human else rng.uniform(-1, 1, ACTION_DIM))
        rows.append({
            "episode_id": episode_id, "actor_id": "a0", "task": task, "instruction": INSTRUCTIONS[task],
            "step_index": t, "event_time_us": t, "policy_version": "expert" if demo else "1",
            "images": [{"camera": "corner", "encoding": "jpeg", "width": size, "height": size, "data": jpeg(image)}],
            "proprio": proprio.tolist(), "action": [float(a) for a in executed],
            "policy_action": [float(a) for a in clean] if demo else None,
            "controller": "HUMAN" if human else "POLICY", "success": False,
        })
    return rows


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def embedder() -> HashEmbedder:
    return HashEmbedder()
