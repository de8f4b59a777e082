"""EVA's statistics (``lorakit.eva``): the running moments of each layer input, their principal
components, PEFT's convergence test and the rank redistribution (formulas in ``lorakit.eva``).

``collect_statistics`` hooks the layers, runs the loader's batches through the model and keeps
one k x k float64 moment matrix per distinct layer input (layers fed the very same tensor, e.g.
q/k/v, share one); a batch with fewer counted tokens than an input's components is skipped for
that input (PEFT's ``SVDHook`` rule); an input whose components the current rank distribution
needs have converged stops collecting, and reading stops once every input has.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

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
    (needs n >= 2 rows); each component's sign as PEFT's ``svd_flip(u_based_decision=False)``
    fixes it (``_peft_signs``)."""
    if moments.count < 2:
        raise ValueError(f"a covariance needs at least 2 rows, got {moments.count}")
    mean = moments.total / moments.count
    covariance = (moments.outer - moments.count * torch.outer(mean, mean)) / (moments.count - 1)
    values, vectors = torch.linalg.eigh(covariance)
    return _peft_signs(vectors.flip(1).T), values.flip(0).clamp_min(0)


def _peft_signs(components: torch.Tensor) -> torch.Tensor:
    """``components`` (c, k) with each row's largest-magnitude entry (the first, on ties)
    positive: PEFT's ``IncrementalPCA._svd_flip(u_based_decision=False)``. An eigenvector's
    sign is arbitrary; this one makes A's rows PEFT's and lets the convergence test compare
    signed cosines, as PEFT's does."""
    largest = components.abs().argmax(dim=1, keepdim=True)  # (c, 1)
    return components * components.gather(1, largest).sign()


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
    variance ratios, counted per layer. ``shared_input``: layer -> the layer whose input it
    reads; a group of layers reading one input each offer the largest ``round(r * rho)`` among
    them (PEFT's ``max_components``).

    Ties (the layers of a group offer equal ratios) are split as PEFT's
    ``_get_rank_distribution`` splits them: the ratios listed with each group's first layer
    (in ``ratios`` order) and the ungrouped layers first, the group's other layers after,
    ordered by ``torch.argsort(descending=True)`` (not a stable sort: its order of equal values
    depends on all the values, deterministically on the CPU, where it runs here); then each
    other layer of a group that got more than the group's first swaps counts with it, in that
    order, so the first layer holds the group's largest rank."""
    offers = _offers(ranks, rho, shared_input or {})
    groups: dict[str, list[str]] = {}
    for name in ratios:
        groups.setdefault((shared_input or {}).get(name, name), []).append(name)
    others = [(name, members[0]) for members in groups.values() for name in members[1:]]
    order = [members[0] for members in groups.values()] + [name for name, _ in others]
    offered = [ratios[name][: offers[name]].detach().double().cpu() for name in order]
    owners = [name for name, values in zip(order, offered, strict=True) for _ in range(len(values))]
    chosen = torch.cat(offered).argsort(descending=True)[: sum(ranks.values())]
    counts = dict.fromkeys(ratios, 0)
    for index in chosen.tolist():
        counts[owners[index]] += 1
    for name, first in others:
        if counts[name] > counts[first]:
            counts[first], counts[name] = counts[name], counts[first]
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
    """After a batch, for each input in ``moments`` (those whose statistics it grew: a batch
    with fewer counted tokens than the input's ``wanted`` components is skipped for it, as PEFT
    skips it) with n >= 2: its components, and per wanted component whether the cosine with
    its value at the last update is ``>= tau`` (signed, as PEFT tests it: each component's sign
    is PEFT's, ``_peft_signs``). A skipped batch is no convergence step."""
    for name, m in moments.items():
        if name in frozen or m.count < 2:
            continue
        components, values = explained_variance(m)
        if name in results:
            before = results[name][0]
            count = wanted[name]
            similar[name] = torch.cosine_similarity(components[:count], before[:count]) >= tau
        results[name] = (components, values)


def _wanted(ranks, rho, leader) -> dict[str, int]:
    """Per layer input (named by ``leader``): the components its layers may offer, PEFT's
    ``n_components`` of its ``SVDHook`` (``_offers``)."""
    wanted: dict[str, int] = {}
    for name, offer in _offers(ranks, rho, leader).items():
        if name in leader:
            wanted[leader[name]] = max(wanted.get(leader[name], 0), offer)
    return wanted


@dataclass
class _Inputs:
    """The layer inputs' statistics while batches are read, each keyed by the input's leader:
    ``moments`` of its counted batches; ``skipped`` rows, kept only while it has no counted
    batch (for ``_finish``); this batch's ``held`` rows (fewer than any input may want: decided
    after the batch, ``settle``); the inputs this batch ``grew``."""

    moments: dict[str, _InputMoments] = field(default_factory=dict)
    skipped: dict[str, _InputMoments] = field(default_factory=dict)
    held: dict[str, torch.Tensor] = field(default_factory=dict)
    grew: set[str] = field(default_factory=set)

    def new_batch(self) -> None:
        self.held.clear()
        self.grew.clear()

    def count(self, name: str, rows: torch.Tensor) -> None:
        """Add a batch's ``rows`` (n, k) to input ``name``'s statistics (PEFT's
        ``partial_fit``); the rows of batches skipped before no longer matter."""
        self.moments.setdefault(name, _InputMoments()).add(rows)
        self.skipped.pop(name, None)
        self.grew.add(name)

    def settle(self, wanted: dict[str, int]) -> dict[str, _InputMoments]:
        """Decide the ``held`` rows: counted for an input when at least its ``wanted``, else the
        batch is skipped for it (PEFT: "skipping SVD ... less than n_components examples").
        Returns the statistics of the inputs this batch grew."""
        for name, rows in self.held.items():
            if rows.shape[0] >= wanted[name]:
                self.count(name, rows)
            elif name not in self.moments:
                self.skipped.setdefault(name, _InputMoments()).add(rows)
        self.held.clear()
        return {name: self.moments[name] for name in self.grew}


def _needed(layers, leader, results, ranks, rho) -> dict[str, int] | None:
    """Per layer input, the components the current rank distribution needs (the most its
    layers take: ``redistribute_ranks`` of the explained-variance ratios); None until every
    layer was reached and every input has components."""
    inputs = dict.fromkeys(leader.values(), 0)
    if any(n not in leader for n in layers) or not results.keys() >= inputs.keys():
        return None
    ratios = {name: explained_ratios(results[leader[name]][1]) for name in layers}
    distribution = redistribute_ranks(ratios, ranks, rho, shared_input=leader)
    for name, count in distribution.items():
        inputs[leader[name]] = max(inputs[leader[name]], count)
    return inputs


def collect_statistics(model, layers, loader, config, ranks, forward_fn):
    """Run batches through ``model``; return ``({layer: (components, eigenvalues, n)}, {layer:
    the layer whose input it shares})``.

    As PEFT does, a batch with fewer counted tokens than an input's components (``_wanted``)
    is skipped for that input (its rows are not added and it is no convergence step); no rank
    distribution is computed (and nothing frozen) until every layer input has components; then
    an input whose needed components converged stops collecting (its statistics are frozen)
    and starts again if a later distribution needs more of its components than have
    converged; reading stops once every input is frozen."""
    inputs = _Inputs()
    leader: dict[str, str] = {}  # layer -> the layer whose input it shares
    seen: dict[int, tuple[torch.Tensor, str]] = {}
    current: dict[str, object] = {}
    frozen: set[str] = set()  # leaders whose statistics no longer change
    most = max(_offers(ranks, config.rho, {}).values())  # no input wants more components

    def hook_for(name):
        def hook(module, args):
            x = args[0]
            if name not in leader:  # first batch: layers fed the very same tensor share stats
                leader[name] = seen.setdefault(id(x), (x, name))[1]  # x kept: its id stays unique
            if leader[name] == name and name not in frozen:
                rows = _token_rows(name, x, current["batch"], config)
                if rows.shape[0] >= most:  # enough for any input: counted at once
                    inputs.count(name, rows)
                else:  # few rows (< most components): decided after the batch
                    inputs.held[name] = rows

        return hook

    handles = [layers[name].register_forward_pre_hook(hook_for(name)) for name in layers]
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    similar: dict[str, torch.Tensor] = {}  # leader -> per component: cos with before >= tau
    needed: dict[str, int] = {}  # leader -> components the current rank distribution needs
    read = 0
    try:
        for batch in loader:
            _freeze_converged(needed, results, similar, frozen)
            if needed and frozen >= needed.keys():
                break
            current["batch"] = batch
            seen.clear()
            inputs.new_batch()
            forward_fn(model, batch)
            read += 1
            wanted = _wanted(ranks, config.rho, leader)  # leader -> PEFT's n_components
            grown = inputs.settle(wanted)
            _update_results(grown, frozen, wanted, results, similar, config.tau)
            distributed = _needed(layers, leader, results, ranks, config.rho)
            if distributed is not None:  # (else a layer not reached, or an input without any)
                needed = distributed
    finally:
        for handle in handles:
            handle.remove()
    final = _finish(layers, leader, inputs.moments, inputs.skipped, results, read)
    stats = {name: (*results[leader[name]], final[leader[name]].count) for name in layers}
    return stats, leader


def explained_ratios(values: torch.Tensor) -> torch.Tensor:
    """Explained variance ratios ``lam_i / sum(lam)``."""
    return values / values.sum().clamp_min(1e-30)


def _finish(layers, leader, moments, skipped, results, read) -> dict[str, _InputMoments]:
    """Refuse layers without enough counted tokens; give components to any input without
    (no batch had as many counted tokens as its components: all it got, counted or skipped,
    where PEFT would cycle the loader for ever). Returns each input's final statistics."""
    if not read:
        raise ValueError("the dataloader gave no batches; EVA needs layer inputs to start from.")
    unreached = [name for name in layers if name not in leader]
    if unreached:
        raise ValueError(
            f"EVA: no batch of the dataloader reached the LoRA layers {unreached} (every batch "
            "was run), so they have no inputs to take components from. Leave them out of the "
            "adapter (exclude_modules), or give batches / a forward_fn that run them."
        )
    final = {
        name: moments.get(name) or skipped.get(name) or _InputMoments()
        for name in dict.fromkeys(leader.values())
    }  # (an input has counted or skipped rows, never both: ``_Inputs.count``)
    few = {name: final[leader[name]].count for name in layers}
    few = {name: count for name, count in few.items() if count < 2}
    if few:
        raise ValueError(
            f"EVA: the LoRA layers {few} (layer: tokens counted) got fewer than 2 counted "
            "tokens from the whole dataloader, too few for a covariance. Give more or longer "
            "batches, check that attention_mask / labels leave tokens to count "
            "(EvaConfig(use_label_mask=False) counts the prompt tokens too), or leave those "
            "layers out of the adapter (exclude_modules)."
        )
    for name, m in final.items():
        if name not in results:
            results[name] = explained_variance(m)
    return final
