"""Where this training process stands: alone, or one rank of several under torchrun."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from models.devices import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cluster:
    """This process's place among the training processes (world 1 without torchrun)."""

    rank: int
    world: int
    device: str

    @property
    def main(self) -> bool:
        """Rank 0 alone writes files and logs progress."""
        return self.rank == 0

    def gather(self, value: Any) -> list[Any]:
        """Every rank's value (picklable), in rank order; [value] alone."""
        if self.world == 1:
            return [value]
        shares: list[Any] = [None] * self.world
        dist.all_gather_object(shares, value)
        return shares

    def sum(self, *values: float) -> tuple[float, ...]:
        """The values summed over every rank."""
        if self.world == 1:
            return values
        summed = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(summed)
        return tuple(summed.tolist())


def start_cluster(device: str) -> Cluster:
    """Join the process group when launched by torchrun; otherwise a world of one."""
    device = resolve_device(device)
    if not dist.is_torchelastic_launched():
        return Cluster(0, 1, device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":  # one GPU per process; ranks are node-contiguous under torchrun
        device = f"cuda:{rank % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
    log.info("process %d of %d on %s", rank, world, device)
    return Cluster(rank, world, device)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
