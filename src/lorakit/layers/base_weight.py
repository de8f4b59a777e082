"""``BaseWeight``: the part of ``lorakit.layers.base.LoraLayer`` that finds the base weight a
layer wraps and where accelerate keeps it: ``weight`` and ``bias`` (the base layer's),
``live_weight`` / ``set_live_weight`` (the weight merge and unmerge replace), the base's
accelerate offload hook (``offload_hook``, ``base_offload_hook``) and from these the device and
dtype new adapter tensors take (``base_device``, ``base_float_dtype``).

A mixin: it uses the layer's ``base_layer`` and ``innermost_base`` (``LoraLayer``'s, which looks
through nested LoRA layers); ``layers/parameter.py`` overrides the live weight for a bare
parameter. ``offload_hook`` stays importable from ``lorakit.layers.base``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BaseWeight", "offload_hook"]


def offload_hook(module: nn.Module):
    """The accelerate hook that offloads ``module``'s own weights, or None: an
    ``AlignDevicesHook`` with ``offload=True`` in ``module._hf_hook`` (a ``SequentialHook``'s
    hooks searched in turn), as ``cpu_offload`` and ``dispatch_model`` / transformers'
    ``device_map`` with "cpu" or "disk" entries attach to each module holding weights. Such a
    module's parameters sit on the meta device between forwards; the hook loads them from its
    ``weights_map`` onto its ``execution_device`` for each call (``io.fingerprint`` reads them
    from there: ``offloaded_weight``)."""
    hook = getattr(module, "_hf_hook", None)
    for each in getattr(hook, "hooks", (hook,)):
        if getattr(each, "offload", False) and getattr(each, "weights_map", None) is not None:
            return each
    return None


class BaseWeight:
    """The base weight of a LoRA layer (``LoraLayer``), merged or not, and its offload hook."""

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (so code that reads ``module.weight`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias, None where it has none (as peft's layers: Mamba and Jamba
        read ``dt_proj.bias``)."""
        return getattr(self.base_layer, "bias", None)

    def live_weight(self) -> torch.Tensor:
        """The weight the base holds now, merged or not: ``base_layer.weight`` (a layer on a
        bare parameter, ``layers/parameter.py``, that parameter)."""
        return self.base_layer.weight

    def set_live_weight(self, weight: nn.Parameter) -> None:
        """Install ``weight`` where ``live_weight`` reads it (merge and unmerge)."""
        self.base_layer.weight = weight

    @property
    def base_device(self) -> torch.device:
        """Where new adapter tensors go: the device of the base layer's weight, or for a base
        that accelerate offloaded (``base_offload_hook``) the device its hook computes on
        (``execution_device``). An adapter made on the meta device would have no values: its
        forward would give NaN or the base's output, and a training step would fail."""
        hook = self.base_offload_hook()
        if hook is not None and hook.execution_device is not None:
            return torch.device(hook.execution_device)
        return self.live_weight().device

    def base_offload_hook(self):
        """The accelerate hook that offloads the live weight (``offload_hook`` of the module
        holding it, under any nested LoRA layers), or None: also None for a weight on the meta
        device with no such hook (a model built on the meta device, whose adapters stay
        there), and for a hooked weight that is not on the meta device now (loaded for a
        call)."""
        hook = offload_hook(self.innermost_base())
        if hook is None:
            return None
        try:
            weight = self.live_weight()
        except AttributeError:  # a quantized base holds no float weight (lorakit.quantized)
            return hook
        return hook if weight.is_meta else None

    @property
    def base_float_dtype(self) -> torch.dtype:
        """The base weight's dtype (a quantized base says float32): sets the adapter's default
        dtype (float32 on a float16/bfloat16 base, else this)."""
        return self.live_weight().dtype
