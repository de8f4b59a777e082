"""Which layers a base-changing initialisation (PiSSA, OLoRA, LoftQ: ``lorakit.init_methods``)
may rewrite, checked before any weight changes: a plain float ``nn.Linear`` / ``Conv1D`` weight of
its own (not quantized, not tied or shared by ``layer_replication``), with no adapter on it yet
and room for the rank (``check_layer_takes``); and which of them lorakit can redo exactly when it
loads a PEFT file saved without conversion (``check_redo_on_load``: not a randomised PiSSA, nor
OLoRA / LoftQ on a Conv1D from a PEFT before 0.22).
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.init_methods import randomised_pissa

__all__ = ["check_layer_takes", "check_redo_on_load"]


def check_layer_takes(
    layer_class: type,
    module: nn.Module,
    name: str,
    init: str,
    rank: int | None = None,
    shared_with: list[str] | tuple[str, ...] = (),
) -> None:
    """``ValueError`` unless the LoRA layer ``layer_class`` wrapping ``module`` can take a
    base-changing ``init``: a ``LoraLinear`` (``nn.Linear`` / ``Conv1D``, not quantized)
    with a float32, float16 or bfloat16 weight and no adapter (merged or not: the init
    rewrites the weight they were trained on); with ``rank`` (the
    adapter's rank there) at most ``min(d, k)`` of the weight; ``shared_with``: the other
    names under which the model holds the very same weight Parameter (tied weights,
    ``layer_replication`` copies), which must be none: the init rewrites the weight in
    place."""
    from lorakit.layers import LoraLinear

    base = getattr(module, "base_layer", module)
    _refuse_quantized(base, name, init)
    if layer_class is not LoraLinear:
        raise ValueError(
            f"init_lora_weights={init!r} rewrites the base weight and lorakit implements it for "
            f"nn.Linear and Conv1D only; module {name!r} is a {type(base).__name__}: remove it "
            "from target_modules (or add it to exclude_modules)."
        )
    weight = _rewritable_weight(base, name, init)
    _refuse_adapters_there(module, name, init)
    smallest = min(weight.shape)
    if rank is not None and rank > smallest:
        raise ValueError(
            f"module {name!r} has a weight of shape {tuple(weight.shape)}: "
            f"init_lora_weights={init!r} takes the adapter from its principal part, which has "
            f"at most min(d, k) = {smallest} directions, so it cannot give it rank {rank} (peft "
            f"would train a rank-{smallest} adapter whose config says {rank}). Lower the rank "
            f"there, e.g. rank_pattern={{{name!r}: {smallest}}}, or lower r, or remove the "
            "module from target_modules (or add it to exclude_modules)."
        )
    if shared_with:
        raise ValueError(
            f"module {name!r}: its weight Parameter is shared with {sorted(shared_with)} (tied "
            f"weights or layer_replication copies), and init_lora_weights={init!r} rewrites it "
            "in place, which would change every module using it (and subtract the principal "
            "part once per adapted sharer). Remove the module from target_modules (or add it "
            "to exclude_modules), untie the weight first (give each module its own copy), or "
            "use init_lora_weights=True."
        )


def _rewritable_weight(base: nn.Module, name: str, init: str) -> torch.Tensor:
    """``base``'s weight, which a base-changing ``init`` rewrites: float32, float16 or bfloat16
    (``ValueError`` naming the module and what to do otherwise)."""
    weight = getattr(base, "weight", None)
    if weight is None or weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        dtype = getattr(weight, "dtype", None)
        fix = (
            "cast the model to float32 first (model.float())"
            if dtype is not None and dtype.is_floating_point
            else "initialise on the unquantized model, then quantize the residual base"
        )
        raise ValueError(
            f"init_lora_weights={init!r} needs a float32/float16/bfloat16 base weight; module "
            f"{name!r} has {dtype}: {fix}."
        )
    return weight


def _refuse_adapters_there(module: nn.Module, name: str, init: str) -> None:
    """``ValueError`` when ``module`` holds adapters, merged or not: a base-changing ``init``
    would rewrite the weight they were trained on."""
    if getattr(module, "merged_adapters", ()):
        raise ValueError(
            f"module {name!r} has merged adapters {module.merged_adapters}; unmerge them before "
            f"adding an adapter with init_lora_weights={init!r}."
        )
    held = list(getattr(module, "ranks", None) or ())
    if held:
        raise ValueError(
            f"module {name!r} already holds adapters {held}; init_lora_weights={init!r} rewrites "
            "its base weight in place (W0 - s B0 A0), under them, so their outputs would change "
            "(they were trained on W0). Add this adapter to a model without adapters there "
            "(first, or on its own copy of the model), or use init_lora_weights=True."
        )


def _refuse_quantized(base: nn.Module, name: str, init: str) -> None:
    """``ValueError`` when ``base`` is a quantized layer: its stored codes cannot hold the
    residual ``W0 - s B A`` (nor, for LoftQ, the float ``W0`` it starts from)."""
    from lorakit import quantized

    if quantized.is_quantized(base):
        kind = f"quantized ({quantized.describe(base)})"
    elif quantized.looks_quantized(base) is not None:
        kind = f"quantized ({quantized.looks_quantized(base)})"
    else:
        return
    raise ValueError(
        f"init_lora_weights={init!r} takes the adapter from the float base weight and rewrites "
        f"it, and module {name!r} is {kind}. Initialise on the unquantized (float) model, "
        "save the residual base it leaves (lorakit.unload) and quantize that afterwards, as "
        "peft advises; or use init_lora_weights=True on the quantized model."
    )


def check_redo_on_load(
    init: str, module: nn.Module, name: str, written_by: str | None = None
) -> None:
    """``ValueError`` unless lorakit can redo ``init`` on ``module`` exactly as the PEFT that
    wrote the file (``written_by``: its ``peft_version``, None when the file has none) does when
    it loads it: never for ``"pissa_niter_K"`` (a randomised SVD: the base it trained on cannot
    be computed again), nor OLoRA or LoftQ on a Conv1D from a PEFT before 0.22 or of unknown
    version: that PEFT ran them on the stored weight, (k, d) = ``W0^T``, so A (r, d) and B
    (k, r) do not have the adapter's shapes (r, k), (d, r) unless the weight is square (its own
    forward fails on them), and the base it left is not the one lorakit computes (OLoRA's
    ``W_res`` is not ``W0 - s B A``; LoftQ's NF4 blocks run over the other flattening). PEFT
    0.22 runs them on ``W0`` (d, k) there, as lorakit does (``lorakit.init_factors``)."""
    convert = (
        "convert the adapter into a plain LoRA for the original base when saving it (peft's "
        "save_pretrained(..., path_initial_model_for_weight_conversion=<initial adapter>), "
        "lorakit's save_adapter(..., initial_adapter=...)), or load it onto the residual model "
        "after setting init_lora_weights to true in its adapter_config.json."
    )
    if randomised_pissa(init):
        raise ValueError(
            f"init_lora_weights={init!r}: peft reruns this randomised SVD on load, so the base "
            f"it gives is not the one the adapter was trained on; {convert}"
        )
    base = getattr(module, "base_layer", module)
    if init in ("olora", "loftq") and getattr(base, "nf", None) is not None:
        _refuse_conv1d_before_022(init, name, written_by)


def _refuse_conv1d_before_022(init: str, name: str, written_by: str | None) -> None:
    """``ValueError`` for an OLoRA / LoftQ file on the Conv1D ``name`` unless its
    ``peft_version`` (``written_by``) is 0.22 or later (``moe_entries.rule_release``)."""
    from lorakit.moe_entries import PEFT_022, rule_release

    if written_by is not None and rule_release(written_by) >= PEFT_022:
        return
    writer = (
        f"peft {written_by}" if written_by else "a peft that records no peft_version (before 0.18)"
    )
    raise ValueError(
        f"init_lora_weights={init!r} on the Conv1D {name!r}, written by {writer}: peft before "
        "0.22 ran this init on the stored (transposed, in x out) weight of a Conv1D, which "
        "gives A and B of the wrong shapes (its own forward fails on them) or, on a square "
        "weight, another base than the one lorakit (and peft 0.22) computes; lorakit cannot "
        "reproduce that model. Initialise and train the adapter again with peft >= 0.22 or "
        "lorakit (both use the (out, in) weight; their files load)."
    )
