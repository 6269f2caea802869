"""The learner's update step and loop (Acme style: ``step()`` does one update, ``run()`` repeats it)."""

from __future__ import annotations

import copy
import ctypes
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import torch
from torch import nn

from learner.algorithms import Algorithm
from learner.batch import Batch, BatchSource
from learner.config import TrainConfig
from learner.model import VLAPolicy

Publish = Callable[[VLAPolicy, int, Mapping[str, float]], Any]

log = logging.getLogger("sop.learner")

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_RETAINED = False


def retain_freed_memory() -> bool:
    """Keep the memory a training step frees for the next step, instead of handing it back to the kernel.

    glibc serves an allocation above its mmap threshold (128 KiB, raised up to 32 MiB as big blocks are freed)
    with a fresh mmap and trims the heap top back to the kernel, so each step's activations and gradients
    (8 MiB tensors for the default CNN at batch 64) come back as new pages: ~9,000 page faults per step here,
    a third of the step's time in this VM. Raising both thresholds makes freed blocks reusable: the faults go
    to ~0. Process-wide and idempotent; returns whether it applied (False off glibc, e.g. macOS)."""
    global _RETAINED
    if _RETAINED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        ok = False
    if not ok:
        log.info("mallopt is not available: freed memory goes back to the kernel (more page faults per step)")
    _RETAINED = ok
    return ok


class LossFeedback(Protocol):
    """Receives each step's per-sample losses (the adaptive sampler)."""

    def record_batch(self, batch: Batch, per_sample: torch.Tensor) -> None:
        ...


class Learner:
    """Pulls a batch, takes one gradient step, feeds the per-sample losses back to the sampler, and every
    ``publish_every`` steps hands the (EMA of the) weights to ``publish`` (e.g. a call of ``registry.register_policy``).

    A step whose loss or gradient norm is NaN/Inf changes nothing (no optimizer or EMA update); it still
    counts as a step and is counted in ``skipped_steps`` (``metrics["skipped_steps"]``).

    ``forward_model`` is what the algorithm's loss calls ``forward_batch`` on, when that is not ``model`` itself:
    under DistributedDataParallel the forward pass must go through the DDP wrapper (``learner.ddp``) for the
    gradients to be averaged across processes, while statistics, the EMA and publishing use the plain model.
    """

    def __init__(self, model: VLAPolicy, algorithm: Algorithm, batches: BatchSource, config: TrainConfig, *,
                 feedback: LossFeedback | None = None, publish: Publish | None = None,
                 omega: Callable[[], Mapping[str, float]] | None = None, start_step: int = 0,
                 forward_model: Any = None) -> None:
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        if config.retain_memory:
            retain_freed_memory()
        torch.manual_seed(config.seed)
        self.config = config
        self.device = torch.device(config.device)
        self.model = model.to(self.device).train()
        self.forward_model = forward_model if forward_model is not None else self.model
        self.algorithm = algorithm
        self.batches = batches
        self.feedback = feedback
        self.publish = publish
        self.omega = omega
        # fused: one kernel for every parameter instead of ~10 per parameter (same update, to rounding)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                           fused=self.device.type in ("cpu", "cuda") or None)
        self.ema: VLAPolicy | None = copy.deepcopy(model).eval() if config.ema_decay > 0 else None
        self.steps = start_step
        self.skipped_steps = 0  # steps whose loss or gradient was not finite: no weight or EMA update
        self.published: list[Any] = []

    def step(self) -> dict[str, float]:
        start = time.perf_counter()
        batch = self.batches.next_batch().to(self.device)
        data_s = time.perf_counter() - start
        if self.steps < self.config.proprio_stats_steps:
            self.model.encoder.proprio_norm.update(batch.proprio)
        loss, per_sample, metrics = self.algorithm.loss(self.forward_model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        # Always backward, even on a non-finite loss: under DDP every rank must join the gradient all-reduce
        # (a NaN gradient then reaches every rank, and all of them skip the step together).
        loss.backward()
        grad_norm = clip_gradients(self.model.parameters(), self.config.grad_clip)
        # One host sync for every scalar of the step (on a GPU each float() would wait for the device).
        tensor_keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
        scalars = torch.stack([loss.detach().float(), grad_norm.float(), batch.online.float().mean(),
                               *(metrics[k].detach().float().reshape(()) for k in tensor_keys)]).tolist()
        loss_value, norm_value, online_fraction = scalars[:3]
        metrics.update(zip(tensor_keys, scalars[3:], strict=True))
        if self.config.grad_clip is not None:
            metrics["grad_norm"] = norm_value
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            self.optimizer.step()
            if self.ema is not None:
                _ema_update(self.ema, self.model, self.config.ema_decay)
        else:
            # One non-finite step would make every weight NaN (Adam's moments keep it for good): no update,
            # no EMA update, counted.
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
        metrics["skipped_steps"] = float(self.skipped_steps)
        if self.feedback is not None:
            self.feedback.record_batch(batch, per_sample)
        self.steps += 1
        metrics.update(loss=loss_value, data_wait_ms=1e3 * data_s,
                       step_ms=1e3 * (time.perf_counter() - start), online_fraction=online_fraction)
        if self.omega is not None:
            metrics.update({f"omega_on/{task}": w for task, w in self.omega().items()})
        if self.publish is not None and self.steps % self.config.publish_every == 0:
            self.published.append(self.publish(self.policy_to_publish(), self.steps, metrics))
        return metrics

    def run(self, num_steps: int, *, on_step: Callable[[int, dict[str, float]], None] | None = None) -> list[float]:
        """``num_steps`` updates; returns the losses."""
        losses: list[float] = []
        for _ in range(num_steps):
            metrics = self.step()
            losses.append(metrics["loss"])
            if on_step is not None:
                on_step(self.steps, metrics)
        return losses

    def policy_to_publish(self) -> VLAPolicy:
        return self.ema if self.ema is not None else self.model


def clip_gradients(parameters: Iterable[torch.Tensor], grad_clip: float | None) -> torch.Tensor:
    """After ``loss.backward()``: clip the gradients to ``grad_clip`` (None: no clipping); returns their total norm
    as a tensor (no host sync)."""
    params = [p for p in parameters if p.grad is not None]
    if grad_clip is not None:
        return nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    return nn.utils.get_total_norm([p.grad for p in params], foreach=True)


def finite_gradients(loss: torch.Tensor, parameters: Iterable[torch.Tensor],
                     grad_clip: float | None) -> tuple[bool, torch.Tensor]:
    """After ``loss.backward()``: clip the gradients to ``grad_clip`` (None: no clipping) and say whether the
    loss and the gradient norm are finite, i.e. whether an optimizer step is safe. Returns (ok, norm)."""
    norm = clip_gradients(parameters, grad_clip)
    return bool(torch.isfinite(loss.detach()) & torch.isfinite(norm)), norm


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_params, params = list(ema.parameters()), [p.detach() for p in model.parameters()]
    if len(ema_params) != len(params):
        raise ValueError("the EMA and the model have different parameters")
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    ema_buffers, buffers = list(ema.buffers()), list(model.buffers())
    if len(ema_buffers) != len(buffers):
        raise ValueError("the EMA and the model have different buffers")
    if buffers:
        torch._foreach_copy_(ema_buffers, buffers)  # normalisation statistics are not averaged


class AsyncPublisher:
    """Publishes off the training thread (as in the paper): snapshots the weights, registers in the background.

    Registering takes 50-400 ms; done inline every 25 steps of ~30 ms it would cost the learner ~10%.
    """

    def __init__(self, publish: Publish) -> None:
        self._publish = publish
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sop-publish")
        self.futures: list[Future[Any]] = []

    def __call__(self, model: VLAPolicy, step: int, metrics: Mapping[str, float]) -> Future[Any]:
        snapshot = copy.deepcopy(model).cpu().eval()
        future = self._executor.submit(self._publish, snapshot, step, dict(metrics))
        self.futures.append(future)
        return future

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run other registry work (e.g. a promotion gate check) on the same thread, after what is queued."""
        return self._executor.submit(fn, *args)

    def close(self) -> list[Any]:
        """Wait for pending registrations; returns every result (re-raising the first failure)."""
        self._executor.shutdown(wait=True)
        return [f.result() for f in self.futures]

    def __enter__(self) -> AsyncPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

