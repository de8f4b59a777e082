"""The decode step of a Llama-family causal LM (Llama, Mistral, Qwen2) in a few ops per layer.

At one token per row a decode step does little arithmetic per layer, and transformers' module
machinery (mask building, per-module calls, dtype round trips, the cache protocol) costs about as
much again; on SmolLM2-135M with one stream it is a third of the step. ``LeanDecoder.step``
computes the same function over the model's own modules and weights, for the engine's
preallocated cache (``kv.BatchedCache``): per layer, with x (B, h) (one token a row),

    a = rmsnorm(x);  [q k v] = a [Wq; Wk; Wv]^T (+ biases)    # one product (``siblings``)
    [q; k] = rope([q; k]; position)                           # (B, H + Hkv, hd): one rotation
    K, V = cache.update(k, v)                                 # (B, Hkv, T, hd), written in place
    x = x + Wo softmax(q K^T * scaling + padding mask) V      # G = H / Hkv queries per kv head
    a = rmsnorm(x);  [g u] = a [Wg; Wu]^T;  x = x + Wd (silu(g) * u)
    logits = lm_head(rmsnorm(x))                              # (B, vocab)

Each LoRA layer's adapters are added by the serving router in force, the call its own forward
makes; a model without a router (``lorakit generate``) calls every projection module itself. The
grouped-query attention stacks the G query heads of a kv head as G query rows of one SDPA call
(query head j reads kv head j // G, as transformers' ``repeat_kv``), so K and V are not repeated.

Each op of a step is paid per layer (30 layers of SmolLM2-135M: a few microseconds an op is a few
percent of a one-stream step), so the step is written in few ops, each giving the same bits as
transformers' forward: q and k rotated in one call with rotate_half's sign folded into sin once
per step (``rotate``), no transposes at one token per row, an RMSNorm of six in-place ops
(``rms_norm``), in-place residual adds and SiLU, and no attention mask when no row is padded (one
stream), else one additive mask per step instead of a boolean one each layer converts. The
activations are (B, h), not transformers' (B, 1, h): the same values, and the int4 product and
the one-adapter router take 2-D rows without the views a (B, 1, h) input costs them.

``lean_decoder(model)`` is None for any other model (another family, sliding-window or other
attention kinds, an activation other than SiLU, RoPE that changes with the sequence length): the
engine then runs the model's own forward.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers import current_router
from lorakit.serve.row_rope import is_length_dependent, per_row
from lorakit.serve.siblings import SiblingGroup

__all__ = ["LeanDecoder", "lean_decoder", "unsupported_reason"]

log = logging.getLogger(__name__)

FAMILIES = ("llama", "mistral", "qwen2")


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``LeanDecoder`` cannot run ``model`` (None: it can)."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        return f"model type {family!r} is not one of {', '.join(FAMILIES)}"
    inner = getattr(model, "model", None)
    if not all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "the model has no .model.embed_tokens / layers / norm / rotary_emb"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {config.hidden_act!r} is not silu"
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        return f"attention kinds {sorted(kinds)} are not all full attention"
    windowed = family == "mistral" or getattr(config, "use_sliding_window", False)
    if windowed and getattr(config, "sliding_window", None) is not None:
        return f"attention is limited to a sliding window of {config.sliding_window} tokens"
    return None


def lean_decoder(model: nn.Module, *, fuse_siblings: bool) -> LeanDecoder | None:
    """``LeanDecoder(model)`` when the model allows it, else None (the reason is logged)."""
    reason = unsupported_reason(model)
    if reason is not None:
        log.debug("decode steps run the model's own forward: %s", reason)
        return None
    return LeanDecoder(model, fuse_siblings=fuse_siblings)


def rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """``w * x / sqrt(mean(x^2) + eps)`` over the last dim, as transformers' RMSNorm (computed
    in float32, rounded to x's dtype before the weight): in float32 the same ops in the same
    order (so the same bits), in place where the operand is this function's own."""
    eps = norm.variance_epsilon
    if x.dtype == torch.float32:
        scale = (x * x).mean(-1, keepdim=True).add_(eps).rsqrt_()  # x * x: pow(x, 2)'s bits
        return (x * scale).mul_(norm.weight)
    wide = x.float()
    wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return norm.weight * wide.to(x.dtype)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``[-s1, s2]`` for sin = ``[s1, s2]`` (halves of head_dim): rotate_half's sign, folded into
    sin once per step (``rotate``)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed: torch.Tensor) -> torch.Tensor:
    """RoPE: ``x cos + rotate_half(x) sin``, rotate_half(x) = [-x2, x1] over halves of head_dim,
    computed as ``x cos + [x2, x1] [-s1, s2]`` (``signed`` = ``signed_sin(sin)``): the same
    products (a sign moved between factors is exact), so the same bits, in four ops.
    x (B, heads, hd); cos, signed (B, 1, hd)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed


class _Block:
    """One decoder layer's modules, the sibling groups made once."""

    def __init__(self, layer: nn.Module, config, *, fuse: bool) -> None:
        attention, mlp = layer.self_attn, layer.mlp
        self.input_norm = layer.input_layernorm
        self.post_norm = layer.post_attention_layernorm
        self.qkv = SiblingGroup([attention.q_proj, attention.k_proj, attention.v_proj], fuse=fuse)
        self.gate_up = SiblingGroup([mlp.gate_proj, mlp.up_proj], fuse=fuse)
        self.o_proj = SiblingGroup([attention.o_proj], fuse=fuse)
        self.down_proj = SiblingGroup([mlp.down_proj], fuse=fuse)
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling


class LeanDecoder:
    """The decode step of ``model`` over an engine's ``BatchedCache`` (see the module doc).

    ``fuse_siblings``: compute q/k/v and gate/up in one product each (``siblings``; their weights
    become views of the concatenation). Only for a model served from an adapter bank, whose
    LoRA layers add their adapters through the router.
    """

    def __init__(self, model: nn.Module, *, fuse_siblings: bool) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"LeanDecoder cannot run this model: {reason}")
        inner = model.model
        self.embed, self.norm, self.rotary = inner.embed_tokens, inner.norm, inner.rotary_emb
        if is_length_dependent(self.rotary):
            per_row(self.rotary)  # ``dynamic`` / ``longrope``: each row's own frequencies
        self.lm_head = model.lm_head
        layers = inner.layers[: model.config.num_hidden_layers]
        self.blocks = [_Block(layer, model.config, fuse=fuse_siblings) for layer in layers]

    @property
    def fused(self) -> bool:
        """Whether the sibling products are fused (and still intact) in every layer."""
        return all(b.qkv.intact() and b.gate_up.intact() for b in self.blocks)

    def step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache,
    ) -> torch.Tensor:
        """Logits (B, vocab) of one new token per row.

        ``input_ids`` (B, 1); ``attention_mask`` (B, T) 1 on real tokens, this one included;
        ``position_ids`` (B, 1); ``cache``: a DynamicCache of ``kv.WindowLayer``s (one per layer)
        holding T - 1 columns, to which each layer appends its key and value.
        """
        router = current_router()
        x = self.embed(input_ids)  # (B, 1, h)
        cos, sin = self.rotary(x, position_ids)  # (B, 1, hd)
        sin = signed_sin(sin)
        mask = additive_mask(attention_mask, x.dtype)
        x = x.reshape(x.shape[0], x.shape[-1])  # (B, h): one token a row
        for index, (block, cache_layer) in enumerate(zip(self.blocks, cache.layers, strict=True)):
            attended = self._attention(
                block, rms_norm(x, block.input_norm), cos, sin, mask, cache_layer, router
            )
            # the first add makes x the step's own tensor; in place from then on
            x = x + attended if index == 0 else x.add_(attended)
            gate, up = block.gate_up(rms_norm(x, block.post_norm), router)
            (down,) = block.down_proj(F.silu(gate, inplace=True).mul_(up), router)
            x.add_(down)
        return self.lm_head(rms_norm(x, self.norm))

    @staticmethod
    def _attention(block: _Block, a, cos, sin, mask, cache_layer, router) -> torch.Tensor:
        """The attention output (B, h) for normed input ``a`` (B, h); ``sin`` signed
        (``signed_sin``), ``mask`` additive or None (``additive_mask``)."""
        rows, heads, kv_heads, head_dim = a.shape[0], block.heads, block.kv_heads, block.head_dim
        q, k, v = block.qkv(a, router)  # (B, H hd), (B, Hkv hd), (B, Hkv hd)
        qk = rotate(torch.cat((q, k), dim=-1).view(rows, heads + kv_heads, head_dim), cos, sin)
        keys, values = cache_layer.update(  # (B, Hkv, T, hd)
            qk[:, heads:, None], v.view(rows, kv_heads, 1, head_dim)
        )
        queries = qk[:, :heads].view(rows, kv_heads, heads // kv_heads, head_dim)
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, scale=block.scaling
        )  # (B, Hkv, G, hd)
        (projected,) = block.o_proj(out.reshape(rows, heads * head_dim), router)
        return projected


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """The (B, 1, 1, T) mask SDPA adds to the scores: 0 on real tokens, -inf on left padding,
    made once per step (SDPA makes the same from a boolean mask, at every layer); None when no
    row is padded (one stream), which adds nothing."""
    if bool(attention_mask.all()):
        return None
    keep = attention_mask.bool()[:, None, None, :]
    zeros = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    return zeros.masked_fill_(~keep, float("-inf"))
