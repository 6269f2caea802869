"""Several learner processes: DistributedDataParallel over ``torchrun``'s environment (gloo on CPU, NCCL on GPU).

Each rank runs the whole learner (its own Delta feeder and sampler, seeded by rank, sampling its share of the
global batch); gradients are averaged by DDP; only rank 0 registers versions, logs and writes the status file.
Ranks agree on when to stop (``any_rank``), so none is left waiting in an all-reduce.

    torchrun --nproc-per-node 2 -m sop.commands.learn --max-steps 1000
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from learner.batch import Batch
from learner.model import VLAPolicy


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "cpu") -> DistInfo | None:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, MASTER_ADDR ...); None when run alone."""
    if not launched_by_torchrun():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=device)


class DDPPolicy:
    """What the algorithms call ``forward_batch`` on under DDP: the forward goes through the DDP wrapper."""

    def __init__(self, model: VLAPolicy, info: DistInfo) -> None:
        self.module = model
        ids = [info.local_rank] if info.device.startswith("cuda") else None
        self.ddp = DistributedDataParallel(model, device_ids=ids)

    def forward_batch(self, batch: Batch, indicator: torch.Tensor | None = None) -> torch.Tensor:
        return self.ddp(batch.images, batch.proprio, batch.text, indicator)

    def __getattr__(self, name: str) -> Any:  # config, encoder ... of the plain model
        return getattr(self.module, name)


def any_rank(flag: bool, info: DistInfo | None) -> bool:
    """True on every rank if ``flag`` is true on any (one small all-reduce)."""
    if info is None:
        return flag
    device = info.device if info.device.startswith("cuda") else "cpu"
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast(obj: Any, info: DistInfo | None) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable object)."""
    if info is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo | None) -> None:
    if info is not None:
        dist.barrier()


def shutdown(info: DistInfo | None) -> None:
    if info is not None and dist.is_initialized():
        dist.destroy_process_group()
