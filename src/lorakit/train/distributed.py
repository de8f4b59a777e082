"""Data-parallel training under ``torchrun`` (DDP or FSDP2; gloo on CPU, nccl on CUDA), and the
device a run trains on (``training_device``).

``torchrun --nproc_per_node N -m lorakit train ...`` sets ``WORLD_SIZE``/``RANK``; the loop then
wraps the model AFTER the base is frozen. ``strategy="ddp"``: ``DistributedDataParallel``, which
registers hooks only for parameters with ``requires_grad``, so only adapter gradients are
all-reduced; every process holds the whole model. ``strategy="fsdp"``: the model is sharded in
place (``lorakit.train.fsdp``); each process holds about 1/N of the base and of the adapter.
FSDP in one process would shard nothing, so ``setup_distributed`` refuses it there (a clear
error rather than a silent fallback that would hide a missing ``torchrun``).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lorakit.errors import UserError

__all__ = [
    "Distributed",
    "check_strategy",
    "end_distributed_process",
    "setup_distributed",
    "training_device",
]


@dataclass
class Distributed:
    """This process's place in the job (``world_size == 1``: not distributed)."""

    rank: int = 0
    world_size: int = 1
    strategy: str = "ddp"  # "ddp" or "fsdp" (lorakit.train.config.STRATEGIES)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.enabled and self.strategy == "fsdp"

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` itself; a DDP wrapper syncing only the parameters that train; or under
        FSDP ``model`` sharded in place (build the optimizer after this)."""
        if not self.enabled:
            return model
        if self.sharded:
            from lorakit.train.fsdp import shard

            return shard(model)
        return nn.parallel.DistributedDataParallel(model)

    @contextmanager
    def accumulating(self, wrapped: nn.Module) -> Iterator[None]:
        """Within the block, backward keeps gradients local (a micro-batch that is not the last
        of its step): ``no_sync`` of DDP, ``set_requires_gradient_sync(False)`` of FSDP."""
        if not self.enabled:
            yield
        elif self.sharded:
            wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)
        else:
            with wrapped.no_sync():
                yield

    def sum(self, value: float) -> float:
        """Sum of ``value`` over all processes."""
        if not self.enabled:
            return value
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return float(tensor.item())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def check_strategy(strategy: str) -> None:
    """Refuse ``fsdp`` outside torchrun with 2 or more processes (it would shard nothing)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if strategy == "fsdp" and world_size < 2:
        raise UserError(
            f"--strategy fsdp shards the model across processes, but this is {world_size} "
            "process; start it with torchrun --nproc_per_node N (N >= 2), or drop --strategy "
            "fsdp to train in one process"
        )


def training_device(requested: str = "auto") -> torch.device:
    """The device to train on for ``--device`` ``requested``: ``auto`` is a GPU where torch sees
    one, else the CPU; ``cpu``, ``cuda`` or ``cuda:N``. Under torchrun ``auto`` and ``cuda``
    mean this process's GPU, ``cuda:LOCAL_RANK``, made the current one (NCCL and the CUDA
    kernels use the current device). ``UserError`` for an unknown name or a GPU torch does not
    see."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    name = requested
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {requested!r}: give auto, cpu, cuda or cuda:N")
    if device.type == "cpu":
        return device
    if device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(
            f"--device {requested}: under torchrun every process would take that one GPU (NCCL "
            "refuses two processes on one device); give --device cuda (or auto): each process "
            "then takes the GPU of its LOCAL_RANK (CUDA_VISIBLE_DEVICES chooses which GPUs)"
        )
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = local_rank if device.index is None else device.index
    if index >= count:
        if count:
            seen = f"torch sees {count} GPU{'s' * (count != 1)}"
            hint = f"choose one of cuda:0 to cuda:{count - 1}, or start fewer processes per node"
        else:
            seen = "torch sees no GPU"
            hint = "train on the CPU with --device cpu, or install a CUDA build of torch"
        raise UserError(f"--device {requested}: {seen} (process LOCAL_RANK {local_rank}); {hint}")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def setup_distributed(strategy: str = "ddp", device: torch.device | None = None) -> Distributed:
    """Join the process group described by torchrun's environment (once); else single-process.
    The backend follows ``device`` (where the model is): nccl for CUDA, gloo otherwise (a CPU
    model on a machine with a GPU too)."""
    check_strategy(strategy)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    if not dist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        atexit.register(_leave_process_group)  # the group lorakit joined, it also leaves
    return Distributed(dist.get_rank(), dist.get_world_size(), strategy)


def _leave_process_group() -> None:
    """Destroy the process group before the interpreter tears down: left to the teardown, gloo's
    threads were sometimes destroyed still running ("terminate called without an active
    exception", SIGABRT after a run had written everything: about 1 torchrun in 15 here)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def end_distributed_process(code: int) -> None:
    """End a process that runs under ``torchrun`` and is in a process group (``WORLD_SIZE`` > 1)
    with exit status ``code``, once its work is done: leave the group, flush what it printed
    and logged, then ``os._exit(code)``, skipping the interpreter's finalization. Elsewhere
    (one process, or no group joined) return and let the process end as usual.

    Why: with the group destroyed (``_leave_process_group``), the finalization that follows
    still aborted about one torchrun process in 100-150 on this machine ("terminate called
    without an active exception", SIGABRT, Python's fault handler showing no Python frame: by
    our reading a C++ destructor of torch's distributed state, after every file had been
    written), and torchrun then reports the whole run failed. Nothing is left to do at that point: outputs
    are written atomically and closed, so skipping finalization loses nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_initialized():
        return
    _leave_process_group()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or broken: nothing more to say
            stream.flush()
    logging.shutdown()
    os._exit(code)
