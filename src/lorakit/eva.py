"""EVA (Explained Variance Adaptation; PEFT's ``init_lora_weights="eva"``): A from the principal
directions of each layer's inputs, B = 0, ranks moved to the layers whose inputs need them.

``inject`` with ``init_lora_weights="eva"`` gives B = 0 (A as drawn); then
``initialize_lora_eva_weights(model, dataloader)`` runs the model (no gradient, eval mode) over
batches and, per adapted ``nn.Linear`` / ``Conv1D`` layer (quantized bases included) with
inputs X (n tokens x k, n >= 2)::

    mean = sum(X) / n,   C = (X^T X - n mean mean^T) / (n - 1)       (k x k, float64)
    C = V diag(lam) V^T,  lam descending;   explained ratio_i = lam_i / sum(lam)

Token positions count when ``attention_mask`` is 1 and (``use_label_mask``) ``labels`` is not
``label_mask_value``, whether the batch gives ``input_ids`` or ``inputs_embeds``
(``lorakit.eva_inputs``); those masks must have the layer input's (batch, T) shape (``ValueError``
otherwise, e.g. an encoder-decoder model's labels), and a layer input that counts, over the
whole loader, fewer tokens than the components its layers may take (the largest
``round(r * rho)`` of them, at most k + 1 for an input of width k, which has only k
components: n tokens give only n - 1 directions with variance) or fewer than 2 is refused (``ValueError`` naming it, the tokens counted and the components needed, before the
model is changed). The statistics are the base model's: every
adapter is off while they are taken (``lorakit.disabled``, as PEFT runs under
``disable_adapter``). Ranks: the budget is the sum of the layers' ranks; each layer offers its
first ``round(r * rho)`` ratios (layers that read the same input: the largest ``round(r * rho)``
among them, PEFT's ``max_components``), and the budget's worth of largest ratios over all layers
decide how many each layer gets (ties, i.e. the layers of one input, split as PEFT splits them:
its list order and ``torch.argsort``, then the group's first layer takes the group's largest
count; ``lorakit.eva_statistics.redistribute_ranks``). Each component's sign is PEFT's
(``svd_flip``: its largest-magnitude entry positive). Convergence, as PEFT judges it: each
call of a layer input's layer is one step, as each call of PEFT's ``SVDHook`` is (a layer run
several times per forward, e.g. ALBERT's shared layer, takes several steps per batch); a call that
counts fewer tokens for a layer input than the components its layers may take (the largest
``round(r * rho)`` of them, at most k + 1; e.g. a prompt-only batch, labels all -100) is skipped for that
input, as PEFT's ``SVDHook`` skips it: its tokens are not added and it is no convergence step.
A layer input gets components from its first step not skipped (and n >= 2); after each later
such step it compares its leading components with their values at the step before (signed
cosine >= ``tau``, as PEFT); before each batch, an input whose needed components all passed
stops collecting (its statistics are frozen), and one that no longer passes (the distribution
moved) collects again. The needed components, as PEFT's ``rank_dist``: until every input has
components (no rank distribution yet), all an input's layers may take (PEFT starts from
``rank_dist = max_components``), so an input whose components all converged early stops at
once; then the most the current rank distribution gives its layers. Reading stops once every
input is frozen, or when the loader ends. An input for which every call was skipped (PEFT
would cycle the loader for ever) takes its components from all its counted tokens, if they are
enough (above). As PEFT does, silently, a ``rho`` above 1000 is capped at ``max_dim // r``
(``max_dim`` the largest dimension of any of the model's parameters). The settings are checked
again when EVA reads them (``EvaConfig``'s messages), so a field changed after the config was
built is checked too. Layer with
rank r' > 0: ``A = V[:, :r']^T`` (r' x k; ``whiten``: row i divided by
``((n - 1) lam_i) ** (1/4)``, the square root of the i-th singular value of the centred X of
the batches read), B = 0, and with
``adjust_scaling_factors`` ``alpha' = alpha r' / r``; r' = 0: the layer loses the adapter. A
DoRA adapter stays DoRA (its magnitude ``||W0 + s B A|| = ||W0||`` per row, as PEFT's). The
config's ``target_modules``, ``rank_pattern`` and ``alpha_pattern`` then name what was chosen,
as PEFT writes them: every layer of the adapter whose rank or alpha differs from ``r`` /
``lora_alpha``, those EVA does not re-initialise (embeddings) included. PEFT computes the
principal directions by incremental PCA (randomised SVD); lorakit's are exact, so directions
agree to PEFT's approximation, not bit for bit, and a component near the ``tau`` threshold can
be judged converged a batch earlier or later. One difference is deliberate: lorakit reads the
loader once, where PEFT cycles it until every layer has converged, counting repeated batches
again. With a loader long enough for every layer to converge before it ends, the two read the
same batches per layer (up to that threshold effect); with a shorter one PEFT's statistics
weigh repeated batches twice, so with ``whiten`` its row scales and, with ``rho > 1``, the
ranks it redistributes can differ from lorakit's. With ``whiten``, PEFT 0.21 also divides the
shared components of an input that several layers read in place, once per layer whose rank
includes the row, and its layers' A are views of that one tensor (q/k/v at equal ranks: every
row divided by ``s_i ** 1.5`` in all three, not ``s_i ** 0.5``); lorakit divides each layer's
rows once.

Cost: per distinct layer input (layers reading the same tensor, e.g. q/k/v, share one) one
k x k float64 moment matrix (a second one only while all its calls were skipped) and its
leading ``c`` components (c x k, c the largest ``round(r * rho)``); while one input's
components are computed, its k x k covariance and the eigendecomposition's eigenvectors and
workspace besides. E.g. SmolLM2-135M, ``"all-linear"``: 120 inputs, 768 MiB of moments (peak
RSS about 2000 MiB with the model and its forward, from 444 MiB). Time: each step not skipped is one
k x k float64 eigendecomposition (O(k^3); on one CPU core about 0.2 s at k = 576 and 2-3 s at
k = 1536, SmolLM2's widths) per layer input, i.e. per batch and per call of the layer, until
the input is frozen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import is_dataclass, replace

import torch
from torch import nn

from lorakit.adapter_choice import adapters_off
from lorakit.errors import UnknownAdapterError
from lorakit.eva_statistics import (
    collect_statistics,
    explained_ratios,
    explained_variance,
    redistribute_ranks,
)
from lorakit.init_methods import EvaConfig
from lorakit.layers import LoraLinear
from lorakit.state import adapter_configs, adapter_model, lora_layers, state_of

__all__ = ["explained_variance", "initialize_lora_eva_weights", "redistribute_ranks"]


def _default_forward(model: nn.Module, batch: object) -> None:
    model(**batch) if isinstance(batch, Mapping) else model(batch)


@torch.no_grad()
def initialize_lora_eva_weights(
    model: nn.Module,
    dataloader: Iterable,
    adapter_name: str = "default",
    *,
    forward_fn: Callable[[nn.Module, object], object] | None = None,
) -> dict[str, int]:
    """Run EVA (module docstring) for adapter ``adapter_name`` (injected with
    ``init_lora_weights="eva"``) over the batches of ``dataloader``; returns the new rank of
    each layer. ``model``: the transformers model or a lorakit ``PeftModel``. ``forward_fn(model,
    batch)``: how to run one batch (default ``model(**batch)`` for dicts, else ``model(batch)``).
    """
    model = adapter_model(model)
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise UnknownAdapterError(
            f"unknown adapter {adapter_name!r}; this model has {list(configs)}: pass the one "
            "injected with init_lora_weights='eva' as adapter_name."
        )
    config = configs[adapter_name]
    if config.init_lora_weights != "eva":
        raise ValueError(
            f"adapter {adapter_name!r} was not injected with init_lora_weights='eva' (found "
            f"{config.init_lora_weights!r}); inject it with that setting first."
        )
    eva = _eva_settings(model, config)
    layers = {
        name: layer
        for name, layer in lora_layers(model)
        if adapter_name in layer.ranks and isinstance(layer, LoraLinear)  # quantized too
    }
    _check_has_linear_layers(model, adapter_name, layers)
    ranks = {name: layer.ranks[adapter_name] for name, layer in layers.items()}
    training = model.training
    model.eval()
    try:
        with adapters_off(model):  # the base model's inputs, as PEFT's disable_adapter()
            stats, leader = collect_statistics(
                model, layers, dataloader, eva, ranks, forward_fn or _default_forward
            )
    finally:
        model.train(training)
    ratios = {name: explained_ratios(values) for name, (_, values, _) in stats.items()}
    new_ranks = redistribute_ranks(ratios, ranks, eva.rho, shared_input=leader)
    _apply(model, config, adapter_name, layers, stats, new_ranks, eva)
    return new_ranks


_RHO_THRESHOLD = 1000  # PEFT's rho_threshold


def _eva_settings(model: nn.Module, config) -> EvaConfig:
    """The adapter's ``EvaConfig`` as EVA reads it: checked again (a field set after the config
    was built, ``config.eva_config.rho = 0.5``, gets the message building it gives), and, as
    PEFT's ``_get_eva_state_dict`` does (silently), a ``rho`` above 1000 capped at
    ``max_dim // r``: ``max_dim`` the largest dimension of any parameter of the model (adapters
    included), ``r`` the config's. (Capped at 1 at least, where PEFT would take 0 for an
    ``r`` above ``max_dim``.) The adapter's config keeps the ``rho`` given, as PEFT's does."""
    eva = config.eva_config or EvaConfig()
    eva = replace(eva) if is_dataclass(eva) else EvaConfig(**eva)  # __post_init__'s checks
    if eva.rho > _RHO_THRESHOLD:
        max_dim = max((max(p.shape, default=1) for p in model.parameters()), default=1)
        eva = replace(eva, rho=min(eva.rho, max(1, max_dim // config.r)))
    return eva


def _check_has_linear_layers(model, adapter_name, layers) -> None:
    """``ValueError`` when adapter ``adapter_name`` has no linear layer for EVA."""
    if layers:
        return
    others = {
        name: type(layer).__name__
        for name, layer in lora_layers(model)
        if adapter_name in layer.ranks
    }
    raise ValueError(
        f"adapter {adapter_name!r} has no linear layer EVA can initialise (its LoRA layers: "
        f"{others or 'none'}): EVA takes A from the inputs of nn.Linear / Conv1D layers, "
        "quantized ones included. Target at least one such layer, or inject with another "
        "init_lora_weights."
    )


def _apply(model, config, adapter_name, layers, stats, new_ranks, eva) -> None:
    """Give each layer its EVA factors (or remove its adapter at rank 0) and record the
    chosen modules, ranks and alphas in the adapter's config: every LoRA layer of the adapter
    whose rank or alpha differs from ``r`` / ``lora_alpha`` is named in ``rank_pattern`` /
    ``alpha_pattern`` (those EVA skips too, e.g. embeddings), as PEFT's
    ``_load_eva_state_dict`` writes them. A DoRA adapter stays DoRA: its magnitude is
    ``||W0 + s B A||_row = ||W0||_row`` (B = 0), as PEFT's re-created layer computes it."""
    from lorakit.layer_wrapping import give_layer_mode
    from lorakit.wrapped_modules import replace_module

    for name, layer in layers.items():
        rank, alpha = layer.ranks[adapter_name], layer.alphas[adapter_name]
        new_rank = new_ranks[name]
        if new_rank == 0:
            layer.delete_adapter(adapter_name)
            if not layer.ranks:
                replace_module(model, name, layer.base_layer)
            continue
        components, values, count = stats[name]
        lora_A = components[:new_rank].clone()  # (r', k)
        if eva.whiten:
            lora_A /= ((count - 1) * values[:new_rank]).clamp_min(1e-30).sqrt().sqrt()[:, None]
        if new_rank != rank and eva.adjust_scaling_factors:
            alpha *= new_rank / rank
        dtype = layer.lora_A[adapter_name].weight.dtype
        trainable = layer.lora_A[adapter_name].weight.requires_grad
        active, dropout = layer.active_adapters, layer.dropouts[adapter_name]
        layer.delete_adapter(adapter_name)
        zeros = torch.zeros(layer.out_features, new_rank, dtype=dtype)
        layer.add_adapter(
            adapter_name,
            new_rank,
            alpha,
            dropout,
            config.use_rslora,
            "eva",  # with the values given: only DoRA's magnitude is computed from them
            dtype,
            values=(lora_A.to(dtype), zeros),
            use_dora=config.use_dora,
            lora_bias=config.lora_bias,
        )
        layer.active_adapters = active
        give_layer_mode(layer, adapter_name)
        for parameter in layer.adapter_parameters(adapter_name):
            parameter.requires_grad_(trainable)
    rank_pattern, alpha_pattern, targets = {}, {}, []
    for name, layer in lora_layers(model):  # every layer of the adapter, EVA's or not
        if adapter_name not in layer.ranks:
            continue
        targets.append(name)
        if layer.ranks[adapter_name] != config.r:
            rank_pattern[name] = layer.ranks[adapter_name]
        if layer.alphas[adapter_name] != config.lora_alpha:
            alpha_pattern[name] = layer.alphas[adapter_name]
    state_of(model).configs[adapter_name] = config.replace(
        target_modules=sorted(targets),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
