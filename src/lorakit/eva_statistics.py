"""EVA's statistics (``lorakit.eva``): the running moments of each layer input, their principal
components, PEFT's convergence test and the rank redistribution (formulas in ``lorakit.eva``).

``collect_statistics`` hooks the layers, runs the loader's batches through the model and keeps
one k x k float64 moment matrix per distinct layer input (layers fed the very same tensor, e.g.
q/k/v, share one); an input whose components the current rank distribution needs have
converged stops collecting, and reading stops once every input has.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lorakit.init_methods import EvaConfig

__all__ = ["collect_statistics", "explained_ratios", "explained_variance", "redistribute_ranks"]


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
    """``(components (k, k) rows descending, eigenvalues (k,))`` of the inputs' covariance
    (needs n >= 2 rows)."""
    if moments.count < 2:
        raise ValueError(f"a covariance needs at least 2 rows, got {moments.count}")
    mean = moments.total / moments.count
    covariance = (moments.outer - moments.count * torch.outer(mean, mean)) / (moments.count - 1)
    values, vectors = torch.linalg.eigh(covariance)
    return vectors.flip(1).T, values.flip(0).clamp_min(0)


def _offers(ranks: Mapping[str, int], rho: float, shared_input: Mapping[str, str]) -> dict:
    """Per layer, the ratios it offers: ``round(r * rho)``, raised to the largest in its group
    of layers reading the same input (``shared_input``: layer -> the group's first layer), as
    PEFT's ``max_components``."""
    group: dict[str, int] = {}
    for name, rank in ranks.items():
        lead = shared_input.get(name, name)
        group[lead] = max(group.get(lead, 0), round(rank * rho))
    return {name: group[shared_input.get(name, name)] for name in ranks}


def redistribute_ranks(
    ratios: Mapping[str, torch.Tensor],
    ranks: Mapping[str, int],
    rho: float,
    *,
    shared_input: Mapping[str, str] | None = None,
) -> dict[str, int]:
    """New ranks: the ``sum(ranks)`` largest of each layer's first ``round(r * rho)`` explained
    variance ratios (ties: earlier layer first), counted per layer. ``shared_input``: layer ->
    the layer whose input it reads; a group of layers reading one input each offer the largest
    ``round(r * rho)`` among them (PEFT's rule)."""
    offers = _offers(ranks, rho, shared_input or {})
    offered = [
        (float(value), order, name)
        for order, name in enumerate(ratios)
        for value in ratios[name][: offers[name]]
    ]
    offered.sort(key=lambda item: (-item[0], item[1]))
    counts = dict.fromkeys(ratios, 0)
    for _, _, name in offered[: sum(ranks.values())]:
        counts[name] += 1
    return counts


def _check_fits(name: str, x: torch.Tensor, mask: torch.Tensor, what: str, remedy: str) -> None:
    """``ValueError`` unless ``mask`` (batch, T) has the positions of layer input ``x``."""
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"EVA: layer {name!r} reads an input of shape {tuple(x.shape)}, but the batch's "
            f"{what} has shape {tuple(mask.shape)}: its positions are not that layer's (e.g. "
            f"an encoder-decoder model's other sequence), so they cannot say which of the "
            f"layer's tokens count. {remedy}"
        )


def _token_rows(name: str, x: torch.Tensor, batch: object, config: EvaConfig) -> torch.Tensor:
    """The rows of layer ``name``'s input ``x`` (..., k) that count (module docstring), as
    (n, k); ``ValueError`` when the batch's mask does not have ``x``'s (batch, T) shape."""
    if isinstance(batch, Mapping) and "input_ids" in batch and x.dim() == 3:
        mask = batch.get("attention_mask")
        what = "input_ids" if mask is None else "attention_mask"
        mask = torch.ones_like(batch["input_ids"]) if mask is None else mask
        _check_fits(
            name,
            x,
            mask,
            what,
            "Leave such layers out of the adapter (exclude_modules), or give batches that are "
            "not dicts with 'input_ids' (through a forward_fn): every position then counts.",
        )
        mask = mask.bool()
        if config.use_label_mask and "labels" in batch:
            _check_fits(
                name,
                x,
                batch["labels"],
                "labels",
                "Set EvaConfig(use_label_mask=False), or give batches without 'labels'.",
            )
            mask = mask & (batch["labels"] != config.label_mask_value)
        return x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1])


def _freeze_converged(needed, results, similar, frozen) -> None:
    """PEFT's check before each batch, with the last rank distribution: an input (with
    results) whose needed components all passed the ``tau`` test is frozen, else collects."""
    for name, count in needed.items():
        passed = count == 0 or (name in similar and bool(similar[name][:count].all()))
        (frozen.add if name in results and passed else frozen.discard)(name)


def _update_results(moments, frozen, wanted, results, similar, tau) -> None:
    """After a batch: components of every collecting input with at least ``max(2, wanted)``
    counted tokens (PEFT skips an input with fewer tokens than components), and per wanted
    component whether ``|cos|`` with its value one batch earlier is ``>= tau``."""
    for name, m in moments.items():
        if name in frozen or m.count < max(2, wanted[name]):
            continue
        components, values = explained_variance(m)
        if name in results:
            before = results[name][0]
            cosines = torch.cosine_similarity(components[: wanted[name]], before[: wanted[name]])
            similar[name] = cosines.abs() >= tau
        results[name] = (components, values)


def collect_statistics(model, layers, loader, config, ranks, forward_fn):
    """Run batches through ``model``; return ``({layer: (components, eigenvalues, n)}, {layer:
    the layer whose input it shares})``.

    As PEFT does, no rank distribution is computed (and nothing frozen) until every layer input
    has components; then an input whose needed components converged stops collecting (its
    statistics are frozen) and starts again if a later distribution needs more of its
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
                rows = _token_rows(name, x, current["batch"], config)
                moments.setdefault(name, _InputMoments()).add(rows)

        return hook

    handles = [layers[name].register_forward_pre_hook(hook_for(name)) for name in layers]
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    similar: dict[str, torch.Tensor] = {}  # leader -> per component: |cos| with before >= tau
    needed: dict[str, int] = {}  # leader -> components the current rank distribution needs
    try:
        for batch in loader:
            _freeze_converged(needed, results, similar, frozen)
            if needed and frozen >= needed.keys():
                break
            current["batch"] = batch
            seen.clear()
            forward_fn(model, batch)
            wanted = dict.fromkeys(moments, 0)  # leader -> components its layers may offer
            for name, offer in _offers(ranks, config.rho, leader).items():
                if name in leader:
                    wanted[leader[name]] = max(wanted[leader[name]], offer)
            _update_results(moments, frozen, wanted, results, similar, config.tau)
            if any(n not in leader for n in layers) or not results.keys() >= moments.keys():
                continue  # (a layer the forward did not reach, or an input without results)
            ratios = {name: explained_ratios(results[leader[name]][1]) for name in layers}
            distribution = redistribute_ranks(ratios, ranks, config.rho, shared_input=leader)
            needed = dict.fromkeys(moments, 0)
            for name, count in distribution.items():  # an input as many as its layers need
                needed[leader[name]] = max(needed[leader[name]], count)
    finally:
        for handle in handles:
            handle.remove()
    _finish(layers, leader, moments, results)
    stats = {name: (*results[leader[name]], moments[leader[name]].count) for name in layers}
    return stats, leader


def explained_ratios(values: torch.Tensor) -> torch.Tensor:
    """Explained variance ratios ``lam_i / sum(lam)``."""
    return values / values.sum().clamp_min(1e-30)


def _finish(layers, leader, moments, results) -> None:
    """Refuse layers without enough counted tokens; give components to any input that had
    fewer tokens than components wanted (all it got)."""
    if not moments:
        raise ValueError("the dataloader gave no batches; EVA needs layer inputs to start from.")
    unreached = [name for name in layers if name not in leader]
    if unreached:
        raise ValueError(
            f"EVA: no batch of the dataloader reached the LoRA layers {unreached} (every batch "
            "was run), so they have no inputs to take components from. Leave them out of the "
            "adapter (exclude_modules), or give batches / a forward_fn that run them."
        )
    few = {name: moments[leader[name]].count for name in layers}
    few = {name: count for name, count in few.items() if count < 2}
    if few:
        raise ValueError(
            f"EVA: the LoRA layers {few} (layer: tokens counted) got fewer than 2 counted "
            "tokens from the whole dataloader, too few for a covariance. Give more or longer "
            "batches, check that attention_mask / labels leave tokens to count "
            "(EvaConfig(use_label_mask=False) counts the prompt tokens too), or leave those "
            "layers out of the adapter (exclude_modules)."
        )
    for name, m in moments.items():
        if name not in results:
            results[name] = explained_variance(m)
