"""Merge adapters into the base weights, exactly reversibly, or for good.

``merge`` folds ``W = W0 + sum_a s_a B_a A_a`` (computed in float32, in float64 on a float64
base, rounded once to the weight dtype: ``functional.merge_dtype``) into a new weight and keeps
the original ``W0`` Parameter, so ``unmerge`` restores it bit for bit however many cycles are
done and in every dtype. The cost: while merged, each adapted
layer holds two weights. A weight tied to another module (GPT-2's ``wte`` / ``lm_head``) is
untied by the merge: the other module keeps the original, so outputs equal the unmerged model's.
``merge_and_unload`` then clears ``tie_word_embeddings`` and gives each module that transformers
would otherwise tie back on reload a tensor of its own (``unload.own_tensors_for_reload``), so
that ``save_pretrained`` + ``from_pretrained`` give the same outputs (BART, T5 too).
``merge_and_unload`` folds the adapters and returns the plain model with no lorakit module left.

On a base that accelerate offloaded ``merge_and_unload`` writes the merged weights into the
offload maps and ``merge`` refuses (``lorakit.offloaded_merge``).

On a quantized base (``lorakit.quantized``, docs/quantized.md) the quantized bytes are never
written: ``merge`` keeps the float ``W = dequant(W0) + sum_a s_a B_a A_a`` beside them,
``unmerge`` drops it, and ``merge_and_unload`` returns a float model in the model's own float
dtype (a bfloat16 model's dequantized linears are bfloat16, so the result runs).

Forwards may run in other threads during ``merge`` / ``unmerge``: each layer switches in one step
(``layers.merging.MergeState``), so each layer of such a forward computes ``W0 x + s B A x`` either
merged or not, and the output equals the merged and the unmerged model's within rounding. Which
layers it sees merged is not defined (no model-wide lock); ``merge_and_unload``, which replaces
modules, must not run beside forwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from lorakit import quantized
from lorakit.float_dtypes import cast_floats, check_float_dtype, model_float_dtype
from lorakit.layers import TrainableTokens
from lorakit.layers.tokens import forget_token_merges, record_token_merges, refuse_shared_rows
from lorakit.merge_choice import chosen_adapters, refuse_two_copies
from lorakit.offloaded_merge import (
    offload_merged,
    offloaded_bases,
    offloaded_layers,
    offloaded_refusal,
    onloaded,
)
from lorakit.offloading import onload_for_good
from lorakit.quantized_unload import (
    check_quantized_layers,
    dequantize_remaining,
    named_refusal,
    output_layer_quantized,
)
from lorakit.replication import own_replicated_tensors, tied_parameter_ids
from lorakit.state import adapter_model, lora_layers, saved_modules
from lorakit.unload import forget_state, keep_untied, put_saved_copy
from lorakit.wrapped_modules import replace_module

__all__ = ["merge", "merge_and_unload", "model_float_dtype", "unmerge"]


def merge(model: nn.Module, adapter_names: Sequence[str] | None = None) -> nn.Module:
    """Fold the given adapters (default: the active ones; a ``PeftModel``'s after
    ``disable_adapter_layers``, as in PEFT; with none active, none named and none merged a
    ``ValueError``: ``merge_choice``) into the base weights, in place; each merged weight is
    the float32 sum (float64 on a float64 base, as PEFT's) rounded once to its base weight's dtype.

    Idempotent. All or nothing: every layer's merged weight is computed and checked before any
    is installed, so if one would hold inf/NaN (a non-finite adapter, trainable-token rows
    too, or an overflow of the weight dtype) ValueError is raised and no layer has changed. A
    layer whose base weight accelerate offloaded is refused (``ValueError`` naming it) before
    any change: ``merge_and_unload`` merges into an offloaded base.
    """
    names = chosen_adapters(model, adapter_names)
    refuse_shared_rows(saved_modules(model), names, "merge")  # (token rows: PEFT's rule)
    _refuse_non_finite_rows(model, names, None, "merge")
    offloaded = next(offloaded_layers(model, names), None)
    if offloaded is not None:
        raise ValueError(offloaded_refusal(offloaded[0]))
    return _merge(model, names, None)


def _merge(
    model: nn.Module, adapter_names: Sequence[str] | None, dtype: torch.dtype | None
) -> nn.Module:
    """``merge``, each merged weight rounded once to ``dtype`` (None: its base weight's);
    ``merge_and_unload`` passes its ``float_dtype``, then casts the rest of the model to it."""
    names = chosen_adapters(model, adapter_names)
    for _, layer in lora_layers(model):  # adapter tensors accelerate offloaded with the model
        onload_for_good(layer)
    prepared = []
    for path, layer in lora_layers(model):
        try:
            weight, again = _prepared_weight(layer, names, dtype)
        except ValueError as error:  # name the layer: the message names the adapters only
            error.args = (f"module {path!r}: {error}", *error.args[1:])
            raise
        except quantized.UnsupportedQuantizedLayerError as error:  # (e.g. a repacked bnb base)
            raise named_refusal(path, layer.base_layer, error) from None
        if weight is not None:
            prepared.append((layer, weight, again))
    for layer, weight, again in prepared:
        if again:  # (the earlier merge's weight, exactly: the original comes back)
            layer.unmerge()
        layer.install_merge(weight)
    record_token_merges(saved_modules(model), names)  # (their weights are left as they are)
    return model


def _refuse_non_finite_rows(
    model: nn.Module, names: Sequence[str], dtype: torch.dtype | None, what: str
) -> None:
    """``ValueError`` (before any change) naming the embedding, the adapter and the token ids
    where ``what`` would write a trainable-token row holding inf/NaN into an embedding weight
    (the merged and the named adapters' rows, ``rows_to_merge``), also a finite row that
    ``dtype`` (default: the embedding's, e.g. float16 beside float32 rows) turns into inf."""
    for path, wrapper in saved_modules(model):
        if not isinstance(wrapper, TrainableTokens):
            continue
        wrapper.load_offloaded_copies()  # (rows offloaded with the model: their real values)
        wanted = dtype or wrapper.weight.dtype
        for adapter in wrapper.rows_to_merge(names):
            rows = wrapper.modules_to_save[adapter]
            finite = torch.isfinite(rows.values.detach().to(wanted)).all(dim=1).tolist()
            bad = [token for token, ok in zip(rows.token_ids, finite, strict=True) if not ok]
            if bad:
                raise ValueError(
                    f"{what}: adapter {adapter!r} holds trainable-token rows {bad} of embedding "
                    f"{path!r} that are not finite in {str(wanted)[6:]} (inf/NaN, or beyond its "
                    "range); refusing to write them into the weight. Train or load finite rows, "
                    "or merge without this adapter (adapter_names=[...]). Nothing was changed."
                )


def _prepared_weight(layer, names: Sequence[str], dtype: torch.dtype | None) -> tuple:
    """``(prepared, again)``: ``layer.prepare_merge`` of ``names`` (those it holds) rounded
    once to ``dtype``, and False; where ``dtype`` is given and the layer holds a 16-bit weight
    of another dtype merged earlier with nothing to add, ``W0 + sum_a s_a B_a A_a`` over them
    computed again from the original ``W0`` (the float32 sum rounded once to ``dtype``, not
    the earlier merge's rounded weight cast), and True: install it after ``unmerge``."""
    prepared = layer.prepare_merge([name for name in names if name in layer.ranks], dtype)
    if prepared is not None or dtype is None or layer.original_weight is None:
        return prepared, False  # (a quantized base keeps its merged weight in float32)
    held = layer.original_weight.dtype  # (a float32 / float64 merge cast to dtype: rounded once)
    if not layer.merged_adapters or held == dtype or held.itemsize >= 4:
        return None, False
    return layer._unmerged_view().prepare_merge(layer.merged_adapters, dtype), True


def unmerge(model: nn.Module) -> nn.Module:
    """Restore every merged layer's original weight tensor (bit-identical), in place."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    forget_token_merges(saved_modules(model))
    return model


def merge_and_unload(
    model: nn.Module,
    adapter_names: Sequence[str] | None = None,
    *,
    float_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Fold the given adapters (default: the active ones, chosen as ``merge`` chooses them) into
    the weights and return the plain model: LoRA layers replaced by their (now merged) base
    modules, ``modules_to_save`` replaced by the trained copy of the merged adapter that has
    one (the first active one's by default, as the forward; two NAMED adapters with copies of
    one module are refused, as in peft 0.22: ``merge_choice.refuse_two_copies``). Adapters
    merged earlier (``merge``) stay folded in, as in PEFT: unmerge them first to leave them out.
    Trainable-token rows that are not finite in the result's dtype are refused before any
    change, as a LoRA merge holding inf/NaN is.

    On a quantized base (``lorakit.quantized``) the result is a float model: every quantized
    linear (adapted or not) becomes a plain ``nn.Linear`` holding ``dequant(W0)`` (+ ``s B A``
    where adapted), computed in float32, and transformers' quantization config is removed. Its
    outputs equal the unmerged quantized model's within float rounding (``int8-rows`` /
    ``int4-groups``: within bfloat16 rounding, which their unmerged kernels apply to activations
    and outputs); nothing is quantized again (``lorakit.quantized.merge.requantize`` does that, on request, reporting the error it
    adds). A quantized output layer is its own copy, never the input embedding (``int8-rows`` /
    ``int4-groups`` quantize a tied head apart from the float embedding): dequantized, it still
    differs from the embedding, so a config that says tied is set to
    ``tie_word_embeddings = False`` and a reload gives the same outputs.

    ``float_dtype``: None (default) gives those linears the model's own float dtype (that of its
    input embeddings, else of most of its float weights outside the quantized layers; float32 if
    it has none), so a bfloat16 model comes back all bfloat16 and runs. A dtype given casts the
    whole returned model: every floating-point parameter (embeddings, norms, head, merged
    layers) ends in ``float_dtype``, so it runs too (a float32 copy of a bfloat16 model, or the
    reverse). A dtype that is not floating point is a ``ValueError``, raised before any change.

    With ``layer_replication`` the result is a plain model with the longer layer list: each
    layer copy gets its own tensors (the untargeted ones cloned), so it can be saved. The
    copies' shared tensors are no tie: a merge into them leaves ``tie_word_embeddings`` and a
    tied head as they were (``replication.tied_parameter_ids``).

    A merge (or trained copy) that unties tied weights sets ``config.tie_word_embeddings =
    False`` (also where the head still holds the input embedding, as BART's does after LoRA on
    ``encoder``/``decoder.embed_tokens``: left True, a ``tie_weights()`` call, made e.g. by
    ``resize_token_embeddings``, would put the unmerged embedding back into them), and each
    module that ``save_pretrained`` would leave out as a tie and ``from_pretrained`` would not
    tie back to the same tensor gets its own copy of it (``unload.keep_untied``: that
    BART head; T5's ``encoder``/``decoder.embed_tokens`` and head beside a merged ``shared``,
    which transformers 5 re-ties whatever the flag says). ``save_pretrained`` then writes them
    all and the reloaded model gives the outputs of this one (transformers 5 logs that it does
    not tie such T5 weights, whose values differ)."""
    names = chosen_adapters(model, adapter_names, "merge_and_unload")  # (a PeftModel's too)
    refuse_shared_rows(saved_modules(model), names, "merge_and_unload")  # (PEFT's rule)
    model = adapter_model(model)  # lorakit's PeftModel: the model inside it
    refuse_two_copies(model, adapter_names, "merge_and_unload")
    unloading = _checked_before_change(model, names, float_dtype)
    untied = _fold_and_unload(model, names, float_dtype, unloading)
    untie = untied or unloading.output_quantized
    _finish_plain_model(model, float_dtype, unloading.linear_dtype, untie)
    return model


class _Unloading(NamedTuple):
    """What ``merge_and_unload`` found before changing anything."""

    offloaded: list[tuple[nn.Module, object]]  # ``offloaded_merge.offloaded_bases``
    linear_dtype: torch.dtype  # of the float linears that replace quantized ones
    tied: set[int]  # ids of tensors held under several names (``tied_parameter_ids``)
    output_quantized: bool  # ``output_layer_quantized``
    untied_offloaded: bool  # an offloaded base to merge holds one of the ``tied`` tensors


def _checked_before_change(
    model: nn.Module, names: Sequence[str], float_dtype: torch.dtype | None
) -> _Unloading:
    """``merge_and_unload``'s first step: every refusal (``float_dtype``, non-finite token
    rows, an offloaded base it cannot merge, a quantized layer it cannot dequantize) and every
    reading of the model as it is (tied tensors, the quantized layers' float dtype), before
    any change."""
    check_float_dtype(float_dtype)
    _refuse_non_finite_rows(model, names, float_dtype, "merge_and_unload")
    offloaded = offloaded_bases(model, names)  # (refuses an offloaded one it cannot merge)
    found_quantized = check_quantized_layers(model)  # before any change (e.g. one bnb repacked)
    own_dtype = model_float_dtype(model) if found_quantized and float_dtype is None else None
    linear_dtype = float_dtype or own_dtype or torch.float32  # (used by quantized layers only)
    tied = tied_parameter_ids(model)  # (not the tensors layer_replication's copies share)
    output_quantized = output_layer_quantized(model)
    untied = any(id(base.weight) in tied for base, _ in offloaded)  # (before loading: new ones)
    return _Unloading(offloaded, linear_dtype, tied, output_quantized, untied)


def _fold_and_unload(
    model: nn.Module, names: Sequence[str], float_dtype: torch.dtype | None, unloading: _Unloading
) -> bool:
    """``merge_and_unload``'s second step: merge ``names`` (an offloaded base loaded for it and
    its merged weights written into its offload map), then replace every LoRA layer and saved
    module by the plain module. Whether a tied tensor is now untied."""
    untied = unloading.untied_offloaded
    with onloaded(unloading.offloaded):  # (offloaded again, as they were, if the merge raises)
        _merge(model, names, float_dtype)  # rounded once to float_dtype (a bf16 base's sum too)
    untied |= _unload_lora_layers(model, unloading.tied, unloading.linear_dtype)
    offload_merged(unloading.offloaded)
    untied |= _unload_saved_modules(model, names, unloading.tied)
    return untied


def _finish_plain_model(
    model: nn.Module, float_dtype: torch.dtype | None, linear_dtype: torch.dtype, untie: bool
) -> None:
    """``merge_and_unload``'s last step: quantized layers left dequantized (``linear_dtype``),
    layer copies given their own tensors, the floats cast to ``float_dtype`` if given, the
    config untied (``untie``) and lorakit's state of the model dropped."""
    dequantize_remaining(model, linear_dtype)
    own_replicated_tensors(model)  # layer copies (layer_replication) stop sharing tensors
    if float_dtype is not None:
        cast_floats(model, float_dtype)
    if untie:  # a merged (or trained copy of a) tied embedding no longer equals the other;
        keep_untied(model)  # a dequantized output layer is not the embedding
    forget_state(model)


def _unload_lora_layers(model: nn.Module, tied: set[int], linear_dtype: torch.dtype) -> bool:
    """Replace every LoRA layer by its base module, merged adapters folded in (``W0 + s B A``;
    a quantized base as a ``linear_dtype`` linear). ``tied``: ids of tensors held under several
    names; returns whether a merged layer's base weight was one of them (now untied)."""
    untied = False
    for name, layer in reversed(list(lora_layers(model))):  # nested layers before outer ones
        untied |= bool(layer.merged_adapters) and id(layer.original_weight) in tied
        replace_module(model, name, layer.unloaded_module(linear_dtype))
    return untied


def _unload_saved_modules(model: nn.Module, names: Sequence[str], tied: set[int]) -> bool:
    """Replace each ``modules_to_save`` wrapper by the trained copy of the first of ``names``
    that has one (else its original), and each trainable-token wrapper by its merged embedding;
    whether a trained copy replaced a module holding one of the ``tied`` parameters (ids)."""
    untied = False
    for name, wrapper in list(saved_modules(model)):
        if isinstance(wrapper, TrainableTokens):
            replace_module(model, name, wrapper.merged_module(names))
        else:
            untied |= put_saved_copy(model, name, wrapper, names, tied)
    return untied
