"""Sibling projections computed in one product: q/k/v, gate/up (the decode step's base side).

Semantics: for modules m_1..m_n that read the same input x (..., k) with base weights W_i
(d_i, k) and biases b_i, ``[y_1 .. y_n] = x [W_1; ..; W_n]^T + [b_1; ..; b_n]`` is one product
over the concatenated weight (D, k), D = sum d_i, then split into views y_i (..., d_i). At one
token per row a product reads all of its weight for a few multiply-adds per byte: one larger
product costs less than three small ones (one call, one pass, fewer Python steps).

The concatenation is the only copy: each member's weight (an ``nn.Linear``'s ``weight``, an
``Int8RowsLinear``'s codes and row scales, an ``Int4GroupsLinear``'s packed codes) becomes a view
of its rows, so the model's own forward (prefill, transformers) reads the same storage (int4's
group scales, laid out (groups, out, 2), are concatenated along out: a copy of a quarter of the
codes' bytes). A member whose weight is later rebound to another tensor (a merge, a load) is
noticed at the next call (``intact``): the group then calls its members one by one, each as it
is.

A member that is a LoRA layer under a serving router (``lorakit.layers.row_router``) gets its
adapters added to its slice of the output by that router, the call its own forward would make
(``router(layer, x, base_output)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers import LoraLayer
from lorakit.quantized.int4_groups import BLOCK, Int4GroupsLinear
from lorakit.quantized.int8_rows import Int8RowsLinear

__all__ = ["SiblingGroup", "fuse_bases"]


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module


def _mark(module: nn.Module, base: nn.Module) -> tuple:
    """What ``SiblingGroup.intact`` checks of a member: ``(module, base, the dictionary holding
    the base's first row tensor (``_parameters`` or ``_buffers``), its name, its data pointer)``;
    a LoRA layer holds its base in ``_modules["base_layer"]``."""
    name = _ROWS[type(base)][0]
    tensors = base._parameters if name in base._parameters else base._buffers
    return module, base, tensors, name, tensors[name].data_ptr()


# Per fusable base type: the tensors concatenated by output rows (the members' become views of
# the concatenation) and those concatenated along dim 1 (copied: int4's scales, a few percent).
_ROWS = {
    nn.Linear: ("weight",),
    Int8RowsLinear: ("codes", "scale"),
    Int4GroupsLinear: ("packed",),
}
_COLUMNS = {Int4GroupsLinear: ("scales_and_offsets",)}


def _plain(module: nn.Module) -> bool:
    """A base computed by its weights alone: no hooks, exactly one of the fusable types."""
    hooks = module._forward_hooks or module._forward_pre_hooks
    return not hooks and type(module) in _ROWS


def _fusable(bases: Sequence[nn.Module]) -> bool:
    if len(bases) < 2 or not all(map(_plain, bases)) or len({type(b) for b in bases}) != 1:
        return False
    kind = type(bases[0])
    for name in (*_ROWS[kind], *_COLUMNS.get(kind, ())):
        if len({(getattr(b, name).dtype, getattr(b, name).device) for b in bases}) != 1:
            return False
    if kind is Int4GroupsLinear and any(b.out_features % BLOCK for b in bases[:-1]):
        return False  # (a 32-row block packs differently inside the concatenation)
    return len({b.in_features for b in bases}) == 1 and len({b.bias is None for b in bases}) == 1


def _build(kind: type, rows: dict, columns: dict, bias, in_features: int) -> nn.Module:
    if kind is Int8RowsLinear:
        return Int8RowsLinear(rows["codes"], rows["scale"], bias)
    if kind is Int4GroupsLinear:
        return Int4GroupsLinear(rows["packed"], columns["scales_and_offsets"], bias)
    out_features = rows["weight"].shape[0]
    fused = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    fused.weight = nn.Parameter(rows["weight"], requires_grad=False)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    return fused


def fuse_bases(bases: Sequence[nn.Module]) -> nn.Module | None:
    """One module computing all of ``bases``' outputs side by side, whose weights' rows are the
    bases' weights (which become views of them); None when they cannot be fused (mixed or
    other types, hooks, dtypes or devices that differ, some with a bias and some without)."""
    if not _fusable(bases):
        return None
    kind = type(bases[0])
    with torch.no_grad():
        rows = {n: torch.cat([getattr(b, n).detach() for b in bases]) for n in _ROWS[kind]}
        columns = {
            n: torch.cat([getattr(b, n) for b in bases], dim=1) for n in _COLUMNS.get(kind, ())
        }
        bias = None if bases[0].bias is None else torch.cat([b.bias.detach() for b in bases])
    fused = _build(kind, rows, columns, bias, bases[0].in_features)
    start = 0
    for base in bases:
        width = base.out_features
        for name in _ROWS[kind]:
            view = getattr(fused, name)[start : start + width]
            current = getattr(base, name)
            if isinstance(current, nn.Parameter):
                current.data = view  # the same Parameter object, now a view of the rows
            else:
                setattr(base, name, view)  # (a buffer)
        if bias is not None:
            base.bias.data = fused.bias[start : start + width]
        start += width
    return fused


class SiblingGroup:
    """Modules that read the same input; ``group(x)`` -> their outputs, in order.

    ``fuse``: compute the bases in one product (``fuse_bases``; a group of one: its plain base)
    when they allow it, the adapters added by the router; otherwise, and whenever a member's
    weight was rebound since (``intact``), each module is called itself.
    """

    def __init__(self, modules: Sequence[nn.Module], *, fuse: bool) -> None:
        self.modules = list(modules)
        self.bases = [_base(m) for m in self.modules]
        self.widths = [getattr(b, "out_features", None) for b in self.bases]
        self.lora = [isinstance(m, LoraLayer) for m in self.modules]
        if fuse and len(self.bases) == 1:  # one module: its base as it is, when plain
            self.fused = self.bases[0] if _plain(self.bases[0]) else None
        else:
            self.fused = fuse_bases(self.bases) if fuse else None
        fused = self.fused is not None
        self._marks = (
            [_mark(m, b) for m, b in zip(self.modules, self.bases, strict=True)] if fused else []
        )

    def intact(self) -> bool:
        """True while every member's base is the module fused and its weight still the view it
        was given then (checked before each use: dictionary lookups and a data pointer per
        member, not ``nn.Module`` attribute lookups, as the step calls it 120 times)."""
        if self.fused is None:
            return False
        for module, base, tensors, name, pointer in self._marks:
            if module is not base and module._modules.get("base_layer") is not base:
                return False  # a LoRA layer's base replaced
            tensor = tensors.get(name)
            if tensor is None or tensor.data_ptr() != pointer:
                return False  # the weight rebound (a new tensor, or ``.data`` set)
        return True

    def __call__(self, x: torch.Tensor, router=None) -> list[torch.Tensor]:
        """Outputs (..., d_i) for ``x`` (..., k); ``router``: the serving router in force
        (``lorakit.layers.current_router()``), which adds each LoRA member's adapters (all at
        once where it can: ``add_siblings``, e.g. ``one_adapter.OneAdapterRouter``)."""
        if not self.intact():
            return [module(x) for module in self.modules]
        fused = self.fused
        out = F.linear(x, fused.weight, fused.bias) if type(fused) is nn.Linear else fused(x)
        if router is None and any(self.lora):
            raise RuntimeError(
                "a fused group of LoRA layers ran without a serving router; fuse only models "
                "served from an adapter bank"
            )
        add_siblings = getattr(router, "add_siblings", None)
        if add_siblings is not None and add_siblings(self.modules, self.widths, x, out):
            return self._parts(out)
        parts = self._parts(out)
        for index, module in enumerate(self.modules):
            if self.lora[index]:
                parts[index] = router(module, x, parts[index])
        return parts

    def _parts(self, out: torch.Tensor) -> list[torch.Tensor]:
        """Each member's view (..., d_i) of ``out`` (..., sum d_i); a lone member's: ``out``."""
        if len(self.widths) == 1:
            return [out]
        return list(out.split_with_sizes(self.widths, dim=-1))
