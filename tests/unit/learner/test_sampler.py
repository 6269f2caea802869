"""The adaptive online/offline sampler: the paper's formula, equal task weights, buffers, prefetching."""

import math
import time

import numpy as np
import pytest
import torch
from conftest import HashEmbedder, make_episode
from hypothesis import given
from hypothesis import strategies as st

from learner.algorithms import HGDagger
from learner.batch import HUMAN, BatchBuilder
from learner.config import EncoderConfig, SamplerConfig
from learner.sampler import AdaptiveSampler, LossWindow, NoData, Prefetcher, RingBuffer, online_share

ENC = EncoderConfig(image_size=32, proprio_dim=8, cnn_channels=(16, 32))


def paper_formula(l_on: float, l_off: float, alpha: float) -> float:
    return math.exp(alpha * l_on) / (math.exp(alpha * l_on) + math.exp(l_off))


@pytest.mark.parametrize(("l_on", "l_off", "alpha"), [(0.3, 0.5, 2.0), (0.1, 0.1, 1.5), (0.05, 0.2, 3.0),
                                                      (0.8, 1.2, 1.2)])
def test_online_share_equals_the_formula_inside_the_clip(l_on: float, l_off: float, alpha: float) -> None:
    expected = paper_formula(l_on, l_off, alpha)
    assert 0.2 < expected < 0.8
    assert online_share(l_on, l_off, alpha) == pytest.approx(expected, rel=1e-12)


def test_online_share_is_clipped() -> None:
    assert paper_formula(3.0, 0.0, 2.0) > 0.8
    assert online_share(3.0, 0.0, 2.0) == 0.8
    assert paper_formula(0.0, 3.0, 2.0) < 0.2
    assert online_share(0.0, 3.0, 2.0) == 0.2
    assert online_share(1000.0, 0.0, 2.0) == 0.8  # no overflow
    assert online_share(0.0, 1000.0, 2.0) == 0.2
    assert online_share(3.0, 0.0, 2.0, clip=(0.1, 0.9)) == 0.9


def make_sampler(config: SamplerConfig, **kwargs: object) -> AdaptiveSampler:
    build = BatchBuilder(ENC, HashEmbedder(), chunk=1, action_dim=4)
    return AdaptiveSampler(config, build, **kwargs)  # type: ignore[arg-type]


def fill(sampler: AdaptiveSampler, task: str, rng: np.random.Generator, *, offline: int, online: int) -> None:
    if offline:
        sampler.add_episode(make_episode(task, offline, rng, demo=True), source="offline")
    if online:
        sampler.add_episode(make_episode(task, online, rng, human_steps=range(online)), source="online")


def test_sampler_uses_the_formula_on_recorded_losses(rng: np.random.Generator) -> None:
    sampler = make_sampler(SamplerConfig(batch_size=64, alpha=2.0))
    fill(sampler, "reach-v3", rng, offline=20, online=20)
    fill(sampler, "drawer-open-v3", rng, offline=20, online=20)
    assert sampler.omega() == {"reach-v3": 0.5, "drawer-open-v3": 0.5}  # no feedback yet
    sampler.record_losses("reach-v3", "online", [0.4, 0.6])
    sampler.record_losses("reach-v3", "offline", [0.1, 0.3])
    sampler.record_losses("drawer-open-v3", "online", [2.0])
    sampler.record_losses("drawer-open-v3", "offline", [0.1])
    omega = sampler.omega()
    assert omega["reach-v3"] == pytest.approx(paper_formula(0.5, 0.2, 2.0))
    assert omega["drawer-open-v3"] == 0.8  # clipped
    assert sampler.losses()["reach-v3"] == pytest.approx((0.5, 0.2))

    online_by_task = {"reach-v3": [], "drawer-open-v3": []}
    for _ in range(300):
        rows, online = sampler.sample_rows()
        for row, is_online in zip(rows, online, strict=True):
            online_by_task[row["task"]].append(is_online)
    for task, flags in online_by_task.items():
        assert np.mean(flags) == pytest.approx(omega[task], abs=0.02)


def test_fixed_share_mode_ignores_losses(rng: np.random.Generator) -> None:
    sampler = make_sampler(SamplerConfig(mode="fixed", fixed_online_share=0.5))
    fill(sampler, "reach-v3", rng, offline=10, online=10)
    sampler.record_losses("reach-v3", "online", [5.0])
    sampler.record_losses("reach-v3", "offline", [0.0])
    assert sampler.omega() == {"reach-v3": 0.5}


def test_tasks_are_weighted_equally_whatever_their_data(rng: np.random.Generator) -> None:
    sampler = make_sampler(SamplerConfig(batch_size=64))
    fill(sampler, "reach-v3", rng, offline=300, online=0)
    fill(sampler, "drawer-open-v3", rng, offline=5, online=0)
    fill(sampler, "button-press-v3", rng, offline=40, online=0)
    totals = {"reach-v3": 0, "drawer-open-v3": 0, "button-press-v3": 0}
    for _ in range(200):
        rows, _ = sampler.sample_rows()
        counts = {t: sum(r["task"] == t for r in rows) for t in totals}
        assert max(counts.values()) - min(counts.values()) <= 1
        for t, c in counts.items():
            totals[t] += c
    assert max(totals.values()) - min(totals.values()) < 0.02 * 200 * 64 / 3


def test_task_without_online_data_is_sampled_offline_only(rng: np.random.Generator) -> None:
    sampler = make_sampler(SamplerConfig())
    fill(sampler, "reach-v3", rng, offline=20, online=0)
    fill(sampler, "drawer-open-v3", rng, offline=20, online=20)
    assert sampler.omega()["reach-v3"] == 0.0
    for _ in range(50):
        rows, online = sampler.sample_rows()
        assert not any(o for r, o in zip(rows, online, strict=True) if r["task"] == "reach-v3")
        assert any(o for r, o in zip(rows, online, strict=True) if r["task"] == "drawer-open-v3")


def test_task_with_only_online_data_is_sampled_online(rng: np.random.Generator) -> None:
    sampler = make_sampler(SamplerConfig())
    fill(sampler, "reach-v3", rng, offline=0, online=10)
    rows, online = sampler.sample_rows()
    assert all(online) and sampler.omega() == {"reach-v3": 1.0}


def test_empty_sampler_says_so() -> None:
    with pytest.raises(NoData):
        make_sampler(SamplerConfig()).sample_rows()


def test_hg_dagger_buffers_keep_only_labels(rng: np.random.Generator) -> None:
    sampler = make_sampler(SamplerConfig(), accept=HGDagger().accepts)
    kept = sampler.add_episode(make_episode("reach-v3", 30, rng, human_steps=range(10, 15)), source="online")
    assert kept == 5 and sampler.sizes() == {"reach-v3": {"online": 5, "offline": 0}}
    rows, _ = sampler.sample_rows()
    assert all(r[HUMAN] for r in rows)
    assert sampler.add_episode(make_episode("reach-v3", 30, rng, demo=True), source="offline") == 30


def test_ring_buffer_is_bounded_and_keeps_the_newest(rng: np.random.Generator) -> None:
    buf: RingBuffer[int] = RingBuffer(5)
    buf.extend(range(12))
    assert len(buf) == 5 and sorted(buf.items()) == [7, 8, 9, 10, 11] and buf.total_added == 12
    assert set(buf.sample(rng, 100)) <= {7, 8, 9, 10, 11}


def test_sampler_buffers_are_bounded(rng: np.random.Generator) -> None:
    sampler = make_sampler(SamplerConfig(online_capacity=7, offline_capacity=9))
    fill(sampler, "reach-v3", rng, offline=20, online=20)
    assert sampler.sizes() == {"reach-v3": {"online": 7, "offline": 9}}


def test_loss_window_slides_over_learner_steps() -> None:
    window = LossWindow(200)
    window.add(0, np.array([1.0]))
    window.add(150, np.array([3.0, np.nan]))
    assert window.mean(150) == 2.0
    assert window.mean(201) == 3.0
    assert window.mean(400) is None


def test_record_batch_groups_by_task_and_source(rng: np.random.Generator) -> None:
    sampler = make_sampler(SamplerConfig(batch_size=16))
    fill(sampler, "reach-v3", rng, offline=10, online=10)
    fill(sampler, "drawer-open-v3", rng, offline=10, online=0)
    batch = sampler.next_batch()
    losses = torch.where(batch.online, 1.0, 0.25)
    losses[[i for i, t in enumerate(batch.tasks) if t == "drawer-open-v3"]] = 0.5
    sampler.record_batch(batch, losses)
    got = sampler.losses()
    assert sampler.step == 1
    assert got["drawer-open-v3"] == (None, 0.5)
    l_on, l_off = got["reach-v3"]
    assert l_off == 0.25 and l_on in (None, 1.0)


def test_batches_decode_images_lazily(rng: np.random.Generator) -> None:
    sampler = make_sampler(SamplerConfig(batch_size=8))
    fill(sampler, "reach-v3", rng, offline=10, online=0)
    stored, _ = sampler.sample_rows()
    assert all(isinstance(r["images"][0]["data"], bytes) for r in stored)  # still JPEG in the buffer
    batch = sampler.next_batch()
    assert batch.images.shape == (8, 1, 3, 32, 32) and batch.images.dtype == torch.uint8
    assert batch.text.shape == (8, 384) and batch.actions.shape == (8, 1, 4)


def test_prefetcher_waits_for_data_then_streams(rng: np.random.Generator) -> None:
    sampler = make_sampler(SamplerConfig(batch_size=4))
    with Prefetcher(sampler, depth=2, idle_sleep_s=0.01) as prefetch:
        time.sleep(0.05)
        fill(sampler, "reach-v3", rng, offline=10, online=0)
        batches = [prefetch.next_batch(timeout_s=10) for _ in range(5)]
    assert all(b.size == 4 for b in batches)
    assert prefetch.batches_built >= 5


def test_prefetcher_reports_errors_of_the_source() -> None:
    class Broken:
        def next_batch(self) -> None:
            raise ValueError("corrupt row")

    with Prefetcher(Broken()) as prefetch, pytest.raises(RuntimeError, match="prefetch thread failed"):  # type: ignore[arg-type]
        prefetch.next_batch(timeout_s=5)


def test_the_normalised_mix_moves_at_action_mse_scale_where_the_paper_formula_does_not(
        rng: np.random.Generator) -> None:
    """The README's losses (0.003-0.06) left the paper's omega_on at 0.50-0.53; in units of the offline loss an
    online loss three times the offline one reaches the clip, one a third of it falls well below the start."""
    for mode, high, low in (("paper", (0.49, 0.52), (0.49, 0.51)), ("normalised", (0.8, 0.8), (0.25, 0.45))):
        sampler = make_sampler(SamplerConfig(batch_size=64, alpha=2.0, mode=mode))
        for task in ("reach-v3", "drawer-open-v3"):
            fill(sampler, task, rng, offline=10, online=10)
        sampler.record_losses("reach-v3", "online", [0.03])
        sampler.record_losses("reach-v3", "offline", [0.01])
        sampler.record_losses("drawer-open-v3", "online", [0.01])
        sampler.record_losses("drawer-open-v3", "offline", [0.03])
        omega = sampler.omega()
        assert high[0] <= omega["reach-v3"] <= high[1], (mode, omega)
        assert low[0] <= omega["drawer-open-v3"] <= low[1], (mode, omega)


@given(l_on=st.floats(1e-4, 10), l_off=st.floats(1e-4, 10), k=st.floats(1e-3, 1e3), alpha=st.floats(1.01, 20))
def test_the_normalised_share_does_not_depend_on_the_loss_scale(l_on: float, l_off: float, k: float,
                                                                alpha: float) -> None:
    share = online_share(l_on, l_off, alpha, scale=l_off)
    assert share == pytest.approx(online_share(k * l_on, k * l_off, alpha, scale=k * l_off), abs=1e-9)
    assert share == pytest.approx(online_share(alpha * l_on / l_off, 1.0, 1.0), abs=1e-9)  # z = alpha*r - 1
    assert online_share(l_on, l_off, alpha, scale=0.0) == online_share(l_on, l_off, alpha)  # no scale: the paper's
