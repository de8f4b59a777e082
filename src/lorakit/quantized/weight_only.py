"""What lorakit's own weight-only formats share (``int8_rows``, ``int4_groups``).

``WeightOnlyLinear``: a frozen linear layer ``y = x W0^T + b`` whose forward runs its format's
kernel (``matmul(x)``) and whose backward, for an adapter trained on it, recomputes
``dL/dx = dL/dy W0`` from ``dequantized()`` (nothing saved). ``replace_linears``: swap a model's
``nn.Linear`` layers for such layers, in place, leaving in float those the model's class keeps
in float (``kept_in_float``: T5's ``wo``, whose forward reads ``wo.weight.dtype``, as
transformers leaves them unquantized for bitsandbytes) and those whose weight transformers'
code reads itself (``WEIGHT_READS``, ``weight_reads``: Mamba's ``dt_proj.weight @ x``).

Casting a model (``.float()``, ``.half()``, ``.to(dtype)``) casts the bias only: the stored
buffers (codes, bfloat16 scales) keep their dtypes, which the kernels require, and move with
the model to another device (``WeightOnlyLinear._apply``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from typing import NamedTuple

import torch
from torch import nn

__all__ = [
    "WEIGHT_READS",
    "WeightOnlyLinear",
    "bitsandbytes_float_layers",
    "kept_in_float",
    "replace_linears",
    "weight_reads",
]


class WeightOnlyLinear(nn.Module):
    """Subclasses store the weight and define ``matmul(x)`` (``x W0^T`` (..., out) in ``x``'s
    dtype) and ``dequantized()`` (``W0`` (out, in) in float32); ``bias`` (out,) or None."""

    bias: nn.Parameter | None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantized(self) -> torch.Tensor:
        raise NotImplementedError

    def _apply(self, fn, recurse: bool = True):
        """``nn.Module._apply`` (behind ``.to``, ``.float()``, ``.half()``, ``.cuda()``), except
        that a stored buffer keeps its dtype: where ``fn`` would change it (a cast), the
        original buffer is kept, moved only to the device ``fn`` chose. Lossless (no round
        trip through the new dtype) and paid once per cast, not per forward."""
        stored = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, before in stored.items():
            after = self._buffers[name]
            if before is not None and after is not None and after.dtype != before.dtype:
                self._buffers[name] = before.to(device=after.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            out = _FrozenMatmul.apply(x, self)
        else:  # (an autograd Function costs more than the kernel at one token)
            out = self.matmul(x)
        return out if self.bias is None else out + self.bias.to(out.dtype)


class _FrozenMatmul(torch.autograd.Function):
    """``module.matmul(x)`` with ``dL/dx = dL/dy W0`` recomputed (nothing saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: WeightOnlyLinear) -> torch.Tensor:
        ctx.module = module
        # (detached: the kernels return a view, and autograd forbids an in-place change, such
        # as Gemma3n's ``projection *= scale``, of a view made inside a custom Function)
        return module.matmul(x).detach()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight = ctx.module.dequantized().to(grad_output.dtype)  # (n, k)
        return grad_output @ weight, None


def replace_linears(
    model: nn.Module,
    convert: Callable[[nn.Linear], nn.Module | None],
    keep: Collection[nn.Module] | None = None,
) -> int:
    """Replace, in place, every ``nn.Linear`` of ``model`` (exact type) but those in ``keep``
    (None: ``kept_in_float(model)``) by ``convert(linear)`` where that is not None; returns how
    many were replaced."""
    kept = set(kept_in_float(model) if keep is None else keep)
    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and m not in kept]
    replaced = 0
    for name, module in targets:
        new = convert(module)
        if new is not None:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
            replaced += 1
    return replaced


class WeightRead(NamedTuple):
    """The linear layers (paths under an instance of the class) whose ``weight`` the class's
    transformers code reads itself; ``bitsandbytes``: those of them read in every forward in a
    way that also fails on a bitsandbytes layer (its packed codes: no guard in transformers);
    ``when``: whether the instance takes the reading path (None: always); ``float_under_bnb``:
    those a bitsandbytes load puts back in float (``loading.float_bitsandbytes_reads``): read
    only in a way a float weight holding ``dequant(W0)`` takes (Gemma3n's AltUp coefficients,
    clamped in place when training), so the model trains instead of being refused."""

    layers: tuple[str, ...]
    bitsandbytes: tuple[str, ...] = ()
    when: Callable[[nn.Module], bool] | None = None
    float_under_bnb: tuple[str, ...] = ()


def _bloom_slices(module: nn.Module) -> bool:
    """Bloom's ``slow_but_exact`` path: ``F.linear`` on slices of the weight, per TP rank."""
    return module.pretraining_tp > 1 and module.slow_but_exact


_MIXER_OUT = WeightRead(("out_proj",))  # (to the fused kernel, when training without a cache)
_HEAD = WeightRead(("lm_head",))  # (``hidden.to(self.lm_head.weight.dtype)``)
_ALTUP = ("prediction_coefs", "correction_coefs")
_REL_POS = ("rel_pos_bias", "rel_pos_x_bias", "rel_pos_y_bias")  # (``bias.weight[:, buckets]``)

#: By class name (any class of a module's MRO): transformers 5's models whose code reads a
#: linear layer's ``weight``, which a weight-only layer does not hold (found by grepping its
#: ``modeling_*.py`` for ``self.<layer>.weight`` outside initialisation; vision and audio
#: towers, which lorakit never runs, left out).
WEIGHT_READS: dict[str, WeightRead] = {
    # ``self.dt_proj.weight @ x`` every forward; x/dt/out_proj to the fused kernel (training)
    "MambaMixer": WeightRead(("x_proj", "dt_proj", "out_proj"), bitsandbytes=("dt_proj",)),
    "FalconMambaMixer": WeightRead(("dt_proj",)),  # (guarded for bitsandbytes: _is_quantized)
    "JambaMambaMixer": WeightRead(("dt_proj",)),
    "Mamba2Mixer": _MIXER_OUT,
    "BambaMixer": _MIXER_OUT,
    "FalconH1Mixer": _MIXER_OUT,
    "GraniteMoeHybridMambaLayer": _MIXER_OUT,
    "NemotronHMamba2Mixer": _MIXER_OUT,
    "Zamba2MambaMixer": _MIXER_OUT,
    "MambaForCausalLM": _HEAD,
    "FalconMambaForCausalLM": _HEAD,
    "Mamba2ForCausalLM": _HEAD,
    "xLSTMForCausalLM": _HEAD,
    # RwkvModel rescales these weights in place when switching between train and eval
    "RwkvBlock": WeightRead(("attention.output", "feed_forward.value")),
    # the dtype of o_proj's weight is the dtype of its attention branch
    "ErgoDecoderLayer": WeightRead(("self_attn.o_proj",), bitsandbytes=("self_attn.o_proj",)),
    "Dots3NoteTextIndexer": WeightRead(("weights_proj",), bitsandbytes=("weights_proj",)),
    "Inkling2LoopMessageGate": WeightRead(("down_proj",), bitsandbytes=("down_proj",)),
    "HunYuanMoEV1Gate": WeightRead(("wg",)),  # (``wg.weight.dtype == torch.float32``)
    # (training: ``prediction_coefs.weight.data.clamp_``, ``F.linear(x, correction_coefs.weight)``)
    "Gemma3nTextAltUp": WeightRead(_ALTUP, float_under_bnb=_ALTUP),
    "LSHSelfAttention": WeightRead(("query_key", "value")),  # (Reformer's cached decoding)
    "LayoutLMv2Encoder": WeightRead(_REL_POS, _REL_POS),
    "LayoutLMv3Encoder": WeightRead(_REL_POS, _REL_POS),
    "BloomAttention": WeightRead(("dense",), ("dense",), _bloom_slices),
    "BloomMLP": WeightRead(("dense_4h_to_h",), ("dense_4h_to_h",), _bloom_slices),
}


def weight_reads(model: nn.Module) -> list[tuple[str, str, bool]]:
    """``(layer's full name, reading class, whether the read fails on bitsandbytes)`` for each
    layer of ``model`` whose weight transformers' code reads itself (``WEIGHT_READS``), whatever
    the layer's type now (an ``nn.Linear``, or a quantized layer in its place)."""
    return [
        (f"{name}.{path}" if name else path, reader, path in read.bitsandbytes)
        for name, module, reader, read in _reads(model)
        for path in read.layers
        if _has(module, path)
    ]


def bitsandbytes_float_layers(model: nn.Module) -> list[str]:
    """The full names of the layers of ``model`` that a bitsandbytes load puts back in float
    (``WeightRead.float_under_bnb``: Gemma3n's AltUp coefficients)."""
    return [
        f"{name}.{path}" if name else path
        for name, module, _, read in _reads(model)
        for path in read.float_under_bnb
        if _has(module, path)
    ]


def _reads(model: nn.Module):
    """``(name, module, class name, WeightRead)`` for each module of ``model`` and each class of
    its MRO that ``WEIGHT_READS`` names, where the module takes the reading path (``when``)."""
    for name, module in model.named_modules():
        for cls in type(module).__mro__:
            read = WEIGHT_READS.get(cls.__name__)
            if read is not None and (read.when is None or read.when(module)):
                yield name, module, cls.__name__, read


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:  # (an optional layer this instance does not have)
        return False
    return True


def kept_in_float(model: nn.Module) -> list[nn.Linear]:
    """The ``nn.Linear`` layers (exact type) of ``model`` that stay float: those its class keeps
    in float, named by ``_keep_in_fp32_modules`` (T5's ``["wo"]``) or
    ``_keep_in_fp32_modules_strict`` (an instance's lists gather its submodels'), and those
    whose weight transformers' code reads itself (``weight_reads``: Mamba's ``dt_proj``).
    transformers leaves the first list's layers unquantized for bitsandbytes
    (``HfQuantizer.get_modules_to_not_convert``); the strict list names what it keeps in
    float32 at every dtype, so it is kept too. A pattern matches a layer's full name as
    transformers' ``should_convert_module`` does: as a regex from the start up to a module
    boundary, or as its end; one naming a parameter (``"gate.weight"``) keeps the layer
    holding it."""
    patterns = sorted(
        {
            *(getattr(model, "_keep_in_fp32_modules", None) or ()),
            *(getattr(model, "_keep_in_fp32_modules_strict", None) or ()),
        }
    )
    read = {name for name, _, _ in weight_reads(model)}
    return [
        module
        for name, module in model.named_modules()
        if type(module) is nn.Linear and (name in read or _named_by(patterns, name))
    ]


def _named_by(patterns: list[str], name: str) -> bool:
    """Whether one of ``patterns`` names the layer ``name`` or its weight."""
    return any(_names(pattern, name) or _names(pattern, f"{name}.weight") for pattern in patterns)


def _names(pattern: str, full_name: str) -> bool:
    """Whether ``pattern`` names ``full_name`` by transformers 5's ``should_convert_module``
    rule ("layer.1" names "layer.1.attn", not "layer.11.attn"; "fc1" names "...23.fc1")."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return bool(re.match(rf"(?:{pattern}){boundary}", full_name)) or full_name.endswith(pattern)
