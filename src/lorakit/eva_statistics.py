"""EVA's statistics (``lorakit.eva``): the running moments of each layer input, their principal
components, PEFT's convergence test and the rank redistribution (formulas in ``lorakit.eva``).

``collect_statistics`` hooks the layers, runs the loader's batches through the model and keeps
one k x k float64 moment matrix per distinct layer input (layers fed the very same tensor, e.g.
q/k/v, share one) and its leading components; each call of a layer input's layer is one step,
as each call of PEFT's ``SVDHook`` is (a layer run several times per forward, e.g. ALBERT's
shared one, takes several per batch): a call with fewer counted tokens than the input's
components is skipped; an input whose components the current rank distribution needs (before
a first distribution: all its components, PEFT's starting ``rank_dist = max_components``) have
converged stops collecting, and reading stops once every input has. Which rows count:
``lorakit.eva_inputs``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from lorakit.eva_inputs import _InputMoments, check_enough_tokens, token_rows

__all__ = ["collect_statistics", "explained_ratios", "explained_variance", "redistribute_ranks"]


def explained_variance(
    moments: _InputMoments, count: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(components (c, k) rows descending, eigenvalues (k,))`` of the inputs' covariance
    (needs n >= 2 rows): the leading ``c = min(count, k)`` components (all k when ``count`` is
    None), each with the sign PEFT's ``svd_flip(u_based_decision=False)`` gives it
    (``_peft_signs``); every eigenvalue (the explained ratios divide by their sum)."""
    if moments.count < 2:
        raise ValueError(f"a covariance needs at least 2 rows, got {moments.count}")
    mean = moments.total / moments.count
    covariance = moments.outer.clone()  # the one k x k temporary besides eigh's
    covariance.addr_(mean, mean, alpha=-moments.count).div_(moments.count - 1)
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    del covariance
    size = values.numel()
    keep = size if count is None else min(count, size)
    return _peft_signs(vectors[:, size - keep :].flip(1).T), values.flip(0).clamp_min(0)


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


def _freeze_converged(needed, results, similar, frozen) -> None:
    """PEFT's check before each batch, with the last rank distribution (before a first one:
    every component of each input, ``_wanted``): an input (with results) whose needed
    components all passed the ``tau`` test is frozen, else collects."""
    for name, count in needed.items():
        passed = count == 0 or (name in similar and bool(similar[name][:count].all()))
        (frozen.add if name in results and passed else frozen.discard)(name)


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
    """The layer inputs' statistics while batches are read, each keyed by the input's leader.

    Each call of an input's layer is one step (PEFT: one ``SVDHook`` call): its rows are
    counted when there are at least the input's ``wanted`` components of them (at most k + 1;
    the run as a whole needs ``eva_inputs.tokens_needed``), else the call is skipped (PEFT: "skipping SVD ... less than n_components examples"); a counted step with
    n >= 2 recomputes the leading ``most`` components (no layer takes more) and, from the
    second such step on, tests each against its value at the step before: signed cosine
    ``>= tau`` (``similar``), as PEFT's ``SVDHook`` does. ``moments`` of the counted steps;
    ``skipped`` rows, kept only while the input has no counted step (for ``_finish``);
    ``pending`` calls of this batch, in order, for an input whose ``wanted`` is not known yet
    (its first batch: which layers share it is known at the batch's end) once one of them had
    fewer rows than ``most`` (more are counted whatever it wants): stepped by ``settle``."""

    tau: float
    most: int
    moments: dict[str, _InputMoments] = field(default_factory=dict)
    skipped: dict[str, _InputMoments] = field(default_factory=dict)
    pending: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    similar: dict[str, torch.Tensor] = field(default_factory=dict)

    def call(self, name: str, rows: torch.Tensor, wanted: int | None) -> None:
        """One call of input ``name``'s layer, its counted ``rows`` (n, k)."""
        if wanted is not None:
            self._step(name, rows, wanted)
        elif name in self.pending or rows.shape[0] < self.most:
            self.pending.setdefault(name, []).append(rows)
        else:
            self._step(name, rows, self.most)

    def settle(self, wanted: Mapping[str, int]) -> None:
        """After a batch: the ``pending`` calls' steps, in order, now that ``wanted`` is known."""
        for name, calls in self.pending.items():
            for rows in calls:
                self._step(name, rows, wanted[name])
        self.pending.clear()

    def _step(self, name: str, rows: torch.Tensor, wanted: int) -> None:
        """One step of input ``name`` (class docstring): skipped, or counted and compared."""
        if rows.shape[0] < min(wanted, rows.shape[1] + 1):  # skipped (peft's rule up to k)
            if name not in self.moments:
                self.skipped.setdefault(name, _InputMoments()).add(rows)
            return
        moments = self.moments.setdefault(name, _InputMoments())
        moments.add(rows)
        self.skipped.pop(name, None)  # the skipped rows no longer matter
        if moments.count < 2:
            return
        components, values = explained_variance(moments, self.most)
        if name in self.results:
            before = self.results[name][0]
            self.similar[name] = torch.cosine_similarity(components, before) >= self.tau
        self.results[name] = (components, values)


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
    """Run batches through ``model``; return ``({layer: (components (c, k), eigenvalues (k,),
    n)}, {layer: the layer whose input it shares})``, c the most components any layer takes.

    As PEFT does: each call of a layer input's layer is one step (``_Inputs``), a call with
    fewer counted tokens than the input's components (``_wanted``) skipped; before each batch,
    an input whose needed components converged stops collecting (its statistics are frozen)
    and starts again if a later distribution needs more of its components than have
    converged. Until a rank distribution exists (every layer input has components), an input
    needs all its components (PEFT's ``rank_dist = max_components``), so one whose components
    all converged stops at once. Reading stops once every layer was reached and every input is
    frozen."""
    most = max(_offers(ranks, config.rho, {}).values())  # no input wants more components
    inputs = _Inputs(config.tau, most)
    leader: dict[str, str] = {}  # layer -> the layer whose input it shares
    seen: dict[int, tuple[torch.Tensor, str]] = {}
    current: dict[str, object] = {}
    frozen: set[str] = set()  # leaders whose statistics no longer change
    wanted: dict[str, int] = {}  # leader -> PEFT's n_components, from its first batch's end

    def hook_for(name):
        def hook(module, args):
            x = args[0]
            if name not in leader:  # first batch: layers fed the very same tensor share stats
                leader[name] = seen.setdefault(id(x), (x, name))[1]  # x kept: its id stays unique
            if leader[name] == name and name not in frozen:
                rows = token_rows(name, x, current["batch"], config)
                inputs.call(name, rows, wanted.get(name))

        return hook

    handles = [layers[name].register_forward_pre_hook(hook_for(name)) for name in layers]
    needed: dict[str, int] = {}  # leader -> components the current rank distribution needs
    read = 0
    try:
        for batch in loader:
            _freeze_converged(needed, inputs.results, inputs.similar, frozen)
            if len(leader) == len(layers) and needed and frozen >= needed.keys():
                break
            current["batch"] = batch
            seen.clear()
            forward_fn(model, batch)
            read += 1
            wanted.update(_wanted(ranks, config.rho, leader))
            inputs.settle(wanted)
            distributed = _needed(layers, leader, inputs.results, ranks, config.rho)
            needed = dict(wanted) if distributed is None else distributed
    finally:
        for handle in handles:
            handle.remove()
    final = _finish(layers, leader, inputs, read, wanted)
    stats = {name: (*inputs.results[leader[name]], final[leader[name]].count) for name in layers}
    return stats, leader


def explained_ratios(values: torch.Tensor) -> torch.Tensor:
    """Explained variance ratios ``lam_i / sum(lam)``."""
    return values / values.sum().clamp_min(1e-30)


def _finish(layers, leader, inputs: _Inputs, read: int, wanted) -> dict[str, _InputMoments]:
    """Refuse layers without enough counted tokens (``eva_inputs.check_enough_tokens``: fewer
    than the input's ``wanted`` components, at most its width + 1, or than 2); give components to any input without
    (no call had as many counted tokens as its components: all it got, counted or skipped,
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
        name: inputs.moments.get(name) or inputs.skipped.get(name) or _InputMoments()
        for name in dict.fromkeys(leader.values())
    }  # (an input has counted or skipped rows, never both: ``_Inputs._step``)
    counts = {name: m.count for name, m in final.items()}
    widths = {name: m.total.numel() for name, m in final.items() if m.total is not None}
    check_enough_tokens(leader, counts, wanted, widths)
    for name, m in final.items():
        if name not in inputs.results:
            inputs.results[name] = explained_variance(m, inputs.most)
    return final
