"""torchrun support for train.py: the process group, this process's rank, and the few
collective steps training needs (gradients are averaged by DistributedDataParallel).

    torchrun --nproc-per-node N train.py ...   (gloo on the CPU, nccl on CUDA)

Without torchrun's environment (WORLD_SIZE unset or 1) everything here is a no-op, so a plain
``python train.py`` runs exactly as before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes checkpoints, metrics and TensorBoard."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True under torchrun with more than one process."""
        return self.size > 1


class NoWriter:
    """Stands in for the TensorBoard writer on the ranks that write nothing."""

    def add_scalar(self, *args: Any) -> None:
        """Record nothing."""

    def flush(self) -> None:
        """Nothing to flush."""

    def close(self) -> None:
        """Nothing to close."""


def join_world(device: torch.device) -> tuple[World, torch.device]:
    """Join torchrun's process group (nccl on CUDA, gloo on the CPU) and pick this rank's device.

    On CUDA each process takes the GPU of its LOCAL_RANK. Returns ``World()`` and ``device``
    unchanged when not started by torchrun with several processes.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), local_rank), device


def leave_world(world: World, finished: bool) -> None:
    """Leave the process group at the end of training (nothing without torchrun).

    After a finished run every rank first waits for the others: a rank that tore its gloo
    group down while another still used it aborted the process. After an error it leaves at
    once (the others may never reach a barrier).
    """
    if world.distributed and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def wrap_model(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """The model wrapped in DistributedDataParallel under torchrun, else the model itself.

    Buffers (the per-song side tables) are constant, so they are not re-broadcast each step.
    """
    if not world.distributed:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                               forward_sync_buffers=False)


def global_mean_factor(world: World, count: torch.Tensor) -> torch.Tensor:
    """Factor turning this rank's mean loss over ``count`` rows into its share of the global mean.

    DDP averages gradients over ranks; scaled by count · size / total count, that average is
    the gradient of the mean over all ranks' masked positions, as one process would compute.
    """
    total = count.detach().clone().float()
    dist.all_reduce(total)
    return count.float() * world.size / total


def mean_over_ranks(world: World, value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over all ranks (itself without torchrun)."""
    if not world.distributed:
        return value
    value = value.detach().clone().float()
    dist.all_reduce(value)
    return value / world.size


def from_main(world: World, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object; itself without torchrun)."""
    if not world.distributed:
        return value
    box = [value if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_seed(seed: int, epoch: int, world: World) -> int:
    """A torch seed for this rank's epoch (dropout, negatives): distinct per rank, repeatable."""
    return int(np.random.default_rng([seed, epoch, world.rank]).integers(2**62))
