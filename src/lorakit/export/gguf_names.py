"""transformers -> GGUF: architecture names, tensor names and llama.cpp's q/k row order.

Facts (from llama.cpp's ``convert_hf_to_gguf.py`` and the ``gguf`` package, which encodes the
names llama.cpp uses):

- ``LlamaForCausalLM`` and ``MistralForCausalLM`` become GGUF architecture ``llama``;
  ``Qwen2ForCausalLM`` becomes ``qwen2``.
- A module's GGUF tensor is ``gguf.TensorNameMap(arch, n_blocks).get_name(module)`` + ".weight",
  e.g. ``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q.weight``, ``lm_head`` ->
  ``output.weight``, ``model.embed_tokens`` -> ``token_embd.weight``.
- For ``llama`` the converter reorders the rows of q_proj and k_proj (llama.cpp's rotary
  embedding pairs neighbouring rows, transformers' pairs row i with row i + head_dim/2): per head
  of ``rows / heads`` rows, ``reshape(heads, 2, half, ...).swapaxes(1, 2)``, with ``heads`` =
  ``num_attention_heads`` for q and ``num_key_value_heads`` for k. Qwen2 keeps the order.
- A head size other than ``hidden_size / num_attention_heads`` (an explicit ``head_dim``) is
  written as ``attention.key_length`` / ``value_length``. llama.cpp's ``llama`` loader reads them
  (q_proj ``hidden x heads*head_dim``); its ``qwen2`` loader does not (q_proj and o_proj must be
  ``hidden x hidden``), so such a Qwen2 cannot be loaded there (``check_head_size``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from lorakit.errors import UserError

__all__ = [
    "ARCHITECTURES",
    "TOKEN_EMBEDDING",
    "GgufLayout",
    "check_head_size",
    "class_architecture",
    "gguf_layout",
    "rope_row_order",
    "transformers_class",
]

TOKEN_EMBEDDING = "token_embd.weight"  # the GGUF tensor of the input embeddings

# transformers model_type -> (GGUF architecture, whether llama.cpp's converter reorders q/k rows)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
}

# GGUF architectures whose llama.cpp loader ignores attention.key_length: heads * head_dim must
# equal the hidden size there.
HEADS_SPAN_HIDDEN = frozenset({"qwen2"})


def rope_row_order(rows: int, heads: int) -> torch.Tensor:
    """Indices ``p`` (rows,) with ``W_gguf = W_hf[p]``: llama.cpp's converter's q/k reordering.

    Within each head of ``rows / heads`` rows, transformers' order ``[x_0..x_{h/2-1},
    y_0..y_{h/2-1}]`` becomes ``[x_0, y_0, x_1, y_1, ...]``. Inverse: ``torch.argsort(p)``.
    """
    if rows % (2 * heads):
        raise ValueError(f"{rows} rows do not split into {heads} heads of an even size")
    order = torch.arange(rows).reshape(heads, 2, rows // heads // 2)  # (heads, 2, half)
    return order.transpose(1, 2).reshape(rows)  # (rows,)


@dataclass(frozen=True)
class GgufLayout:
    """How one transformers causal LM's modules appear in GGUF files."""

    model_type: str
    arch: str
    blocks: int
    heads: int
    kv_heads: int
    permutes_qk: bool
    tied_embeddings: bool

    @cached_property
    def _name_map(self):
        import gguf

        arch_id = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == self.arch)
        return gguf.get_tensor_name_map(arch_id, self.blocks)

    def tensor_name(self, module_name: str) -> str | None:
        """``blk.N.attn_q.weight`` for ``model.layers.N.self_attn.q_proj``; None when llama.cpp
        has no tensor for the module (or reads the tied ``token_embd`` in place of lm_head)."""
        base = self._name_map.get_name(module_name)
        if base is None or (base == "output" and self.tied_embeddings):
            return None
        return base + ".weight"

    def row_order(self, tensor_name: str, rows: int) -> torch.Tensor | None:
        """llama.cpp's row order (``rope_row_order``) for a q/k tensor of this layout, else None."""
        if not self.permutes_qk:
            return None
        kind = tensor_name.split(".")[-2]  # blk.N.attn_q.weight -> attn_q
        if kind == "attn_q":
            return rope_row_order(rows, self.heads)
        if kind == "attn_k":
            return rope_row_order(rows, self.kv_heads)
        return None


def gguf_layout(model_config) -> GgufLayout:
    """The ``GgufLayout`` of a transformers config; ``UserError`` for architectures not mapped."""
    model_type = getattr(model_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"GGUF export/import knows the architectures {sorted(ARCHITECTURES)}, not "
            f"model_type={model_type!r}; convert this model with llama.cpp's own converter."
        )
    arch, permutes_qk = ARCHITECTURES[model_type]
    heads = model_config.num_attention_heads
    return GgufLayout(
        model_type=model_type,
        arch=arch,
        blocks=model_config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(model_config, "num_key_value_heads", None) or heads,
        permutes_qk=permutes_qk,
        tied_embeddings=bool(getattr(model_config, "tie_word_embeddings", False)),
    )


def class_architecture(class_name: str) -> str | None:
    """The GGUF architecture lorakit writes for the transformers model class ``class_name``
    (``MistralForCausalLM`` -> ``llama``; also ``Qwen2Model`` or ``LlamaForSequenceClassification``,
    whose decoder layers are the same), from the class's own config type (``config_class.
    model_type``); None when transformers has no such class or lorakit writes no architecture
    for its model type."""
    model_class = transformers_class(class_name)
    model_type = getattr(getattr(model_class, "config_class", None), "model_type", None)
    return ARCHITECTURES.get(model_type, (None,))[0]


def transformers_class(class_name: str) -> type | None:
    """transformers' model class of that name, or None (a name it does not export)."""
    import transformers

    try:
        found = getattr(transformers, class_name, None)
    except Exception:  # (a lazy import that fails: an optional dependency missing)
        return None
    return found if isinstance(found, type) else None


def check_head_size(model_config) -> None:
    """``UserError`` when llama.cpp could not load the model's GGUF file because of its head size:
    an explicit ``head_dim`` with ``head_dim * num_attention_heads != hidden_size`` on an
    architecture whose loader ignores ``attention.key_length`` (``HEADS_SPAN_HIDDEN``)."""
    layout = gguf_layout(model_config)
    hidden = model_config.hidden_size
    head_dim = getattr(model_config, "head_dim", None) or hidden // layout.heads
    if layout.arch in HEADS_SPAN_HIDDEN and head_dim * layout.heads != hidden:
        raise UserError(
            f"model_type={layout.model_type!r} with head_dim={head_dim} and {layout.heads} "
            f"attention heads ({head_dim * layout.heads}) differs from hidden_size={hidden}: "
            f"llama.cpp's {layout.arch} loader expects q_proj and o_proj of hidden_size x "
            "hidden_size and would refuse the file, so lorakit does not write it. Run this model "
            "with transformers or lorakit (merge the adapter with `lorakit merge`), or use a "
            "model whose head_dim * num_attention_heads equals hidden_size."
        )
