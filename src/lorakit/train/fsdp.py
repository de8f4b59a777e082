"""Fully sharded training of a LoRA adapter with torch's FSDP2 (``--strategy fsdp`` under torchrun).

``shard(model)`` makes every transformer block (the classes named by the model's
``_no_split_modules``, else the items of its largest ``nn.ModuleList``) and then the whole model
an FSDP unit (``torch.distributed.fsdp.fully_shard``), after every process took process 0's
parameters and buffers (``broadcast_from_rank0``, as DDP). Each parameter becomes a ``DTensor``
split along dim 0 into N pieces (``Shard(0)``); process i keeps piece i. Per process::

    frozen base      ~ P_frozen * b_dtype / N      (b_dtype: bytes per base element)
    adapter + grads + AdamW m, v   ~ P_trainable * 16 / N

Before a block runs, FSDP all-gathers its pieces into whole, plain tensors and frees them after
(again in backward), so a LoRA layer computes on ordinary tensors and takes the fast path
(``lorakit.fast``), with or without gradient checkpointing. Only parameters that train have
gradients (the base is frozen before sharding); they are reduce-scattered and averaged over the
N processes, as DDP averages them, so the loop's loss scaling is the same for both.

Checkpoints and the final adapter are gathered, not sharded: every process gathers each trainable
tensor and AdamW moment (``DTensor.full_tensor``, collective) and process 0 writes exactly the
files a one-process run writes, atomically, with the base fingerprint taken before sharding
(``ShardedSaver``). The adapter is small (0.6% of a 7B base at r=16), so gathering it
costs little, the final adapter is one ordinary PEFT directory, and a checkpoint can be resumed
with FSDP, DDP or one process alike (with the same global batch; see
``lorakit.train.resume.resumed_drop_last`` for the short batch). ``torch.distributed.checkpoint``'s sharded files would save
that gathering only for adapters of many GB, at the price of a second checkpoint format.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from lorakit.errors import UserError
from lorakit.train.training_state import TrainingState

__all__ = [
    "ShardedSaver",
    "broadcast_from_rank0",
    "check_shardable",
    "fsdp_units",
    "gathered_optimizer_state",
    "gathered_parameters",
    "local_parameter_bytes",
    "reshard",
    "shard",
    "shard_like",
    "whole",
]


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, or the whole tensor of a ``DTensor`` (collective: every process calls)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``tensor`` (whole) split as ``reference`` is: this process's piece as a ``DTensor`` when
    ``reference`` is one (each process cuts its own piece, no communication), else ``tensor``."""
    if not isinstance(reference, DTensor):
        return tensor
    tensor = tensor.to(device=reference.device, dtype=reference.dtype)
    return distribute_tensor(
        tensor, reference.device_mesh, reference.placements, src_data_rank=None
    )


def quantization_of(model: nn.Module) -> str | None:
    """Why ``model``'s base counts as quantized (a config ``quantization_config``, a layer of a
    ``lorakit.quantized`` format, integer weights, or weights of a tensor subclass such as
    bitsandbytes' ``Params4bit``), or None. lorakit's own formats (GGUF blocks, int8-rows,
    int4-groups) keep their codes in buffers, which the parameter test alone would miss."""
    from lorakit import quantized

    config = getattr(model, "config", None)
    if getattr(model, "is_quantized", False) or getattr(config, "quantization_config", None):
        return "its config has a quantization_config"
    for name, module in model.named_modules():
        if quantized.is_quantized(module):
            return f"module {name} is {quantized.describe(module)}"
    for name, parameter in model.named_parameters():
        if not parameter.is_floating_point():
            return f"parameter {name} is {parameter.dtype}"
        if type(parameter) is not nn.Parameter:
            return f"parameter {name} is a {type(parameter).__name__}"
    return None


def replicated_adapters(model: nn.Module) -> dict[str, list[list[int]]]:
    """``{adapter name: its layer_replication}`` of the adapters that copied blocks. A copy
    shares its base weights with the block it copies, and FSDP2 cannot shard one parameter in
    two units (each block is one)."""
    from lorakit.state import adapter_configs

    configs = adapter_configs(model).items()
    return {name: c.layer_replication for name, c in configs if c.layer_replication}


def quantized_base_error(reason: str) -> UserError:
    """The refusal of FSDP on a quantized base (``reason``: what makes it quantized); ``lorakit
    plan`` gives the same one."""
    return UserError(
        f"--strategy fsdp cannot shard a quantized base yet ({reason}); train it with "
        "--strategy ddp or in one process, or use an unquantized base"
    )


def check_shardable(model: nn.Module) -> None:
    """Refuse what FSDP training does not handle yet, before anything is sharded: a quantized
    base, and blocks copied by ``layer_replication``."""
    reason = quantization_of(model)
    if reason is not None:
        raise quantized_base_error(reason)
    replicated = replicated_adapters(model)
    if replicated:
        name, pairs = next(iter(replicated.items()))
        raise UserError(
            f"--strategy fsdp cannot shard a model with layer_replication yet (adapter "
            f"{name!r}: layer_replication={pairs!r}; its copied blocks share base weights, which "
            "FSDP would shard twice); train it with --strategy ddp or in one process"
        )


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``, each one FSDP unit: modules whose class is in
    ``model._no_split_modules`` (transformers' list of blocks), else the items of the
    ``nn.ModuleList`` holding the most parameters."""
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_classes]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return []
    largest = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return list(largest)


def shard(model: nn.Module) -> nn.Module:
    """Shard ``model`` in place (call after freezing the base and before building the optimizer,
    which must see the sharded parameters); returns it. Every process calls this."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    check_shardable(model)
    broadcast_from_rank0(model)  # one model, as DDP starts from: process 0's
    # the mesh of the model's own device type (FSDP's default is CUDA wherever torch sees a GPU,
    # which would move a model trained on the CPU by --device cpu there)
    device_type = next(iter(model.parameters())).device.type
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    for block in fsdp_units(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def broadcast_from_rank0(model: nn.Module) -> None:
    """Copy process 0's parameters and buffers, frozen ones included, into every process, as
    DDP does when it wraps a model (collective). ``fully_shard`` keeps piece i of process i's
    own tensors, so processes that built different models (a per-process seed before
    ``inject``, a random-dependent init such as PiSSA's randomized SVD, which also changes the
    base) would otherwise train pieces of several models stitched together."""
    import torch.distributed as dist

    for tensor in [*model.parameters(), *model.buffers()]:  # (each shared one once)
        data = tensor.detach()
        sent = data.to(torch.uint8) if data.dtype == torch.bool else data.contiguous()
        dist.broadcast(sent, src=0)
        if sent.data_ptr() != data.data_ptr():  # (a copy: bool, or not contiguous)
            data.copy_(sent)


def reshard(model: nn.Module) -> None:
    """Free the gathered parameters FSDP keeps after a forward without backward (the root unit
    keeps its embeddings and head gathered after forward, expecting a backward; evaluation has
    none)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def local_parameter_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the parameters this process holds: ``{"frozen": ..., "trainable": ...}``
    (the local pieces of sharded parameters, whole ones otherwise)."""
    held = {"frozen": 0, "trainable": 0}
    for parameter in model.parameters():
        local = parameter.to_local() if isinstance(parameter, DTensor) else parameter
        held["trainable" if parameter.requires_grad else "frozen"] += local.nbytes
    return held


def gathered_parameters(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """``{name: whole tensor on the CPU}`` of the parameters ``names`` (collective)."""
    parameters = dict(model.named_parameters())
    return {name: whole(parameters[name].detach()).cpu().contiguous() for name in names}


def gathered_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor whole (collective)."""
    state_dict = optimizer.state_dict()
    state = {
        index: {name: whole(value) for name, value in fields.items()}
        for index, fields in state_dict["state"].items()
    }
    return {"state": state, "param_groups": state_dict["param_groups"]}


class ShardedSaver:
    """Collects what a run saves of a sharded model, as ``lorakit.train.checkpoint.Saver`` does
    of an unsharded one: the same files, the same bytes for the same values.

    Built BEFORE sharding: it keeps the adapter file's header metadata (with the base
    fingerprint, which needs the whole base weights) and config text, and which parameter each
    file key holds. After sharding, ``training_state`` and ``adapter_writer`` gather (every
    process calls them); the functions they return write (process 0), atomically.
    """

    def __init__(self, model: nn.Module, adapter_name: str = "default") -> None:
        from lorakit.io.save import adapter_file_contents

        tensors, self.metadata, self.config_text = adapter_file_contents(model, adapter_name)
        self.adapter_name = adapter_name
        self.parameter_of = _parameter_names_by_key(model, adapter_name, set(tensors))

    def training_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainingState:
        """The ``TrainingState`` (whole tensors) of a checkpoint (collective)."""
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        return TrainingState(
            gathered_parameters(model, trainable),
            gathered_optimizer_state(optimizer),
            self.adapter_writer(model),
        )

    def adapter_writer(self, model: nn.Module) -> Callable[[Path], Path]:
        """A function writing the adapter into a directory, its tensors gathered now
        (collective)."""
        by_name = gathered_parameters(model, list(self.parameter_of.values()))
        tensors = {key: by_name[name] for key, name in self.parameter_of.items()}
        return lambda directory: self._write(tensors, directory)

    def _write(self, tensors: dict[str, torch.Tensor], directory: str | Path) -> Path:
        from lorakit.io import atomic
        from lorakit.io.config_json import CONFIG_NAME
        from lorakit.io.header import serialize
        from lorakit.io.read import WEIGHTS_NAME

        target = Path(directory)
        if self.adapter_name != "default":
            target = target / self.adapter_name
        target.mkdir(parents=True, exist_ok=True)
        atomic.write_files(  # weights first, as save_adapter does
            {
                target / WEIGHTS_NAME: serialize(tensors, self.metadata),
                target / CONFIG_NAME: self.config_text.encode("utf-8"),
            }
        )
        return target


def _parameter_names_by_key(model: nn.Module, adapter_name: str, keys: set[str]) -> dict[str, str]:
    """``{file key: parameter name}`` for the file keys ``keys`` of adapter ``adapter_name``."""
    from lorakit.io.file_tensors import model_tensor
    from lorakit.io.keys import embedding_module_names
    from lorakit.io.save import adapter_file_entries

    names = {id(parameter): name for name, parameter in model.named_parameters()}
    entries, _ = adapter_file_entries(model, adapter_name, embedding_module_names(model))
    found = {}
    for entry in entries:
        if entry.key in keys:
            tensor = model_tensor(model, entry, adapter_name)
            if id(tensor) not in names:
                raise UserError(
                    f"--strategy fsdp cannot save {entry.key}: it is not a parameter of the model"
                )
            found[entry.key] = names[id(tensor)]
    if set(found) != keys:
        raise UserError(f"--strategy fsdp cannot save {sorted(keys - set(found))[:3]}")
    return found
