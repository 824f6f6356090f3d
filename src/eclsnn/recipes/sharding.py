"""Evaluation under ``torchrun``: ``eclsnn evaluate`` and ``eclsnn analyze`` shard the data over the
processes and add up what each counted.

Each rank takes every ``world``-th sample of the split (``indices[rank::world]``): no sample is counted
twice and none is left out — unlike a distributed sampler, which pads the last shard by repeating
samples. Counts (correct answers, spikes, operations) are summed exactly as integers; float statistics
are float64 sums, equal to one process's up to the order of summation. Only rank 0 prints and writes.
In one process (no ``WORLD_SIZE`` > 1) everything here is the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Shard", "shard_from_env"]

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


@dataclass
class Shard:
    rank: int = 0
    world: int = 1
    device: str = "cpu"
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def take(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's samples of ``indices``."""
        return indices[self.rank::self.world] if self.enabled else indices

    def reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``tensor`` combined over the ranks (sum, max or min), on every rank; float tensors in float64."""
        if not self.enabled:
            return tensor
        kind = tensor.dtype
        work = tensor.to(self.device, torch.float64 if kind.is_floating_point else torch.int64).clone()
        dist.all_reduce(work, op=getattr(dist.ReduceOp, _OPS[op]))
        return work.cpu() if not kind.is_floating_point else work.cpu().double()

    def log(self, message: str = "") -> None:
        if self.is_main:
            print(message, flush=True)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def shard_from_env(device: str = "cpu") -> Shard:
    """The shard of this process: under ``torchrun`` (``WORLD_SIZE`` > 1) a gloo (CPU) or NCCL (CUDA)
    process group, each rank on the device of its ``LOCAL_RANK``; else one shard of everything."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Shard(device=device)
    cuda = str(device).startswith("cuda")
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        owns = True
    rank = dist.get_rank()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return Shard(rank=rank, world=dist.get_world_size(), device=str(device), owns_group=owns)
