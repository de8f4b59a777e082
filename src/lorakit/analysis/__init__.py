"""How low is the rank really? Tools to measure weight updates and the dimension of fine-tuning.

- ``spectrum``: singular values of ΔW (dense, or ``s B A`` from the factors), effective ranks.
- ``report``: per-layer JSON / table and rank advice per module type.
- ``extract``: a full fine-tune -> a PEFT-format LoRA adapter by truncated SVD.
- ``similarity``: subspace similarity between adapters (LoRA paper §7).
- ``intrinsic``: random-subspace training through a Fastfood transform (intrinsic dimension, SAID).
- ``plots``: PNG figures (matplotlib, Agg backend).
"""

from lorakit.analysis.extract import Extraction, apply_extraction, extract_lora
from lorakit.analysis.report import RankAdvice, format_table, rank_advice, spectra_report
from lorakit.analysis.similarity import similarity_grid, subspace_similarity
from lorakit.analysis.spectrum import (
    Spectrum,
    adapter_spectra,
    energy_rank,
    entropy_rank,
    low_rank_svd,
    spectrum_of_factors,
    spectrum_of_matrix,
    stable_rank,
    tensor_spectra,
)
from lorakit.analysis.updates import update_spectra

__all__ = [
    "Extraction",
    "RankAdvice",
    "Spectrum",
    "adapter_spectra",
    "apply_extraction",
    "energy_rank",
    "entropy_rank",
    "extract_lora",
    "format_table",
    "low_rank_svd",
    "rank_advice",
    "similarity_grid",
    "spectra_report",
    "spectrum_of_factors",
    "spectrum_of_matrix",
    "stable_rank",
    "subspace_similarity",
    "tensor_spectra",
    "update_spectra",
]
