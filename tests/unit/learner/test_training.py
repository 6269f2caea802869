"""The algorithms' labels and indicators, and short trainings on a toy dataset."""

import numpy as np
import pytest
import torch
from conftest import HashEmbedder, make_episode

from learner.algorithms import HGDagger, Recap, make_algorithm, masked_mse
from learner.batch import Batch, BatchBuilder, prepare_episode
from learner.config import EncoderConfig, ModelConfig, RecapConfig, SamplerConfig, TrainConfig, ValueConfig
from learner.model import VLAPolicy
from learner.sampler import AdaptiveSampler, Prefetcher
from learner.trainer import AsyncPublisher, Learner
from learner.value import ValueModel, train_value
from rewards.recap import DROPPED, NEGATIVE, POSITIVE, UNKNOWN, episode_targets

ENC = EncoderConfig(image_size=32, proprio_dim=8, cnn_channels=(16, 32, 32))
MODEL = ModelConfig(encoder=ENC, action_dim=4, hidden=(128, 128))


def toy_batch(*, online: list[bool], human: list[bool], advantage: list[float], indicator: list[int] | None = None,
              tasks: list[str] | None = None) -> Batch:
    b = len(online)
    g = torch.Generator().manual_seed(0)
    return Batch(images=torch.randint(0, 256, (b, 1, 3, 32, 32), dtype=torch.uint8, generator=g),
                 proprio=torch.randn(b, 8, generator=g), text=torch.randn(b, 384, generator=g),
                 actions=torch.rand(b, 1, 4, generator=g) * 2 - 1, action_mask=torch.ones(b, 1, dtype=torch.bool),
                 human=torch.tensor(human), online=torch.tensor(online),
                 advantage=torch.tensor(advantage, dtype=torch.float32),
                 indicator=torch.tensor(indicator or [UNKNOWN] * b), returns=torch.full((b,), torch.nan),
                 tasks=tasks or ["t"] * b)


def test_demo_labels_are_the_clean_expert_action(rng: np.random.Generator) -> None:
    demo = prepare_episode(make_episode("reach-v3", 5, rng, demo=True), source="offline", chunk=1)
    online = prepare_episode(make_episode("reach-v3", 5, rng, human_steps=[2]), source="online", chunk=1)
    for row in demo:
        np.testing.assert_allclose(row["_label"][0], row["policy_action"], rtol=1e-6)
        assert not np.allclose(row["_label"][0], row["action"])  # the noisy executed action is not the label
    for row in online:
        np.testing.assert_allclose(row["_label"][0], row["action"], rtol=1e-6)


def test_chunk_labels_stop_at_the_end_and_at_a_change_of_control(rng: np.random.Generator) -> None:
    rows = prepare_episode(make_episode("reach-v3", 6, rng, human_steps=[2, 3, 4]), source="online", chunk=3)
    masks = [r["_label_mask"].tolist() for r in rows]
    assert masks == [[True, True, False], [True, False, False], [True, True, True], [True, True, False],
                     [True, False, False], [True, False, False]]
    np.testing.assert_allclose(rows[2]["_label"][1], rows[3]["action"], rtol=1e-6)


def test_hg_dagger_learns_only_from_demos_and_human_steps() -> None:
    model = VLAPolicy(MODEL).eval()
    batch = toy_batch(online=[False, True, True, True], human=[False, True, False, False], advantage=[np.nan] * 4)
    loss, per_sample, metrics = HGDagger().loss(model, batch)
    assert torch.isnan(per_sample[2:]).all() and torch.isfinite(per_sample[:2]).all()
    assert metrics["label_share"] == 0.5
    batch.actions[2:] = 1.0  # autonomous actions do not matter
    again, _, _ = HGDagger().loss(model, batch)
    torch.testing.assert_close(loss, again)
    assert not HGDagger().accepts({"controller": "POLICY"}, "online")
    assert HGDagger().accepts({"controller": "HUMAN"}, "online") and HGDagger().accepts({}, "offline")


def test_recap_indicators() -> None:
    algo = Recap(RecapConfig(indicator_dropout=0.0))
    algo.set_epsilons({"a": 0.5, "b": -1.0})
    batch = toy_batch(
        online=[True, True, True, True, False, True, True],
        human=[False, False, True, False, False, False, False],
        advantage=[0.6, 0.4, -9.0, -0.5, np.nan, np.nan, 0.0],
        indicator=[UNKNOWN, UNKNOWN, NEGATIVE, UNKNOWN, UNKNOWN, UNKNOWN, NEGATIVE],
        tasks=["a", "a", "a", "b", "a", "a", "b"])
    # above eps, below eps, human (beats a stored negative), other task's eps, demo, nothing known, stored
    assert algo.indicators(batch).tolist() == [POSITIVE, NEGATIVE, POSITIVE, POSITIVE, POSITIVE, DROPPED, NEGATIVE]


def test_recap_drops_the_indicator_at_the_configured_rate() -> None:
    algo = Recap(RecapConfig(indicator_dropout=0.3), seed=1)
    model = VLAPolicy(MODEL)
    batch = toy_batch(online=[True] * 64, human=[False] * 64, advantage=[1.0] * 64)
    shares = [algo.loss(model, batch)[2]["dropped_share"] for _ in range(40)]
    assert np.mean(shares) == pytest.approx(0.3, abs=0.03)


def test_masked_mse_ignores_masked_actions() -> None:
    pred, target = torch.zeros(1, 3, 2), torch.tensor([[[1.0, 1.0], [2.0, 2.0], [9.0, 9.0]]])
    assert masked_mse(pred, target, torch.tensor([[True, True, False]])).item() == pytest.approx(2.5)


def toy_sampler(rng: np.random.Generator, algorithm_accepts: object, *, chunk: int = 1) -> AdaptiveSampler:
    build = BatchBuilder(ENC, HashEmbedder(), chunk=chunk, action_dim=4)
    sampler = AdaptiveSampler(SamplerConfig(batch_size=64), build, chunk=chunk, accept=algorithm_accepts)  # type: ignore[arg-type]
    for i in range(6):
        for task in ("reach-v3", "drawer-open-v3"):
            sampler.add_episode(make_episode(task, 40, rng, episode_id=f"d{i}", demo=True), source="offline")
    sampler.add_episode(make_episode("reach-v3", 60, rng, episode_id="o1", human_steps=range(20, 40)),
                        source="online")
    return sampler


def test_short_bc_training_reduces_the_loss(rng: np.random.Generator) -> None:
    algorithm = HGDagger()
    sampler = toy_sampler(rng, algorithm.accepts, chunk=2)
    model = VLAPolicy(ModelConfig(encoder=ENC, action_dim=4, chunk=2, hidden=(128, 128)))
    published: list[int] = []
    with Prefetcher(sampler, depth=2) as batches:
        learner = Learner(model, algorithm, batches, TrainConfig(lr=1e-3, publish_every=50), feedback=sampler,
                          publish=lambda m, step, metrics: published.append(step), omega=sampler.omega)
        losses = learner.run(200)
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:20])
    assert published == [50, 100, 150, 200]
    assert sampler.step == 200
    l_on, l_off = sampler.losses()["reach-v3"]
    assert l_on is not None and l_off is not None
    assert float(model.encoder.proprio_norm.count) > 0


def test_recap_training_runs_with_advantages(rng: np.random.Generator) -> None:
    algorithm = make_algorithm("recap", RecapConfig())
    sampler = AdaptiveSampler(SamplerConfig(batch_size=32), BatchBuilder(ENC, HashEmbedder(), chunk=1, action_dim=4),
                              accept=algorithm.accepts)
    for i in range(4):
        rows = make_episode("reach-v3", 30, rng, episode_id=f"o{i}", human_steps=range(10, 15))
        targets = episode_targets("SUCCESS" if i % 2 else "TIMEOUT", 30, max_episode_length=30,
                                  values=np.linspace(-0.6, -0.1, 30))
        for row, adv in zip(rows, targets.advantages, strict=True):
            row["advantage"] = float(adv)
        sampler.add_episode(rows, source="online")
        sampler.add_episode(make_episode("reach-v3", 30, rng, demo=True), source="offline")
    epsilons = algorithm.refresh_epsilons(sampler.advantages())
    adv, human = sampler.advantages()["reach-v3"]
    assert (adv[~human] > epsilons["reach-v3"]).mean() == pytest.approx(0.3, abs=0.02)
    learner = Learner(VLAPolicy(MODEL), algorithm, sampler, TrainConfig(algorithm="recap"), feedback=sampler)
    metrics = [learner.step() for _ in range(10)]
    assert all(np.isfinite(m["loss"]) for m in metrics)
    assert 0.3 < np.mean([m["positive_share"] for m in metrics]) < 1.0  # + demos and human steps


def test_value_training_reduces_the_loss(rng: np.random.Generator) -> None:
    build = BatchBuilder(ENC, HashEmbedder(), chunk=1, action_dim=4)
    rows = []
    for i, outcome in enumerate(["SUCCESS", "TIMEOUT"] * 3):
        episode = prepare_episode(make_episode("reach-v3", 30, rng, episode_id=f"e{i}"), source="online", chunk=1)
        targets = episode_targets(outcome, 30, max_episode_length=30)
        for row, ret in zip(episode, targets.normalised_returns, strict=True):
            row["normalised_return"] = float(ret)
            row["proprio"] = np.full(8, 1.0 if outcome == "SUCCESS" else -1.0, dtype=np.float32)  # outcome visible
        rows += episode

    def batches():  # noqa: ANN202
        g = np.random.default_rng(1)
        while True:
            picked = [rows[i] for i in g.integers(0, len(rows), 64)]
            yield build(picked, [True] * 64)

    torch.manual_seed(0)
    model = ValueModel(ValueConfig(encoder=ENC, hidden=(128,)))
    history = train_value(model, batches(), steps=80, lr=1e-3)
    first, last = np.mean([h["value_loss"] for h in history[:10]]), np.mean([h["value_loss"] for h in history[-10:]])
    assert last < 0.9 * first  # cross-entropy against two-hot targets has an entropy floor
    err_first = np.mean([h["value_abs_error"] for h in history[:10]])
    assert np.mean([h["value_abs_error"] for h in history[-10:]]) < 0.7 * err_first


def test_async_publisher_registers_a_snapshot() -> None:
    model = VLAPolicy(MODEL)
    seen: list[tuple[int, float]] = []
    with AsyncPublisher(lambda m, step, metrics: seen.append((step, float(m.head[-1].bias.detach().sum())))) as publish:
        before = float(model.head[-1].bias.detach().sum())
        publish(model, 25, {"loss": 1.0})
        with torch.no_grad():
            model.head[-1].bias.add_(1.0)  # training goes on while the version is being registered
    assert seen == [(25, pytest.approx(before))]
