"""Data-parallel training under ``torchrun`` (DDP; gloo on CPU, nccl on CUDA).

``torchrun --nproc_per_node N -m lorakit train ...`` sets ``WORLD_SIZE``/``RANK``; the loop then
wraps the model in ``DistributedDataParallel`` AFTER the base is frozen, so DDP registers hooks
only for parameters with ``requires_grad``: only adapter gradients are all-reduced.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Distributed", "setup_distributed"]


@dataclass
class Distributed:
    """This process's place in the job (``world_size == 1``: not distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` itself, or a DDP wrapper syncing only the parameters that train."""
        if not self.enabled:
            return model
        return nn.parallel.DistributedDataParallel(model)

    def sum(self, value: float) -> float:
        """Sum of ``value`` over all processes."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return float(tensor.item())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup_distributed() -> Distributed:
    """Join the process group described by torchrun's environment (once); else single-process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size())
