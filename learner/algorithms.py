"""Training objectives: HG-DAgger (behaviour cloning on expert labels) and RECAP (advantage-conditioned BC).

Labels (``learner.batch.label_of``): the clean expert action for demonstrations, the executed action for
online steps (the operator's action while a human drove).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from learner.batch import Batch, Source
from learner.config import RecapConfig
from learner.model import Condition, VLAPolicy
from rewards.recap import DROPPED, NEGATIVE, POSITIVE, UNKNOWN, epsilon_for_share

LossOutput = tuple[torch.Tensor, torch.Tensor, dict[str, float]]


@runtime_checkable
class Algorithm(Protocol):
    """A training objective. ``loss`` returns (scalar loss, per-sample losses with NaN where a sample is
    not a training label, metrics); the per-sample losses feed the adaptive sampler."""

    name: str
    condition: Condition  # how the published policy is asked to act

    def accepts(self, row: Mapping[str, Any], source: Source) -> bool:
        """Whether a stored row is worth keeping in the sampler's buffers for this algorithm."""
        ...

    def loss(self, model: VLAPolicy, batch: Batch) -> LossOutput:
        ...


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE over the valid actions of each chunk: ``[B, H, A]`` x2, ``[B, H]`` -> ``[B]``."""
    per_action = (pred - target).pow(2).mean(-1)
    m = mask.to(per_action.dtype)
    return (per_action * m).sum(-1) / m.sum(-1).clamp_min(1.0)


class HGDagger:
    """Behaviour cloning on the aggregate of offline demonstrations and human-controlled online steps.

    Autonomous online steps are not labels: the buffers drop them (``accepts``) and the loss ignores any
    that get through.
    """

    name = "hg-dagger"
    condition: Condition = "unconditioned"

    def accepts(self, row: Mapping[str, Any], source: Source) -> bool:
        return source == "offline" or row.get("controller") == "HUMAN"

    def loss(self, model: VLAPolicy, batch: Batch) -> LossOutput:
        is_label = ~batch.online | batch.human
        pred = model.forward_batch(batch)
        per_sample = masked_mse(pred, batch.actions, batch.action_mask)
        weight = is_label.to(per_sample.dtype)
        loss = (per_sample * weight).sum() / weight.sum().clamp_min(1.0)
        metrics = {"bc_loss": float(loss.detach()), "label_share": float(weight.mean())}
        return loss, torch.where(is_label, per_sample.detach(), torch.nan), metrics


class Recap:
    """Advantage-conditioned behaviour cloning over all steps (RECAP, as SOP uses it).

    The indicator of a step is, in order: its stored indicator; POSITIVE if a human drove (and
    ``human_always_positive``) or it is a demonstration (and ``demos_always_positive``); else
    ``advantage > epsilon[task]``; DROPPED when nothing is known. Then it is dropped with probability
    ``indicator_dropout`` so the unconditioned policy is learned too (for classifier-free guidance).
    """

    name = "recap"
    condition: Condition = "positive"

    def __init__(self, config: RecapConfig, *, seed: int = 0) -> None:
        self.config = config
        self.epsilons: dict[str, float] = {}
        self._generator = torch.Generator().manual_seed(seed)

    def set_epsilons(self, epsilons: Mapping[str, float]) -> None:
        self.epsilons = dict(epsilons)

    def refresh_epsilons(self, advantages: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
        """Re-derive each task's threshold from ``(advantages, human)`` arrays (``AdaptiveSampler.advantages``)
        so that ``target_positive_share`` of its autonomous steps are positive; returns the thresholds."""
        for task, (adv, human) in advantages.items():
            autonomous = adv[~human]
            if np.isfinite(autonomous).any():
                self.epsilons[task] = epsilon_for_share(autonomous, self.config.target_positive_share)
        return dict(self.epsilons)

    def accepts(self, row: Mapping[str, Any], source: Source) -> bool:
        return True

    def indicators(self, batch: Batch) -> torch.Tensor:
        """The (undropped) indicator of each sample, on the CPU."""
        stored = batch.indicator.cpu()
        advantage = batch.advantage.cpu()
        eps = torch.tensor([self.epsilons.get(t, 0.0) for t in batch.tasks], dtype=advantage.dtype)
        from_advantage = torch.where(advantage > eps, POSITIVE, NEGATIVE)
        ind = torch.where(torch.isfinite(advantage), from_advantage, DROPPED)
        if self.config.demos_always_positive:
            ind = torch.where(~batch.online.cpu(), POSITIVE, ind)
        if self.config.human_always_positive:
            ind = torch.where(batch.human.cpu(), POSITIVE, ind)
        known = (stored != UNKNOWN) & (stored != DROPPED)
        if self.config.human_always_positive:
            known &= ~batch.human.cpu()
        return torch.where(known, stored, ind).long()

    def loss(self, model: VLAPolicy, batch: Batch) -> LossOutput:
        ind = self.indicators(batch)
        drop = torch.rand(ind.shape, generator=self._generator) < self.config.indicator_dropout
        conditioned = torch.where(drop, DROPPED, ind)
        pred = model.forward_batch(batch, conditioned.to(batch.images.device))
        per_sample = masked_mse(pred, batch.actions, batch.action_mask)
        loss = per_sample.mean()
        metrics = {
            "bc_loss": float(loss.detach()),
            "positive_share": float((ind == POSITIVE).float().mean()),
            "dropped_share": float((conditioned == DROPPED).float().mean()),
        }
        return loss, per_sample.detach(), metrics


def make_algorithm(name: str, recap: RecapConfig | None = None, *, seed: int = 0) -> Algorithm:
    if name == "hg-dagger":
        return HGDagger()
    if name == "recap":
        return Recap(recap or RecapConfig(), seed=seed)
    raise ValueError(f"unknown algorithm {name!r}; expected 'hg-dagger' or 'recap'")
