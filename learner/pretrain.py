"""Offline training from the ``demonstrations`` table: the base policy (behaviour cloning) and the value model.

Both read the tables through ``DeltaFeeder`` (newest episodes that fit the buffers, images still JPEG) and
train from prefetched batches; the commands ``sop pretrain`` / ``sop train-value`` register the results.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from lakehouse import DEMONSTRATIONS, STEPS, Lakehouse
from learner.algorithms import make_algorithm
from learner.batch import LABEL, Batch, BatchBuilder, Row, Source
from learner.config import ModelConfig, RecapConfig, SamplerConfig, TrainConfig, ValueConfig
from learner.feeder import DeltaFeeder, FeederConfig
from learner.model import VLAPolicy
from learner.quarantine import RowSpec
from learner.sampler import AdaptiveSampler, Prefetcher
from learner.text import TextEmbedder
from learner.trainer import Learner
from learner.value import ValueModel, ValueRuntime, train_value
from rewards.recap import episode_targets, epsilon_for_share

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
    # RECAP with a value model: the per-task threshold and the share of demonstration steps that were positive
    epsilons: dict[str, float] = field(default_factory=dict)
    positive_share: dict[str, float] = field(default_factory=dict)


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
                    value: ValueRuntime | None = None, value_name: str = "sop-value",
                    on_step: StepCallback | None = None) -> OfflineResult:
    """Behaviour cloning of a fresh policy on the demonstrations only, for ``steps`` updates.

    With ``train.algorithm == "recap"`` and a (frozen) ``value`` model, this is RECAP's pretraining: every
    demonstration step gets its value ``V(o_t)`` and N-step advantage from that model (:func:`value_demonstrations`),
    each task's threshold ``epsilon`` is set so that ``recap.target_positive_share`` of its demonstration steps are
    positive, and the policy is trained conditioned on the indicator ``A > epsilon`` (dropped at RECAP's rate, so
    the unconditioned policy is learned too). Without a value model the demonstrations all count as positive
    (``recap.demos_always_positive``). Returns the trained model (the EMA of its weights when ``train.ema_decay > 0``).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    model_cfg = model or ModelConfig()
    train_cfg = train or TrainConfig()
    recap_cfg = recap or RecapConfig()
    conditioned = train_cfg.algorithm == "recap" and value is not None
    if conditioned:
        # The demonstrations are expert-driven (controller HUMAN): here their advantage decides, not who drove.
        recap_cfg = replace(recap_cfg, demos_always_positive=False, human_always_positive=False)
    algorithm = make_algorithm(train_cfg.algorithm, recap_cfg, seed=train_cfg.seed)
    build = BatchBuilder(model_cfg.encoder, text, chunk=model_cfg.chunk, action_dim=model_cfg.action_dim)
    common: dict[str, Any] = {"chunk": model_cfg.chunk, "accept": algorithm.accepts,
                              "spec": RowSpec.for_policy(model_cfg)}
    if conditioned and value is not None:
        buffers: AdaptiveSampler = _ValuedSampler(sampler or SamplerConfig(), build, value=value, recap=recap_cfg,
                                                  source=f"value_model:{value_name}/{value.version}", **common)
    else:
        buffers = AdaptiveSampler(sampler or SamplerConfig(), build, **common)
    feeder = _feed(lake, buffers, (DEMONSTRATIONS.name,), tasks)
    epsilons: dict[str, float] = {}
    positive: dict[str, float] = {}
    if conditioned:
        for task, (adv, _human) in buffers.advantages("offline").items():
            known = adv[np.isfinite(adv)]
            if known.size:
                epsilons[task] = epsilon_for_share(known, recap_cfg.target_positive_share)
                positive[task] = float((known > epsilons[task]).mean())
        algorithm.set_epsilons(epsilons)  # type: ignore[attr-defined]
    torch.manual_seed(train_cfg.seed)  # the initial weights too: the same data and settings give the same base
    policy = VLAPolicy(model_cfg)
    with Prefetcher(buffers, depth=buffers.config.prefetch_batches) as batches:
        learner = Learner(policy, algorithm, batches, train_cfg, feedback=buffers)
        losses = learner.run(steps, on_step=on_step)
    stats = feeder.stats()
    return OfflineResult(model=learner.policy_to_publish().cpu().eval(), versions=feeder.versions(),
                         episodes={t: p.episodes_added for t, p in stats.tables.items()},
                         rows=buffers.sizes(), losses=losses, epsilons=epsilons,  # type: ignore[arg-type]
                         positive_share=positive)


def value_demonstrations(rows: Sequence[Mapping[str, Any]], value: ValueRuntime, recap: RecapConfig, *,
                         source: str) -> list[dict[str, Any]]:
    """One stored episode's rows with ``value`` = V(o_t) and ``advantage`` = the N-step advantage from the frozen
    value model, as the stream processor computes them for online steps (same rewards, normalisation, tail)."""
    ordered = sorted(rows, key=lambda r: r["step_index"])
    if not ordered:
        return []
    task = str(ordered[0]["task"])
    values = np.asarray(value.values_for_rows(ordered), dtype=np.float64)
    targets = episode_targets(str(ordered[0]["outcome"]), len(ordered), max_episode_length=recap.max_steps(task),
                              c_fail=recap.failure_penalty(task), n_step=recap.n_step, values=values,
                              timeout_is_failure=recap.timeout_is_failure)
    if targets.advantages is None:  # cannot happen with values given; keeps the types honest
        raise ValueError("no advantages computed")
    return [{**r, "value": float(v), "advantage": float(a), "advantage_source": source}
            for r, v, a in zip(ordered, values, targets.advantages, strict=True)]


class _ValuedSampler(AdaptiveSampler):
    """The sampler of RECAP's pretraining: each demonstration episode is valued by the frozen model as it enters."""

    def __init__(self, *args: Any, value: ValueRuntime, recap: RecapConfig, source: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._value, self._recap, self._source = value, recap, source

    def add_episode(self, rows: Sequence[Mapping[str, Any]], *, source: Source) -> int:
        admitted = self.admit(rows, source=source)  # a row the value model cannot read is quarantined first
        return super().add_episode(value_demonstrations(admitted, self._value, self._recap, source=self._source),
                                   source=source)


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
