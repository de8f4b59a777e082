"""``combine``: several adapters and weights -> one ordinary LoRA adapter (``CombinedAdapter``).

Per module, over the adapters that adapt it (a module present in only some adapters takes
what is there), with ``ΔWᵢ = sᵢ Bᵢ Aᵢ`` (each adapter's own scale) and weights ``wᵢ``:

- ``cat`` (exact): ``A = [2^e₁ A₁; …; 2^eₙ Aₙ]`` (Σrᵢ, k), ``B = [c₁ 2^-e₁ B₁, …]`` (d, Σrᵢ)
  with ``cᵢ = wᵢ sᵢ / s``, where ``s`` is the output's scale for that module, and ``2^eᵢ`` a
  power of two near ``√|cᵢ|`` (``module_factors``). Then ``s B A = Σ wᵢ sᵢ Bᵢ Aᵢ`` exactly
  (up to one float rounding of ``cᵢ Bᵢ``): the same output as running the adapters together
  with those weights. Rank ``Σ rᵢ``. Scaling by a power of two is exact, so the split changes
  no product ``Bᵢ Aᵢ``, not even by a rounding; it keeps a large ``cᵢ`` (1e6) from putting all
  of itself into B, beyond what an adapter file may hold.
- ``svd``: ``Σ wᵢ ΔWᵢ`` cut to its best rank-``rank`` approximation
  (``analysis.extract.truncated_factors``); ``energy_kept = ||kept||_F² / ||ΔW||_F²``.
- ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: ``combining.methods`` on the
  full ΔWᵢ (never on A and B apart), then the same SVD cut.

The full base weights input files carry (PEFT's ``save_embedding_layers``) are not combined:
carried into the result when every input that carries one carries the same tensor, refused
otherwise (``compatible.carried_base_weights``).

The output config uses the same rank r everywhere it can (``rank_pattern`` lists the modules
whose rank differs, by exact, escaped name), ``lora_alpha = r``, ``alpha_pattern`` giving each
of those modules its own rank as alpha, and no rsLoRA: every module's scale is 1, so a reader
that implements PEFT's patterns (peft, lorakit) and one that ignores them (vLLM's
``PEFTHelper`` takes one ``lora_alpha / r`` for all modules) compute the same ΔW.

Every factor of the result is checked as the adapter file reader checks a file
(``unwritable``): a value beyond +-``MAX_ABS_VALUE`` (float16's range) or inf/NaN, which weights
such as 1e39 give, is refused (``FactorRangeError``, naming the module and the weights) instead
of being returned or saved into a file no reader takes.

DARE draws its masks per module from ``torch.Generator().manual_seed(module_seed(seed, name))``
(a hash of the seed and the module name): the same seed gives the same adapter, whatever the
module order or which other modules are present.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorakit import functional
from lorakit.combining.arguments import (
    METHODS,
    OPTION_METHODS,
    PRUNING,
    check_arguments,
    unused_option,
)
from lorakit.combining.compatible import carried_base_weights, check_compatible
from lorakit.combining.module_factors import (
    FactorRangeError,
    check_writable,
    module_factors,
    module_ranks,
    module_seed,
)
from lorakit.combining.sources import AdapterUpdates, ModuleFactors, read_sources
from lorakit.config import LoraConfig
from lorakit.errors import UserError

__all__ = [
    "METHODS",
    "OPTION_METHODS",
    "CombinedAdapter",
    "FactorRangeError",
    "ModuleReport",
    "combine",
    "module_seed",
    "unused_option",
]


@dataclass
class ModuleReport:
    """One module of the result: its rank, the share of ``||Σ||_F²`` kept by the rank cut (1
    for ``cat``) and which adapters contributed."""

    name: str
    rank: int
    energy_kept: float
    adapters: list[str]


@dataclass
class CombinedAdapter:
    """A combined adapter: ``factors[module] = (A (r, k), B (d, r))`` float32, with
    ``ΔW = s B A`` and ``s`` from ``config`` (see the module docstring); ``base_weights``:
    module -> the full base weight the inputs' files carried (equal in all that carried one;
    PEFT's ``save_embedding_layers``), written with the result as they were."""

    config: LoraConfig
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    embeddings: frozenset[str]
    fingerprint: dict[str, dict[str, object]]
    modules: list[ModuleReport]
    method: str
    extra: dict[str, object] = field(default_factory=dict)
    base_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    auto_mapping: dict[str, str] | None = None
    """PEFT's ``auto_mapping`` written with a task-less result: the base class the inputs name,
    where those that name one agree (``peft.AutoPeftModel`` needs it; ``lorakit export``
    refuses another architecture's base by it), else None."""

    def scale_for(self, module: str) -> float:
        return functional.scaling(
            self.config.rank_for(module), self.config.alpha_for(module), self.config.use_rslora
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            **self.extra,
            "config": self.config.to_dict(),
            "modules": [report.__dict__ for report in self.modules],
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write PEFT's two files into ``directory`` atomically (as ``lorakit.save_adapter``
        does, with the inputs' base fingerprint); returns the directory."""
        from lorakit.combining.files import write_adapter_files

        return write_adapter_files(self, Path(directory))

    def add_to(self, model: nn.Module, adapter_name: str) -> nn.Module:
        """Inject this adapter into ``model`` (or lorakit's ``PeftModel``: into the model inside
        it) as ``adapter_name`` (not made active); returns ``model``."""
        from lorakit.combining.files import add_to_model

        return add_to_model(self, model, adapter_name)


def _contributions(
    sources: Sequence[AdapterUpdates], weights: Sequence[float]
) -> dict[str, list[tuple[AdapterUpdates, float, ModuleFactors]]]:
    """module -> [(adapter, weight, factors)] over the adapters that adapt it, in input order."""
    found: dict[str, list[tuple[AdapterUpdates, float, ModuleFactors]]] = {}
    for source, weight in zip(sources, weights, strict=True):
        for name, factors in source.modules.items():
            found.setdefault(name, []).append((source, weight, factors))
    return found


def _output_config(sources: Sequence[AdapterUpdates], ranks: dict[str, int]) -> LoraConfig:
    """One rank (the most common) with ``rank_pattern`` for the others, and alpha = rank for
    every module (``alpha_pattern``): scale 1 everywhere, whether a reader applies the patterns
    or not."""
    common = Counter(ranks.values()).most_common(1)[0][0]
    task_types = {source.config.task_type for source in sources}
    first = sources[0].config
    return LoraConfig(
        r=common,
        lora_alpha=common,
        target_modules=sorted(ranks),
        rank_pattern={re.escape(n): r for n, r in sorted(ranks.items()) if r != common},
        alpha_pattern={re.escape(n): r for n, r in sorted(ranks.items()) if r != common},
        lora_dropout=first.lora_dropout,
        fan_in_fan_out=any(source.config.fan_in_fan_out for source in sources),
        task_type=task_types.pop() if len(task_types) == 1 else None,
        base_model_name_or_path=next(
            (s.config.base_model_name_or_path for s in sources if s.config.base_model_name_or_path),
            None,
        ),
    )


def combine(
    adapters: Sequence[str | os.PathLike[str]],
    weights: Sequence[float] | None = None,
    *,
    method: str = "cat",
    rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str | None = None,
    seed: int | None = None,
    model: nn.Module | None = None,
) -> CombinedAdapter:
    """Combine ``adapters`` (directories, or names of adapters on ``model``) with ``weights``
    (default 1 each) into one adapter; ``method`` one of ``METHODS`` (module docstring).

    ``rank``: the SVD methods' rank per module (default: the largest input rank, as PEFT),
    capped at min(d, k) (and at Σrᵢ for ``svd``). ``density``: the share of entries kept by
    ``ties``/``dare_*``/``magnitude_prune``. ``majority_sign_method``: "total" (default) or
    "frequency" (``ties``, ``dare_ties``). ``seed``: DARE's masks (``dare_*``, default 0).
    An option given to a method that does not use it is refused (``OPTION_METHODS``), as on
    the command line. ``model``: a model or lorakit's ``PeftModel`` (the model inside it).
    Returns a ``CombinedAdapter``; ``.save(directory)`` writes PEFT's files,
    ``.add_to(model, name)`` injects it. Raises ``UserError`` for bad arguments and
    incompatible adapters (different shapes or base weights, naming the module), and
    ``FactorRangeError`` (a ``UserError``) when the weights make a factor of the result hold
    values no adapter file may hold (``unwritable``), naming the module and the weights.
    """
    from lorakit.state import adapter_model

    if isinstance(adapters, (str, os.PathLike)):
        raise UserError(f"combine: adapters must be a list of adapters, got one: {adapters!r}")
    weights = check_arguments(
        len(adapters), weights, method, rank, density, majority_sign_method, seed
    )
    rank = None if rank is None else int(rank)
    majority_sign_method = majority_sign_method or "total"
    seed = 0 if seed is None else int(seed)
    holder = None if model is None else adapter_model(model)
    sources = read_sources(adapters, holder)
    check_compatible(sources, None if holder is None else dict(holder.named_modules()))
    base_weights = carried_base_weights(sources)
    contributions = _contributions(sources, weights)
    if not contributions:
        raise UserError("combine: the adapters adapt no module")
    if rank is None:
        rank = max(f.rank for s in sources for f in s.modules.values())
    config = _output_config(sources, module_ranks(contributions, method, rank))
    result = CombinedAdapter(config, {}, frozenset(), {}, [], method, base_weights=base_weights)
    for name, parts in contributions.items():
        _add_module(result, name, parts, density, majority_sign_method, seed)
    result.embeddings = frozenset(n for n, p in contributions.items() if p[0][2].is_embedding)
    result.fingerprint = _union_fingerprint(sources, list(contributions))
    result.auto_mapping = _shared_auto_mapping(sources, config)
    result.extra = _settings(sources, weights, rank, density, majority_sign_method, seed, method)
    return result


def _add_module(
    result: CombinedAdapter, name: str, parts, density, majority_sign_method, seed
) -> None:
    """Combine module ``name`` from ``parts`` (``[(adapter, weight, factors)]``) into
    ``result``: its float32 factors (refused when unwritable) and its report."""
    config = result.config
    lora_A, lora_B, energy = module_factors(
        name,
        parts,
        result.scale_for(name),
        config.rank_for(name),
        result.method,
        density,
        majority_sign_method,
        seed,
    )
    factors = (lora_A.float(), lora_B.float())
    check_writable(name, factors, parts)
    result.factors[name] = factors
    labels = [source.label for source, _, _ in parts]
    result.modules.append(ModuleReport(name, config.rank_for(name), energy, labels))


def _shared_auto_mapping(
    sources: Sequence[AdapterUpdates], config: LoraConfig
) -> dict[str, str] | None:
    """The result's ``auto_mapping``: for a task-less ``config``, the base class the inputs
    name where those that name one agree (an input with a task type, or an older file, names
    none); else None."""
    known = [source.auto_mapping for source in sources if source.auto_mapping is not None]
    if config.task_type is None and known and known.count(known[0]) == len(known):
        return known[0]
    return None


def _union_fingerprint(sources: Sequence[AdapterUpdates], names: list[str]) -> dict:
    """Each module's base fingerprint, from the first adapter that carries one."""
    union: dict[str, dict[str, object]] = {}
    for source in sources:
        for name, entry in (source.fingerprint or {}).items():
            if name in names:
                union.setdefault(name, entry)
    return union


def _settings(sources, weights, rank, density, majority_sign_method, seed, method) -> dict:
    settings: dict[str, object] = {
        "adapters": [s.label for s in sources],
        "weights": list(weights),
    }
    if method != "cat":
        settings["rank"] = rank
    if method in PRUNING:
        settings["density"] = density
    if method in ("ties", "dare_ties"):
        settings["majority_sign_method"] = majority_sign_method
    if method.startswith("dare"):
        settings["seed"] = seed
    return json.loads(json.dumps(settings))
