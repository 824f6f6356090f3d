"""One process or many under ``torchrun``: the process group, the device, and the collectives the
trainer uses.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1) the process group is gloo on the CPU and NCCL on CUDA,
each rank takes the device of its ``LOCAL_RANK``, and only rank 0 prints (:meth:`Dist.log`). In one
process every collective here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from eclsnn.config import Config
from eclsnn.errors import ConfigError

__all__ = ["Dist", "init_distributed", "select_device", "device_type"]


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, message: str) -> None:
        """Print on rank 0 only."""
        if self.is_main:
            print(message, flush=True)

    def barrier(self) -> None:
        if self.enabled:
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
        return tensor

    def all_min(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return tensor

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Every rank takes rank 0's buffers (BatchNorm running statistics)."""
        if self.enabled:
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` in DistributedDataParallel when there are several ranks, else ``model`` itself."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def close(self) -> None:
        """Destroy the process group if :func:`init_distributed` created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def device_type(pref: str) -> str:
    if pref == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if pref.startswith("cuda") else "cpu"


def init_distributed(cfg: Config) -> Dist:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device_type(cfg.train.device) == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        owns = True
    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return Dist(rank=rank, world_size=dist.get_world_size(), local_rank=local_rank, owns_group=owns)


def select_device(cfg: Config, ddp: Dist) -> torch.device:
    kind = device_type(cfg.train.device)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.device = {cfg.train.device!r} but CUDA is not available here; use \"cpu\" or \"auto\""
            )
        if ddp.enabled:
            index = ddp.local_rank
        elif ":" in cfg.train.device:
            index = int(cfg.train.device.split(":")[1])
        else:
            index = torch.cuda.current_device()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")
