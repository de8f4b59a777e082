"""``LoraConfig.fan_in_fan_out`` as PEFT's dispatch settles it on the layers an injection wraps:
``False`` for a float ``nn.Linear`` (weight (out, in)), ``True`` for a transformers ``Conv1D``
(weight (in, out)), with PEFT's warning at each change (``settle_fan_in_fan_out``), and the
same rewrites replayed for a saved config (``fan_in_fan_out_flips``). lorakit's layers read
their layout from the base's type, so the flag changes no numbers: it is kept for the file, as
PEFT writes it."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

from torch import nn

from lorakit import quantized
from lorakit.config import LoraConfig
from lorakit.errors import FanInFanOutWarning
from lorakit.layers import LoraLayer, is_conv1d
from lorakit.targets import original_module

__all__ = ["fan_in_fan_out_flips", "settle_fan_in_fan_out"]


def _forced_fan_in_fan_out(module: nn.Module) -> bool | None:
    """The ``fan_in_fan_out`` PEFT's default dispatch forces on the config when it wraps
    ``module`` in a new LoRA layer: False for a float ``nn.Linear`` (weight (out, in)), True
    for a transformers ``Conv1D`` (weight (in, out)); None for any other layer (an embedding,
    a quantized linear: PEFT's own dispatchers take those first and leave the flag alone)."""
    if quantized.is_quantized(module):
        return None
    if isinstance(module, nn.Linear):
        return False
    return True if is_conv1d(module) else None


def fan_in_fan_out_flips(
    value: bool, modules: Iterable[tuple[str, nn.Module]]
) -> list[tuple[str, bool]]:
    """PEFT's rewrites of ``fan_in_fan_out`` as it wraps ``modules`` (``(name, base module)``,
    in model order), the flag starting at ``value``: ``(name, new value)`` for each module
    whose layout disagrees with the flag at that point (PEFT warns there and sets the
    config's flag to the layout's). The last entry's value is the flag the config ends with
    (``value`` when there is none); with Linear and Conv1D targets mixed it flips each time
    the kind changes. lorakit's layers read their layout from the base's type, so the flag
    changes no numbers: it is kept only for the file, as PEFT writes it."""
    flips: list[tuple[str, bool]] = []
    for name, module in modules:
        forced = _forced_fan_in_fan_out(module)
        if forced is not None and forced != value:
            value = forced
            flips.append((name, value))
    return flips


def settle_fan_in_fan_out(config: LoraConfig, current: Mapping[str, nn.Module]) -> None:
    """Set ``config.fan_in_fan_out`` as PEFT's dispatch sets it on the modules this injection
    wraps (``current``, in model order; a module that is a LoRA layer already takes the adapter
    without a new wrapping, which leaves the flag alone in PEFT too), with PEFT's warning at
    each change, naming the module and how many more of its kind are targeted. Not with
    ``target_parameters``, which refuse ``fan_in_fan_out=True`` (``config_checks``): a flip
    would leave the user's config unable to pass its own checks (``replace``, a copy)."""
    if config.target_parameters:  # (fan_in_fan_out=True is refused with them: keep the user's)
        return
    new = [(n, original_module(m)) for n, m in current.items() if not isinstance(m, LoraLayer)]
    for name, value in fan_in_fan_out_flips(config.fan_in_fan_out, new):
        others = sum(_forced_fan_in_fan_out(m) is value for _, m in new) - 1
        more = f" (and {others} more)" if others else ""
        layer = (
            "a transformers Conv1D, whose weight is stored (in, out)"
            if value
            else "a torch.nn.Linear, whose weight is stored (out, in)"
        )
        warnings.warn(
            f"fan_in_fan_out is set to {not value} but the target module {name!r}{more} is "
            f"{layer}. Setting fan_in_fan_out to {value}, as PEFT does: the config and its saved "
            "adapter_config.json keep the value the last such target sets (lorakit's layers "
            f"use each layer's own layout either way). Pass fan_in_fan_out={value} to avoid "
            "this, unless the targets mix nn.Linear and Conv1D layers.",
            FanInFanOutWarning,
            stacklevel=4,
        )
        config.fan_in_fan_out = value
