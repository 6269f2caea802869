"""RECAP's pretraining: the demonstrations are valued by the frozen value model and the policy is conditioned on
each step's advantage indicator (about the target share positive per task), not on "every demonstration is good"."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lakehouse import Lakehouse, query
from learner.config import EncoderConfig, ModelConfig, RecapConfig, SamplerConfig, TrainConfig, ValueConfig
from learner.pretrain import pretrain_policy, value_demonstrations
from learner.synthetic import HashEmbedder, fill_tables
from learner.value import ValueModel, ValueRuntime

ENC = EncoderConfig(image_size=32, proprio_dim=8, cnn_channels=(8, 16))
MODEL = ModelConfig(encoder=ENC, action_dim=4, hidden=(32,))
TASKS = ("drawer-open-v3", "box-close-v3")
N_STEP = 5


@pytest.fixture
def lake(tmp_path: Path) -> Lakehouse:
    lh = Lakehouse(tmp_path / "lake")
    fill_tables(lh, tasks=TASKS, demos_per_task=3, online_per_task=0, length=24, image_size=32, proprio_dim=8)
    return lh


@pytest.fixture
def value() -> ValueRuntime:
    torch.manual_seed(3)
    return ValueRuntime(ValueModel(ValueConfig(encoder=ENC, hidden=(16,))), HashEmbedder(), version="7")


def test_demonstration_advantages_come_from_the_value_model(lake: Lakehouse, value: ValueRuntime) -> None:
    recap = RecapConfig(n_step=N_STEP, max_episode_length=150)
    rows = query(lake, "SELECT * FROM demonstrations WHERE episode_id = 'demo:box-close-v3:0:1'").to_pylist()
    out = value_demonstrations(rows[::-1], value, recap, source="value_model:sop-value/7")  # any order in
    assert [r["step_index"] for r in out] == sorted(r["step_index"] for r in rows)
    v = value.values_for_rows(sorted(rows, key=lambda r: r["step_index"])).astype(np.float64)
    assert np.ptp(v) > 0  # the model tells the steps apart: a constant would hide a wrong index below
    scale = 150 + recap.failure_penalty("box-close-v3")
    r = np.array([row["reward"] for row in out]) / scale
    n = len(out)
    for t in range(n):  # A_t = sum_{k<N} r_{t+k} + V(o_{t+N}) - V(o_t); nothing after a success's last step
        expected = r[t:t + N_STEP].sum() + (v[t + N_STEP] if t + N_STEP < n else 0.0) - v[t]
        assert out[t]["advantage"] == pytest.approx(expected, abs=1e-6)
        assert out[t]["value"] == pytest.approx(v[t], abs=1e-6)
    assert {row["advantage_source"] for row in out} == {"value_model:sop-value/7"}


def _positive_shares(lake: Lakehouse, value: ValueRuntime | None) -> tuple[list[float], object]:
    shares: list[float] = []
    result = pretrain_policy(lake, HashEmbedder(), steps=12, model=MODEL,
                             train=TrainConfig(algorithm="recap", lr=1e-3, ema_decay=0.0, proprio_stats_steps=2),
                             sampler=SamplerConfig(batch_size=64), recap=RecapConfig(n_step=N_STEP),
                             value=value, on_step=lambda step, m: shares.append(m["positive_share"]))
    return shares, result


def test_recap_pretraining_conditions_on_the_value_models_indicator(lake: Lakehouse, value: ValueRuntime) -> None:
    shares, result = _positive_shares(lake, value)
    assert set(result.epsilons) == set(TASKS)
    for task in TASKS:  # the threshold puts about the target share (0.3) of each task's demonstration steps above it
        assert result.positive_share[task] == pytest.approx(0.3, abs=0.05)
    assert 0.15 < float(np.mean(shares)) < 0.45  # what the loss saw: the indicator, not "all positive"

    plain, unvalued = _positive_shares(lake, None)  # without a value model every demonstration is positive
    assert unvalued.epsilons == {} and float(np.mean(plain)) == 1.0
