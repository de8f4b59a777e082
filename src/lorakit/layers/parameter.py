"""``LoraParameter``: LoRA on a bare ``nn.Parameter`` (PEFT's ``target_parameters``).

Some modules hold a weight that no ``nn.Linear`` wraps, e.g. the fused expert weights of the
mixture-of-experts layers in transformers 5 (``experts.gate_up_proj`` (E, d, k)). The layer
wraps the module that OWNS the parameter and, for each call, hands the module
``W0 + sum_a delta_a`` in place of ``W0`` (``torch.func.functional_call``; the module's own
forward runs unchanged)::

    2-D W0 (d, k):     delta = s B A,                          A (r, k),   B (d, r)
    3-D W0 (E, d, k):  delta[e] = s B[:, e::E] A[e r:(e+1) r],  A (E r, k), B (d, E r)

(``lorakit.functional.parameter_delta_weight``; a module marked ``is_transposed`` stores each
expert (k, d) and gets the transposed blocks). Merging adds the delta into the parameter (a new
Parameter, the original kept aside: unmerge is exact). As in PEFT, dropout, DoRA, a bias on B
and ``fan_in_fan_out`` are refused, and several parameters of one module are adapted by nested
layers, the first parameter (in the module's order) innermost: the layer of the last one sits
at ``<module>``, the one before at ``<module>.base_layer``, and so on (PEFT's key names).
Keys: ``<layer path>.lora_A.<adapter>.weight`` (E r, k), ``<layer path>.lora_B.<adapter>.weight``
(d, E r).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorakit import functional
from lorakit.layers.base import LoraLayer, _same_adapters

__all__ = ["LinearFactors", "LoraParameter", "owner_of", "parameter_layout"]


def _factor(weight: torch.Tensor) -> nn.Linear:
    """A bias-free ``nn.Linear`` holding ``weight`` (out, in) as its Parameter, built without
    ``nn.Linear.__init__``: its random draw would be thrown away, and when loading adapters
    building hundreds of modules the usual way costs more than reading the file."""
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.__dict__.update(out_features=weight.shape[0], in_features=weight.shape[1])
    linear.register_parameter("weight", nn.Parameter(weight))
    linear.register_parameter("bias", None)
    return linear


class LinearFactors:
    """The factors kept as bias-free ``nn.Linear`` modules (``_factor``) in the layer's
    ``lora_A`` / ``lora_B`` ``ModuleDict``s (PEFT's keys ``lora_A.<adapter>.weight``, shapes
    ``factor_shapes``): ``LoraParameter``'s and ``layers.linear.LoraLinear``'s."""

    def store_factors(self, adapter_name: str, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        self.lora_A[adapter_name] = _factor(lora_A)
        self.lora_B[adapter_name] = _factor(lora_B)

    def _delete_adapter_tensors(self, adapter_name: str) -> None:
        del self.lora_A[adapter_name]
        del self.lora_B[adapter_name]


def parameter_layout(parameter: torch.Tensor, transposed: bool) -> tuple[int, int, int]:
    """``(num_experts, out_features, in_features)`` of a targeted parameter: 0 experts for a
    2-D (d, k) one; (E, d, k), or (E, k, d) when ``transposed``, for a 3-D one. ValueError for
    any other number of dimensions."""
    shape = tuple(parameter.shape)
    if len(shape) == 2:
        return 0, shape[0], shape[1]
    if len(shape) == 3:
        experts, first, second = shape
        return (experts, second, first) if transposed else (experts, first, second)
    raise ValueError(f"a {len(shape)}-D parameter of shape {list(shape)}")


def owner_of(module: nn.Module) -> nn.Module:
    """The module that holds the parameters under any nesting of ``LoraParameter`` layers."""
    while isinstance(module, LoraParameter):
        module = module.base_layer
    return module


class LoraParameter(LinearFactors, LoraLayer):
    """LoRA on the parameter ``parameter_name`` of the module ``owner_of(base_layer)``.

    Calls are those of the wrapped module (any arguments); ``h`` is what the module computes
    with ``W0 + sum_a delta_a`` (see the module docstring for the shapes).
    """

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        owner = owner_of(base_layer)
        self.transposed = bool(getattr(owner, "is_transposed", False))
        layout = parameter_layout(getattr(owner, parameter_name), self.transposed)
        self.num_experts, self.out_features, self.in_features = layout
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    # ----------------------------------------------------------------- the parameter
    def live_weight(self) -> torch.Tensor:
        return getattr(owner_of(self.base_layer), self.parameter_name)

    def set_live_weight(self, weight: nn.Parameter) -> None:
        setattr(owner_of(self.base_layer), self.parameter_name, weight)

    @property
    def weight(self) -> torch.Tensor:
        return self.live_weight()

    def parameter_path(self, layer_path: str) -> str:
        """The parameter's path in the model, for this layer at ``layer_path``."""
        owner = layer_path
        while owner.endswith(".base_layer"):
            owner = owner.removesuffix(".base_layer")
        return f"{owner}.{self.parameter_name}"

    def _path_to_parameter(self) -> str:
        """The parameter's name seen from ``base_layer`` (through nested layers)."""
        path, module = self.parameter_name, self.base_layer
        while isinstance(module, LoraParameter):
            path, module = f"base_layer.{path}", module.base_layer
        return path

    # ----------------------------------------------------------------- forward
    def forward(self, *args, **kwargs):
        """The wrapped module's output computed with ``W0 + sum_a delta_a`` over the chosen,
        unmerged adapters (the module itself when there is nothing to add)."""
        merge, original = self.read_merge_state()
        adapters = self.chosen_adapters()
        if _same_adapters(adapters, merge.adapters):  # none, or the merged ones: in place
            return self.base_layer(*args, **kwargs)
        weight = original
        for name in adapters:
            weight = weight + self.adapter_delta(name).to(original.dtype)
        replaced = {self._path_to_parameter(): weight}
        return torch.func.functional_call(self.base_layer, replaced, args, kwargs)

    def adapter_delta(self, adapter_name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``delta`` of one adapter laid out like the parameter, in ``dtype`` (default: the
        adapter's), with gradients to A and B."""
        lora_A, lora_B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        return functional.parameter_delta_weight(
            lora_A,
            lora_B,
            self.scalings[adapter_name],
            self.num_experts,
            self.transposed,
            dtype=dtype or lora_A.dtype,
        )

    # ----------------------------------------------------------------- LoraLayer interface
    def factor_shapes(self, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
        rows = rank * max(1, self.num_experts)
        return (rows, self.in_features), (self.out_features, rows)

    def init_factors(self, lora_A: torch.Tensor, lora_B: torch.Tensor, init: bool | str) -> None:
        """As PEFT's ``ParamWrapper``: A kaiming-uniform (``nn.Linear(k, E r)``'s draw), B = 0;
        "gaussian": A ~ N(0, 1/r^2) with r the rank per expert; False: B kaiming-uniform too (on a
        float16 / bfloat16 base ``_new_factors`` rounds them through its dtype, as PEFT's are;
        drawn in float32 and cast on a float64 one, ``LoraLayer._new_factors``)."""
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(lora_B, a=math.sqrt(5))
        if init is False:
            return
        if init == "gaussian":
            nn.init.normal_(lora_A, std=max(1, self.num_experts) / lora_A.shape[0])
        else:
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        nn.init.zeros_(lora_B)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        return [self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """What merging adds: ``adapter_delta`` in ``functional.merge_dtype`` of the parameter's
        dtype (float32; float64 on a float64 parameter, as PEFT's merge)."""
        return self.adapter_delta(adapter_name, functional.merge_dtype(self.base_float_dtype))

    def lora_branch(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        raise TypeError(
            f"LoRA on the parameter {self.parameter_name!r} changes the weight, not an output "
            "that can be added; it has no separate branch (serving it per row is not supported)."
        )

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}; " + super().extra_repr()
