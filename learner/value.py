"""The distributional value model of RECAP: a categorical distribution over the normalised return.

Targets are Monte-Carlo returns (``rewards.recap.normalised_returns``) projected onto the two nearest bins
(a "two-hot" target), so the cross-entropy's minimiser has the right expectation while the readout stays
the distribution's mean. The value model is trained offline and frozen during online training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from learner.batch import Batch, BatchSource, ObservationLike, row_observation_tensors
from learner.config import ValueConfig
from learner.model import ObservationEncoder, mlp, observation_tensors
from learner.text import TextEmbedder
from learner.trainer import finite_gradients


class ValueModel(nn.Module):
    """``forward(images, proprio, text) -> [B, bins]`` logits; ``expected`` reads out the mean value."""

    def __init__(self, config: ValueConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ObservationEncoder(config.encoder)
        self.head = mlp([self.encoder.out_features, *config.hidden, config.bins])
        self.register_buffer("support", torch.linspace(config.v_min, config.v_max, config.bins), persistent=False)

    def forward(self, images: torch.Tensor, proprio: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images, proprio, text))

    def expected(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits.softmax(-1) * self.support).sum(-1)

    def values(self, images: torch.Tensor, proprio: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.expected(self(images, proprio, text))


def two_hot(returns: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """``[B, bins]`` target distributions whose mean is each return (clipped to the support)."""
    bins = support.shape[0]
    lo_v, hi_v = support[0], support[-1]
    x = returns.clamp(lo_v, hi_v)
    pos = (x - lo_v) / (hi_v - lo_v) * (bins - 1)
    lower = pos.floor().long().clamp(0, bins - 1)
    upper = (lower + 1).clamp(max=bins - 1)
    w_upper = pos - lower.to(pos.dtype)
    target = torch.zeros(returns.shape[0], bins, dtype=support.dtype, device=returns.device)
    target.scatter_add_(1, lower[:, None], (1.0 - w_upper)[:, None])
    target.scatter_add_(1, upper[:, None], w_upper[:, None])
    return target


def value_loss(model: ValueModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Cross-entropy against two-hot Monte-Carlo returns over the rows that have one."""
    known = torch.isfinite(batch.returns)
    if not bool(known.any()):
        raise ValueError("no row of this batch has a normalised_return; value training needs closed episodes")
    logits = model(batch.images, batch.proprio, batch.text)
    target = two_hot(batch.returns.nan_to_num(0.0), model.support)
    per_sample = -(target * F.log_softmax(logits, dim=-1)).sum(-1)
    loss = per_sample[known].mean()
    with torch.no_grad():
        err = (model.expected(logits) - batch.returns)[known].abs().mean()
    metrics = {"value_loss": float(loss.detach()), "value_abs_error": float(err)}
    return loss, torch.where(known, per_sample.detach(), torch.nan), metrics


def train_value(model: ValueModel, batches: BatchSource | Iterable[Batch], *, steps: int, lr: float = 3e-4,
                weight_decay: float = 1e-4, grad_clip: float | None = 1.0, device: str = "cpu",
                proprio_stats_steps: int = 1_000,
                on_step: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Fit the value model for ``steps`` gradient steps; returns the per-step metrics (also handed to
    ``on_step(step, metrics)`` as they come, e.g. for a progress bar)."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    iterator = iter(batches) if not isinstance(batches, BatchSource) else None
    history: list[dict[str, float]] = []
    skipped = 0
    for step in range(steps):
        batch = (batches.next_batch() if iterator is None else next(iterator)).to(device)  # type: ignore[union-attr]
        if step < proprio_stats_steps:
            model.encoder.proprio_norm.update(batch.proprio)
        loss, _, metrics = value_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if finite_gradients(loss, model.parameters(), grad_clip)[0]:
            optimizer.step()
        else:  # as in Learner.step: a non-finite step would make the weights NaN for good
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
        metrics["skipped_steps"] = float(skipped)
        history.append(metrics)
        if on_step is not None:
            on_step(step + 1, metrics)
    model.eval()
    return history


class ValueRuntime:
    """A loaded value version: ``V(o)`` in normalised units, for observations or stored step rows."""

    def __init__(self, model: ValueModel, text: TextEmbedder, *, version: str) -> None:
        self.model = model.eval()
        self.text = text
        self.version = version

    @torch.inference_mode()
    def values(self, observations: Sequence[ObservationLike]) -> np.ndarray:
        device = next(self.model.parameters()).device
        tensors = observation_tensors(observations, self.model.config.encoder, self.text)
        return self.model.values(*(t.to(device) for t in tensors)).cpu().numpy().astype(np.float32)

    @torch.inference_mode()
    def values_for_rows(self, rows: Sequence[Mapping[str, Any]], *, batch_size: int = 256) -> np.ndarray:
        """``V(o_t)`` for stored ``Step`` rows, in their order (images still compressed)."""
        device = next(self.model.parameters()).device
        out: list[np.ndarray] = []
        for start in range(0, len(rows), batch_size):
            tensors = row_observation_tensors(rows[start:start + batch_size], self.model.config.encoder, self.text)
            out.append(self.model.values(*(t.to(device) for t in tensors)).cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, dtype=np.float32)
