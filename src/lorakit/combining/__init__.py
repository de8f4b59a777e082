"""Combining adapters into one ordinary adapter (docs/combining.md).

    result = lorakit.combine(["style", "task"], [0.7, 0.3], method="cat")   # directories
    result.save("combined")                         # PEFT's files, loadable by peft and lorakit
    result = lorakit.combine(["a", "b"], [1, -1], method="svd", rank=8, model=model)  # on a model
    result.add_to(model, "a_minus_b")

Per module, with ``ΔWᵢ = sᵢ Bᵢ Aᵢ`` and weights ``wᵢ``: ``cat`` is exact (``Σ wᵢ ΔWᵢ``, rank
``Σ rᵢ``); ``svd`` cuts that sum to a rank; ``ties``, ``dare_linear``, ``dare_ties`` and
``magnitude_prune`` combine the full ΔWᵢ (``combining.methods``, PEFT's semantics) and cut the
result to a rank by SVD.

- ``combining.sources``: reading adapters (directories or on a model) and the compatibility checks;
- ``combining.methods``: the pure update-combining functions;
- ``combining.combined``: ``combine`` and ``CombinedAdapter``;
- ``combining.files``: writing PEFT's files, injecting into a model.
"""

from lorakit.combining.combined import (
    METHODS,
    OPTION_METHODS,
    CombinedAdapter,
    ModuleReport,
    combine,
    module_seed,
    unused_option,
)

__all__ = [
    "METHODS",
    "OPTION_METHODS",
    "CombinedAdapter",
    "ModuleReport",
    "combine",
    "module_seed",
    "unused_option",
]
