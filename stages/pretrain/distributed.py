"""Data-parallel setup from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...).

One process per GPU (or per CPU worker with gloo, which is how the tests run it). Without
those variables everything runs in one process and no process group is created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from stages import threads
from stages.checkpoints import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # we created the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    # Training starts here (pretraining, fine-tuning): its thread takes the process's current share.
    threads.rebalance()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    owns = False
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        # NCCL for GPUs; gloo runs the same code on CPU (tests, CPU clusters).
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local_rank, dev, owns)


def teardown(info: DistInfo, *, clean: bool = True) -> None:
    """Destroy the group we created. After a clean finish all ranks meet first: a rank that
    destroys its gloo group while another still talks to it can abort ("terminate called without
    an active exception"). After a failure there is no meeting: the other ranks may never come."""
    if info.owns_group and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
