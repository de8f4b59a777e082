"""EVA (Explained Variance Adaptation; PEFT's ``init_lora_weights="eva"``): A from the principal
directions of each layer's inputs, B = 0, ranks moved to the layers whose inputs need them.

``inject`` with ``init_lora_weights="eva"`` gives B = 0 (A as drawn); then
``initialize_lora_eva_weights(model, dataloader)`` runs the model (no gradient, eval mode) over
batches and, per adapted ``nn.Linear`` / ``Conv1D`` layer with inputs X (n tokens x k)::

    mean = sum(X) / n,   C = (X^T X - n mean mean^T) / (n - 1)       (k x k, float64)
    C = V diag(lam) V^T,  lam descending;   explained ratio_i = lam_i / sum(lam)

Token positions count when ``attention_mask`` is 1 and (``use_label_mask``) ``labels`` is not
``label_mask_value``. The statistics are the base model's: every adapter is off while they are
taken (``lorakit.disabled``, as PEFT runs under ``disable_adapter``). Ranks: the budget is the
sum of the layers' ranks; each layer offers its first ``round(r * rho)`` ratios, and the
budget's worth of largest ratios over all layers decide how many each layer gets. Convergence,
as PEFT judges it: after each batch a layer input compares its leading components with their
values one batch earlier (|cosine| >= ``tau``); before the next batch, an input whose
components needed by the current rank distribution all passed stops collecting (its statistics
are frozen), and one that no longer passes (the distribution moved) collects again; reading
stops once every input is frozen, or when the loader ends. Layer with rank r' > 0:
``A = V[:, :r']^T`` (r' x k; ``whiten``: row i divided by ``((n - 1) lam_i) ** (1/4)``, the
square root of the i-th singular value of the centred X), B = 0, and with
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
ranks it redistributes can differ from lorakit's.

Memory: one k x k float64 matrix per distinct layer input (layers reading the same tensor, e.g.
q/k/v, share one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from lorakit.init_methods import EvaConfig
from lorakit.layers import LoraLinear
from lorakit.state import adapter_configs, adapter_model, disabled, lora_layers, state_of

__all__ = ["explained_variance", "initialize_lora_eva_weights", "redistribute_ranks"]


class _InputMoments:
    """Running ``n``, ``sum x`` and ``sum x x^T`` (float64) of one layer input's rows."""

    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to(torch.float64)  # (n, k)
        if self.total is None:
            self.total = rows.new_zeros(rows.shape[1])
            self.outer = rows.new_zeros(rows.shape[1], rows.shape[1])
        self.count += rows.shape[0]
        self.total += rows.sum(0)
        self.outer += rows.T @ rows


def explained_variance(moments: _InputMoments) -> tuple[torch.Tensor, torch.Tensor]:
    """``(components (k, k) rows descending, eigenvalues (k,))`` of the inputs' covariance."""
    mean = moments.total / moments.count
    covariance = (moments.outer - moments.count * torch.outer(mean, mean)) / max(
        moments.count - 1, 1
    )
    values, vectors = torch.linalg.eigh(covariance)
    return vectors.flip(1).T, values.flip(0).clamp_min(0)


def redistribute_ranks(
    ratios: Mapping[str, torch.Tensor], ranks: Mapping[str, int], rho: float
) -> dict[str, int]:
    """New ranks: the ``sum(ranks)`` largest of each layer's first ``round(r * rho)`` explained
    variance ratios (ties: earlier layer first), counted per layer."""
    offered = [
        (float(value), order, name)
        for order, name in enumerate(ratios)
        for value in ratios[name][: round(ranks[name] * rho)]
    ]
    offered.sort(key=lambda item: (-item[0], item[1]))
    counts = dict.fromkeys(ratios, 0)
    for _, _, name in offered[: sum(ranks.values())]:
        counts[name] += 1
    return counts


def _token_rows(x: torch.Tensor, batch: object, config: EvaConfig) -> torch.Tensor:
    """The rows of layer input ``x`` (..., k) that count (module docstring), as (n, k)."""
    if isinstance(batch, Mapping) and "input_ids" in batch and x.dim() == 3:
        mask = batch.get("attention_mask")
        mask = torch.ones_like(batch["input_ids"]) if mask is None else mask
        mask = mask.bool()
        if config.use_label_mask and "labels" in batch:
            mask = mask & (batch["labels"] != config.label_mask_value)
        return x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1])


def _default_forward(model: nn.Module, batch: object) -> None:
    model(**batch) if isinstance(batch, Mapping) else model(batch)


def _collect(model, layers, loader, config, ranks, forward_fn):
    """Run batches through ``model`` and return ``{layer: (components, eigenvalues, n)}``.

    As PEFT does, a layer input whose needed components converged stops collecting (its
    statistics are frozen) and starts again if a later rank distribution needs more of its
    components than have converged; reading stops once every input is frozen."""
    moments: dict[str, _InputMoments] = {}
    leader: dict[str, str] = {}  # layer -> the layer whose input it shares
    seen: dict[int, tuple[torch.Tensor, str]] = {}
    current: dict[str, object] = {}
    frozen: set[str] = set()  # leaders whose statistics no longer change

    def hook_for(name):
        def hook(module, args):
            x = args[0]
            if name not in leader:  # first batch: layers fed the very same tensor share stats
                leader[name] = seen.setdefault(id(x), (x, name))[1]  # x kept: its id stays unique
            if leader[name] == name and name not in frozen:
                moments.setdefault(name, _InputMoments()).add(
                    _token_rows(x, current["batch"], config)
                )

        return hook

    handles = [layers[name].register_forward_pre_hook(hook_for(name)) for name in layers]
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    similar: dict[str, torch.Tensor] = {}  # leader -> per component: |cos| with before >= tau
    offered = {name: round(ranks[name] * config.rho) for name in layers}
    needed: dict[str, int] = {}  # leader -> components the current rank distribution needs
    try:
        for batch in loader:
            for name in needed:  # PEFT's check before each batch, with the last distribution
                count = needed[name]
                done = count == 0 or (name in similar and bool(similar[name][:count].all()))
                (frozen.add if done else frozen.discard)(name)
            if needed and frozen >= needed.keys():
                break
            current["batch"] = batch
            seen.clear()
            forward_fn(model, batch)
            for name, m in moments.items():
                if name in frozen:
                    continue
                components, values = explained_variance(m)
                if name in results:
                    wanted = max(offered[n] for n in layers if leader.get(n) == name)
                    similar[name] = (
                        torch.cosine_similarity(
                            components[:wanted], results[name][0][:wanted]
                        ).abs()
                        >= config.tau
                    )
                results[name] = (components, values)
            if any(n not in leader for n in layers):
                continue  # (a layer the forward did not reach)
            ratios = {
                name: (v := results[leader[name]][1]) / v.sum().clamp_min(1e-30) for name in layers
            }
            distribution = redistribute_ranks(ratios, ranks, config.rho)
            needed = {name: 0 for name in moments}
            for name, count in distribution.items():  # an input as many as its layers need
                needed[leader[name]] = max(needed[leader[name]], count)
    finally:
        for handle in handles:
            handle.remove()
    if not moments:
        raise ValueError("the dataloader gave no batches; EVA needs layer inputs to start from.")
    unreached = [name for name in layers if name not in leader]
    if unreached:
        raise ValueError(
            f"EVA: no batch of the dataloader reached the LoRA layers {unreached} (every batch "
            "was run), so they have no inputs to take components from. Leave them out of the "
            "adapter (exclude_modules), or give batches / a forward_fn that run them."
        )
    return {name: (*results[leader[name]], moments[leader[name]].count) for name in layers}


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
    config = adapter_configs(model).get(adapter_name)
    if config is None or config.init_lora_weights != "eva":
        raise ValueError(
            f"adapter {adapter_name!r} was not injected with init_lora_weights='eva' (found "
            f"{getattr(config, 'init_lora_weights', None)!r}); inject it with that setting first."
        )
    eva = config.eva_config or EvaConfig()
    layers = {
        name: layer
        for name, layer in lora_layers(model)
        if adapter_name in layer.ranks and type(layer) is LoraLinear
    }
    ranks = {name: layer.ranks[adapter_name] for name, layer in layers.items()}
    training = model.training
    model.eval()
    try:
        with disabled(model):  # the base model's inputs, as PEFT's disable_adapter()
            stats = _collect(model, layers, dataloader, eva, ranks, forward_fn or _default_forward)
    finally:
        model.train(training)
    ratios = {
        name: values / values.sum().clamp_min(1e-30) for name, (_, values, _) in stats.items()
    }
    new_ranks = redistribute_ranks(ratios, ranks, eva.rho)
    _apply(model, config, adapter_name, layers, stats, new_ranks, eva)
    return new_ranks


def _apply(model, config, adapter_name, layers, stats, new_ranks, eva) -> None:
    """Give each layer its EVA factors (or remove its adapter at rank 0) and record the
    chosen modules, ranks and alphas in the adapter's config: every LoRA layer of the adapter
    whose rank or alpha differs from ``r`` / ``lora_alpha`` is named in ``rank_pattern`` /
    ``alpha_pattern`` (those EVA skips too, e.g. embeddings), as PEFT's
    ``_load_eva_state_dict`` writes them. A DoRA adapter stays DoRA: its magnitude is
    ``||W0 + s B A||_row = ||W0||_row`` (B = 0), as PEFT's re-created layer computes it."""
    from lorakit.inject import _give_layer_mode
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
        _give_layer_mode(layer, adapter_name)
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
