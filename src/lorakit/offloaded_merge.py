"""Merging into a base that accelerate offloaded (``cpu_offload``; a ``device_map`` with "cpu" /
"disk" entries: the weight on the meta device between forwards, its value in the hook's offload
map), for ``lorakit.merge``: ``merge_and_unload`` loads each adapted weight (``onloaded``),
merges it, and writes the merged weight into that module's offload map (``offload_merged``), as
PEFT's ``onload_layer`` does; ``merge`` refuses such a layer (``offloaded_refusal``). The same
two steps write trainable token rows merged into an offloaded embedding
(``TrainableTokens.merged_module``) and the original weight back at ``unmerge`` of a layer
offloaded after its merge (``Merging._unmerge_offloaded``)."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence

from torch import nn

from lorakit import quantized
from lorakit.state import lora_layers

__all__ = [
    "offload_merged",
    "offloaded_bases",
    "offloaded_layers",
    "offloaded_refusal",
    "onloaded",
]


def offloaded_layers(model: nn.Module, names: Sequence[str]):
    """``(path, layer, hook)`` of each LoRA layer holding one of ``names`` whose base weight
    accelerate offloaded (``LoraLayer.base_offload_hook``). A weight on the meta device with no
    such hook (a model moved to or built on the meta device) is merged as any other: meta."""
    for path, layer in lora_layers(model):
        if any(name in layer.ranks for name in names):
            hook = layer.base_offload_hook()
            if hook is not None:
                yield path, layer, hook


def offloaded_refusal(path: str) -> str:
    """Why ``merge`` refuses the offloaded layer at ``path``, and the way out."""
    return (
        f"module {path!r}: its base weight is offloaded by accelerate (cpu_offload, or a "
        "device_map with 'cpu' / 'disk' entries): accelerate reloads it from its offload map at "
        "each forward, so a merge that unmerge can undo cannot be installed. Use "
        "merge_and_unload (it writes the merged weights into the offload map, for good; a "
        "float base only), or load the base without offloading to merge and unmerge (the one "
        "way for a quantized base); unmerged, the adapter works on the offloaded model as it "
        "is. Nothing was changed."
    )


def offloaded_bases(model: nn.Module, names: Sequence[str]) -> list[tuple[nn.Module, object]]:
    """``(base module, its accelerate offload hook)`` of each LoRA layer that merges one of
    ``names`` onto a base weight accelerate offloaded (``offloaded_layers``). A layer on a
    bare parameter or a quantized base is refused (``ValueError`` naming the module) before
    any change: the hook would load the original weight into the module for each call."""
    found = []
    for path, layer, hook in offloaded_layers(model, names):
        base = layer.base_layer
        if not layer.runs_offloaded_base() or quantized.is_quantized(base):
            raise ValueError(
                f"module {path!r}: its base {_base_kind(base)} is offloaded by accelerate "
                "and lorakit merges into an offloaded float nn.Linear / Conv1D / Embedding "
                "only. Load the base without offloading this module to merge. Nothing was "
                "changed."
            )
        found.append((base, hook))
    return found


def _base_kind(base: nn.Module) -> str:
    """The base's class, and its storage format if it is quantized (a torchao layer is an
    ``nn.Linear``: "Linear (torchao-int8-weight-only)")."""
    if quantized.is_quantized(base):
        return f"{type(base).__name__} ({quantized.describe(base)}, quantized)"
    return type(base).__name__


@contextlib.contextmanager
def onloaded(offloaded: Sequence[tuple[nn.Module, object]]):
    """Within: each offloaded base module's weights loaded by its hook (``pre_forward``, as for
    a call: on the hook's execution device), so merging reads and replaces real tensors. If
    the block raises, the modules are offloaded again (``post_forward``), as they were."""
    onloaded = []
    try:
        for base, hook in offloaded:
            hook.pre_forward(base)
            onloaded.append((base, hook))
        yield
    except BaseException:
        for base, hook in onloaded:
            hook.post_forward(base, None)
        raise


def offload_merged(offloaded: Sequence[tuple[nn.Module, object]]) -> None:
    """Give each onloaded base module's hook a new offload map of its merged tensors (the
    module's own parameters and buffers, in CPU memory, as PEFT's ``onload_layer`` remakes it;
    the map the hook shared with other modules, and a "disk" module's files, are left as they
    were), then offload the module again: each later forward loads the merged weight. Without
    this accelerate would reload the unmerged one."""
    for base, hook in offloaded:
        tensors = itertools.chain(
            base.named_parameters(recurse=False), base.named_buffers(recurse=False)
        )
        hook.weights_map = {name: tensor.detach().to("cpu") for name, tensor in tensors}
        hook.post_forward(base, None)
