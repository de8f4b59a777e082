"""PEFT's ``add_weighted_adapter`` over ``lorakit.combine`` (what ``PeftModel`` calls).

PEFT's ``combination_type`` names map to lorakit's methods, all computed on the updates
``ΔWᵢ = sᵢ Bᵢ Aᵢ``:

| PEFT name | lorakit method |
|---|---|
| ``cat`` | ``cat`` (exact, rank Σ rᵢ) |
| ``svd`` | ``svd`` (the exact weighted sum, best rank-``svd_rank`` fit) |
| ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd`` | ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` |

Refused for two adapters or more, with the reason: ``linear``, ``ties``, ``dare_linear``,
``dare_ties`` and ``magnitude_prune`` in PEFT's meaning combine the A's and the B's SEPARATELY
(``Σ √wᵢsᵢ Bᵢ · Σ √wᵢsᵢ Aᵢ``, cross terms ``Bᵢ Aⱼ`` included), which is not the weighted sum
of the updates (peft #1155, #1555); the ``_svd`` names are the same operations on ΔW. Also
refused: ``svd_clamp`` (not implemented) and an ``adapter_name`` that exists (PEFT returns
silently and keeps the old one). Every refusal is a ``ValueError``, as PEFT's are (the
``UserError``s of ``combine`` are raised as ``PeftArgumentError``, both).
Fixed: before peft 0.22, when the FIRST adapter uses rsLoRA, PEFT copies its ``use_rslora``
into the new config while setting ``lora_alpha = r`` (the new rank), so the new adapter scales
by ``r/√r = √r`` instead of 1 and EVERY PEFT result (``cat``, ``svd``, the ``*_svd`` names,
the one-adapter case) is ``√r`` times too large: ``√(Σ rᵢ)`` for ``cat``, ``√svd_rank`` for
the SVD names, ``√r`` of the adapter for one adapter (peft 0.22 writes ``use_rslora=False``
and is exact). lorakit's config always reproduces the exact sum.
With ONE adapter PEFT switches every ``combination_type`` to ``linear``, which for one adapter
is exact (``weight * ΔW`` at the adapter's rank; before peft 0.22, only for an adapter
without rsLoRA) and ignores ``svd_rank``, ``svd_clamp``, ``density`` and
``majority_sign_method``; lorakit does the same (its ``cat`` of one adapter: no pruning, no
rank cut, no refusal), keeping each module's rank and scale exactly, rsLoRA or not.
``svd_full_matrices`` and ``svd_driver`` are accepted and change nothing (CPU results are the
same; the reduced SVD is always used). DARE is seeded by ``seed`` (lorakit's addition,
keyword-only, default 0), where PEFT draws from the global generator.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lorakit.combining.combined import OPTION_METHODS, combine
from lorakit.errors import UserError

__all__ = ["PEFT_METHODS", "PeftArgumentError", "add_weighted_adapter"]


class PeftArgumentError(UserError, ValueError):
    """A refusal of ``add_weighted_adapter``: a ``ValueError`` as PEFT raises for bad
    arguments (what PEFT users catch), and a ``UserError`` as every lorakit refusal."""


PEFT_METHODS = {
    "cat": "cat",
    "svd": "svd",
    "ties_svd": "ties",
    "dare_linear_svd": "dare_linear",
    "dare_ties_svd": "dare_ties",
    "magnitude_prune_svd": "magnitude_prune",
}
_ON_FACTORS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def _method_for(combination_type: str) -> str:
    if combination_type in _ON_FACTORS:
        instead = (
            "'cat' (exact) or 'svd'"
            if combination_type == "linear"
            else (f"'{combination_type}_svd' (the same operation on ΔW)")
        )
        raise ValueError(
            f"combination_type={combination_type!r} combines the A's and the B's separately in "
            "PEFT, which is not the weighted sum of the updates (the cross terms B_i A_j enter); "
            f"lorakit refuses it. Use {instead}."
        )
    if combination_type not in PEFT_METHODS:
        raise ValueError(
            f"unknown combination_type {combination_type!r}; choose one of {sorted(PEFT_METHODS)}"
        )
    return PEFT_METHODS[combination_type]


def add_weighted_adapter(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    *,
    seed: int = 0,
) -> None:
    """Add adapter ``adapter_name`` to ``model``, combined from its adapters ``adapters`` with
    ``weights`` (PEFT's argument names, order and meanings; see the module docstring). The new
    adapter is not made active (as in PEFT). Every refusal is a ``ValueError``."""
    del svd_full_matrices, svd_driver  # accepted for PEFT's signature; no effect here
    try:
        _add_weighted_adapter(
            model,
            adapters,
            weights,
            adapter_name,
            combination_type,
            svd_rank,
            svd_clamp,
            density,
            majority_sign_method,
            seed,
        )
    except UserError as error:
        if isinstance(error, ValueError):
            raise
        raise PeftArgumentError(str(error)) from error


def _add_weighted_adapter(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str,
    svd_rank: int | None,
    svd_clamp: float | None,
    density: float | None,
    majority_sign_method: str,
    seed: int,
) -> None:
    """``add_weighted_adapter`` (its refusals: ``ValueError`` here, ``UserError`` from
    ``combine``)."""
    from lorakit.state import adapter_configs

    if len(adapters) == 1:
        # PEFT: "if there is only one adapter, we can only use linear merging" -- every
        # combination_type becomes linear, exact for one adapter (weight * ΔW at its rank);
        # svd_rank, svd_clamp, density and majority_sign_method are not used. lorakit's exact
        # method for that is cat (rank Σ rᵢ = r).
        if combination_type not in (*PEFT_METHODS, *_ON_FACTORS):
            _method_for(combination_type)  # the unknown-name error
        method, svd_rank, density, majority_sign_method = "cat", None, None, "total"
    else:
        method = _method_for(combination_type)
        if svd_clamp is not None:
            raise ValueError("svd_clamp is not implemented by lorakit; leave it None")
    known = adapter_configs(model)
    if adapter_name in known:
        raise ValueError(
            f"the model already has an adapter named {adapter_name!r}; choose a new name or "
            "delete it first (PEFT would silently keep the old one)."
        )
    unknown = [name for name in adapters if name not in known]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(known)}")
    options = {"density": density, "majority_sign_method": majority_sign_method, "seed": seed}
    result = combine(
        list(adapters),
        list(weights),
        method=method,
        rank=None if method == "cat" else svd_rank,
        model=model,
        **_used_options(method, options),
    )
    result.add_to(model, adapter_name)


def _used_options(method: str, options: dict[str, object]) -> dict[str, object]:
    """The options ``method`` uses (``OPTION_METHODS``): PEFT's signature always passes
    ``majority_sign_method`` and ``seed`` (defaults "total", 0) and ignores what a method does not
    use, where ``combine`` refuses it."""
    return {name: value for name, value in options.items() if method in OPTION_METHODS[name]}
