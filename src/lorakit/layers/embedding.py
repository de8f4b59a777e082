"""``LoraEmbedding``: LoRA beside an ``nn.Embedding``, in PEFT's convention.

``h = E[ids] + s * A^T[ids] B^T`` with A (r, num_embeddings) and B (dim, r); the delta of the
(num_embeddings, dim) table is ``s (B A)^T``. Keys: ``<path>.lora_embedding_A.<adapter>`` and
``<path>.lora_embedding_B.<adapter>`` (no ``.weight``). Default init: A = 0, B ~ N(0, 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import fast, functional
from lorakit.layers.base import LoraLayer

__all__ = ["LoraEmbedding", "times_embed_scale"]


class LoraEmbedding(LoraLayer):
    """LoRA for ``nn.Embedding``. Shapes: ids (...) -> h (..., dim).

    Dropout does not apply to embeddings (their input is an index), as in PEFT.
    """

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.num_embeddings = base_layer.num_embeddings
        self.embedding_dim = base_layer.embedding_dim
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def init_factors(self, lora_A: torch.Tensor, lora_B: torch.Tensor, init: bool | str) -> None:
        """True or "gaussian": A = 0, B ~ N(0, 1) (PEFT's); False: both ~ N(0, 1) (for tests).
        "orthogonal" is refused (``ValueError``): PEFT implements it for linear layers only
        (an embedding there silently gets the default init instead).

        The draws follow PEFT's, so a seed gives PEFT's factors (and leaves the generator where
        PEFT leaves it, for the layers after): PEFT creates A and B with ``randn`` (float32,
        ``LoraLayer._new_factors``), then resets them, drawing B a second time. On a float16/bfloat16 base
        ``_new_factors`` then rounds them through the base dtype, as PEFT's are by its cast to
        the base dtype and back; on a float64 one the float32 draws are cast, as PEFT's."""
        if init == "orthogonal":
            base = self.base_layer
            raise ValueError(
                f"init_lora_weights='orthogonal' on the embedding {type(base).__name__}"
                f"({self.num_embeddings}, {self.embedding_dim}): peft implements it for "
                "nn.Linear / Conv1D layers only (it gives an embedding its default init, A = 0, "
                "instead). Remove the embedding from target_modules (or add it to "
                "exclude_modules), or use init_lora_weights=True."
            )
        nn.init.normal_(lora_A)
        nn.init.normal_(lora_B)
        if init is not False:
            nn.init.zeros_(lora_A)
            nn.init.normal_(lora_B)

    def store_factors(self, adapter_name: str, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        self.lora_embedding_A[adapter_name] = nn.Parameter(lora_A)
        self.lora_embedding_B[adapter_name] = nn.Parameter(lora_B)

    def _delete_adapter_tensors(self, adapter_name: str) -> None:
        del self.lora_embedding_A[adapter_name]
        del self.lora_embedding_B[adapter_name]

    def factor_shapes(self, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
        return (rank, self.num_embeddings), (self.embedding_dim, rank)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        return [self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s (B A)^T`` (num_embeddings, dim), in ``functional.merge_dtype`` of the table's
        dtype (float32; float64 on a float64 table)."""
        return functional.embedding_delta_weight(
            self.lora_embedding_A[adapter_name],
            self.lora_embedding_B[adapter_name],
            self.scalings[adapter_name],
            dtype=functional.merge_dtype(self.base_float_dtype),
        )

    def lora_branch(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``s A^T[ids] B^T``, times the base's ``embed_scale`` where it has one (transformers'
        scaled word embeddings, e.g. BART's and Gemma's, scale every row they look up: so does
        the merged weight's row, and PEFT's branch). The lookup takes the base's options
        (``padding_idx``, ``max_norm``, ``norm_type``, ``scale_grad_by_freq``, ``sparse``)."""
        base = self.base_layer
        out = functional.lora_embedding_forward(
            x,
            self.lora_embedding_A[adapter_name],
            self.lora_embedding_B[adapter_name],
            self.scalings[adapter_name],
            base.padding_idx,
            base.max_norm,
            base.norm_type,
            base.scale_grad_by_freq,
            base.sparse,
        )
        return times_embed_scale(base, out)

    def base_is_plain(self) -> bool:
        return type(self.base_layer) is nn.Embedding and fast.module_is_plain(self.base_layer)

    def base_forward_with_weight(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(
            x,
            weight,
            base.padding_idx,
            base.max_norm,
            base.norm_type,
            base.scale_grad_by_freq,
            base.sparse,
        )


def times_embed_scale(embedding: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """``out`` times ``embedding.embed_scale`` (a tensor buffer, as Gemma's, or a Python float,
    as BART's) in ``out``'s dtype; ``out`` itself for an embedding without one."""
    scale = getattr(embedding, "embed_scale", None)
    if scale is None:
        return out
    return out * (scale.to(out.dtype) if torch.is_tensor(scale) else scale)
