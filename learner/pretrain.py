"""Offline training from the ``demonstrations`` table: the base policy (behaviour cloning) and the value model.

Both read the tables through ``DeltaFeeder`` (newest episodes that fit the buffers, images still JPEG) and
train from prefetched batches; the commands ``sop pretrain`` / ``sop train-value`` register the results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lakehouse import DEMONSTRATIONS, STEPS, Lakehouse
from learner.algorithms import make_algorithm
from learner.batch import LABEL, Batch, BatchBuilder, Row
from learner.config import ModelConfig, RecapConfig, SamplerConfig, TrainConfig, ValueConfig
from learner.feeder import DeltaFeeder, FeederConfig
from learner.model import VLAPolicy
from learner.quarantine import RowSpec
from learner.sampler import AdaptiveSampler, Prefetcher
from learner.text import TextEmbedder
from learner.trainer import Learner
from learner.value import ValueModel, train_value

StepCallback = Callable[[int, dict[str, float]], None]


class NoDemonstrations(RuntimeError):
    """The ``demonstrations`` table is missing or holds nothing for the requested tasks."""


@dataclass
class OfflineResult:
    model: VLAPolicy | ValueModel
    versions: dict[str, int | None]  # Delta versions read
    episodes: dict[str, int]  # per table
    rows: dict[str, dict[str, dict[str, int]]]  # per task and source, rows in the buffers
    losses: list[float] = field(default_factory=list)


def _feed(lake: Lakehouse, sampler: AdaptiveSampler, tables: tuple[str, ...],
          tasks: tuple[str, ...] | None) -> DeltaFeeder:
    feeder = DeltaFeeder(lake, sampler, FeederConfig(tables=tables, tasks=tasks))
    feeder.load_initial()
    if not any(sizes.get("offline", 0) for sizes in sampler.sizes().values()):
        where = f" for tasks {list(tasks)}" if tasks else ""
        raise NoDemonstrations(f"no demonstrations in {lake.uri(DEMONSTRATIONS.name)}{where}: "
                               "write them first (`sop demos`, or sim.demos_io.make_demonstrations)")
    return feeder


def pretrain_policy(lake: Lakehouse, text: TextEmbedder, *, steps: int, model: ModelConfig | None = None,
                    train: TrainConfig | None = None, sampler: SamplerConfig | None = None,
                    recap: RecapConfig | None = None, tasks: tuple[str, ...] | None = None,
                    on_step: StepCallback | None = None) -> OfflineResult:
    """Behaviour cloning of a fresh policy on the demonstrations only, for ``steps`` updates.

    With ``train.algorithm == "recap"`` the demonstrations count as positive and the indicator is dropped
    at RECAP's rate, so the base policy acts both conditioned on "positive" and unconditioned.
    Returns the trained model (the EMA of its weights when ``train.ema_decay > 0``).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    model_cfg = model or ModelConfig()
    train_cfg = train or TrainConfig()
    algorithm = make_algorithm(train_cfg.algorithm, recap, seed=train_cfg.seed)
    build = BatchBuilder(model_cfg.encoder, text, chunk=model_cfg.chunk, action_dim=model_cfg.action_dim)
    buffers = AdaptiveSampler(sampler or SamplerConfig(), build, chunk=model_cfg.chunk, accept=algorithm.accepts,
                              spec=RowSpec.for_policy(model_cfg))
    feeder = _feed(lake, buffers, (DEMONSTRATIONS.name,), tasks)
    torch.manual_seed(train_cfg.seed)  # the initial weights too: the same data and settings give the same base
    policy = VLAPolicy(model_cfg)
    with Prefetcher(buffers, depth=buffers.config.prefetch_batches) as batches:
        learner = Learner(policy, algorithm, batches, train_cfg, feedback=buffers)
        losses = learner.run(steps, on_step=on_step)
    stats = feeder.stats()
    return OfflineResult(model=learner.policy_to_publish().cpu().eval(), versions=feeder.versions(),
                         episodes={t: p.episodes_added for t, p in stats.tables.items()},
                         rows=buffers.sizes(), losses=losses)  # type: ignore[arg-type]


def pretrain_value(lake: Lakehouse, text: TextEmbedder, *, steps: int, value: ValueConfig | None = None,
                   train: TrainConfig | None = None, sampler: SamplerConfig | None = None,
                   tasks: tuple[str, ...] | None = None, on_step: StepCallback | None = None) -> OfflineResult:
    """The distributional value model, fitted offline on the Monte-Carlo returns (``mc_return``) of the
    demonstrations and of every closed online episode there is (the failures it must learn to expect)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    value_cfg = value or ValueConfig()
    train_cfg = train or TrainConfig()
    build = BatchBuilder(value_cfg.encoder, text, chunk=1, action_dim=1)
    # Labels are not used here; a one-dimensional dummy keeps the batch builder's checks happy.
    buffers = AdaptiveSampler(sampler or SamplerConfig(mode="fixed", fixed_online_share=0.5),
                              _ReturnsOnly(build), chunk=1, spec=RowSpec.for_encoder(value_cfg.encoder))
    feeder = _feed(lake, buffers, (DEMONSTRATIONS.name, STEPS.name), tasks)
    torch.manual_seed(train_cfg.seed)
    model = ValueModel(value_cfg)
    with Prefetcher(buffers, depth=buffers.config.prefetch_batches) as batches:
        history = train_value(model, batches, steps=steps, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                              grad_clip=train_cfg.grad_clip, device=train_cfg.device,
                              proprio_stats_steps=train_cfg.proprio_stats_steps, on_step=on_step)
    stats = feeder.stats()
    return OfflineResult(model=model.cpu().eval(), versions=feeder.versions(),
                         episodes={t: p.episodes_added for t, p in stats.tables.items()},
                         rows=buffers.sizes(), losses=[h["value_loss"] for h in history])


class _ReturnsOnly:
    """A batch builder for value training: the rows' actions play no part, so their labels are blanked."""

    def __init__(self, build: BatchBuilder) -> None:
        self._build = build

    def __call__(self, rows: Sequence[Row], online: Sequence[bool]) -> Batch:
        blank = [{**r, LABEL: np.zeros((1, 1), dtype=np.float32)} for r in rows]
        return self._build(blank, online)
