"""A resumed learner gets back Adam's moments and the sampler's loss windows, for the version they belong to."""

import copy
from pathlib import Path

import numpy as np
import torch
from conftest import HashEmbedder, make_episode

from learner import trainer_state
from learner.algorithms import HGDagger
from learner.batch import BatchBuilder
from learner.config import EncoderConfig, ModelConfig, SamplerConfig, TrainConfig
from learner.model import VLAPolicy
from learner.sampler import AdaptiveSampler
from learner.trainer import Learner

ENC = EncoderConfig(image_size=32, proprio_dim=8, cnn_channels=(8, 16))
MODEL = ModelConfig(encoder=ENC, action_dim=4, hidden=(32,))
TRAIN = TrainConfig(lr=1e-3, proprio_stats_steps=0)


def sampler_with_data(rng: np.random.Generator) -> AdaptiveSampler:
    sampler = AdaptiveSampler(SamplerConfig(batch_size=8, window_steps=50), BatchBuilder(
        ENC, HashEmbedder(), chunk=1, action_dim=4), accept=HGDagger().accepts)
    for task in ("reach-v3", "drawer-open-v3"):
        sampler.add_episode(make_episode(task, 12, rng, episode_id=f"d-{task}", demo=True), source="offline")
        sampler.add_episode(make_episode(task, 12, rng, episode_id=f"o-{task}", human_steps=range(12)),
                            source="online")
    return sampler


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_resume_restores_the_optimizer_state_and_the_loss_windows(tmp_path: Path,
                                                                   rng: np.random.Generator) -> None:
    sampler = sampler_with_data(rng)
    torch.manual_seed(0)
    learner = Learner(VLAPolicy(MODEL), HGDagger(), sampler, TRAIN, feedback=sampler)
    learner.run(6)
    trainer_state.save(tmp_path, trainer_state.snapshot(learner, sampler), version="7")
    saved_model = copy.deepcopy(learner.model)
    omega, losses = sampler.omega(), sampler.losses()
    batch = sampler.next_batch()

    # the learner that went on, and two started from the registered weights: one restored, one not
    resumed_sampler = sampler_with_data(np.random.default_rng(1))
    resumed = Learner(copy.deepcopy(saved_model), HGDagger(), resumed_sampler, TRAIN, feedback=resumed_sampler,
                      start_step=6)
    assert trainer_state.restore(tmp_path, resumed, resumed_sampler, version="7")
    assert resumed_sampler.omega() == omega and resumed_sampler.losses() == losses
    fresh = Learner(copy.deepcopy(saved_model), HGDagger(), resumed_sampler, TRAIN, start_step=6)
    assert not trainer_state.restore(tmp_path, fresh, None, version="8")  # another version's state: not used

    for one in (learner, resumed, fresh):
        torch.manual_seed(3)  # the same augmentation for all three
        loss, _, _ = HGDagger().loss(one.model, batch)
        one.optimizer.zero_grad()
        loss.backward()
        one.optimizer.step()
    for went_on, back in zip(weights(learner.model), weights(resumed.model), strict=True):
        torch.testing.assert_close(back, went_on, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(weights(learner.model), weights(fresh.model), strict=True))


def test_a_missing_or_unreadable_state_restores_nothing(tmp_path: Path, rng: np.random.Generator) -> None:
    sampler = sampler_with_data(rng)
    learner = Learner(VLAPolicy(MODEL), HGDagger(), sampler, TRAIN, feedback=sampler)
    assert not trainer_state.restore(tmp_path, learner, sampler, version="1")
    (tmp_path / trainer_state.META_FILE).write_text("{not json")
    assert not trainer_state.restore(tmp_path, learner, sampler, version="1")
    assert learner.optimizer.state_dict()["state"] == {}
