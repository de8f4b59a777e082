"""The lean decode step's own ops (``lorakit.serve.lean_decode``) give transformers' bits.

The step is written in few ops (issue 17: each op is paid per layer), each giving exactly what
transformers' Llama forward computes: RoPE of q and k in one call with rotate_half's sign folded
into sin, an RMSNorm of in-place ops, an additive mask made once per step, none for rows without
padding. Checked against transformers' own functions (``apply_rotary_pos_emb``, ``LlamaRMSNorm``,
SDPA with a boolean mask) with ``torch.equal``, and a step without padding (one stream, equal
rows: the no-mask path) against the model's own forward.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from lorakit.serve import routed
from lorakit.serve.kv import BatchedCache
from lorakit.serve.lean_decode import LeanDecoder, additive_mask, rms_norm, rotate, signed_sin
from tests.test_lean_decode import SIZES, family_model, served

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_of_q_and_k_in_one_call_gives_transformers_bits(dtype):
    config = family_model("llama").config
    heads, kv_heads, head_dim = 8, 4, SIZES["hidden_size"] // 8
    torch.manual_seed(0)
    q = torch.randn(3, heads, 1, head_dim).to(dtype)
    k = torch.randn(3, kv_heads, 1, head_dim).to(dtype)
    positions = torch.tensor([[5], [17], [200]])
    cos, sin = LlamaRotaryEmbedding(config)(q, positions)  # (B, 1, hd)
    expected_q, expected_k = apply_rotary_pos_emb(q, k, cos, sin)
    both = torch.cat((q, k), dim=1)[:, :, 0]  # (B, H + Hkv, hd)
    rotated = rotate(both, cos, signed_sin(sin))
    assert torch.equal(rotated[:, :heads], expected_q[:, :, 0])
    assert torch.equal(rotated[:, heads:], expected_k[:, :, 0])
    assert not torch.equal(rotated, both)


def test_signed_sin_negates_the_first_half():
    sin = torch.arange(1.0, 9.0).view(1, 1, 8)
    assert signed_sin(sin).flatten().tolist() == [-1, -2, -3, -4, 5, 6, 7, 8]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_gives_transformers_bits_and_leaves_its_input(dtype):
    norm = LlamaRMSNorm(SIZES["hidden_size"], eps=1e-5)
    torch.manual_seed(1)
    with torch.no_grad():
        norm.weight.normal_()
    norm.to(dtype)
    x = (torch.randn(3, 1, SIZES["hidden_size"]) * 4).to(dtype)
    before = x.clone()
    with torch.no_grad():
        expected = norm(x)
        got = rms_norm(x, norm)
    assert torch.equal(got, expected)
    assert torch.equal(x, before)  # the in-place ops act on the function's own tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_additive_mask_is_the_boolean_one_sdpa_converts(dtype):
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    additive = additive_mask(mask, dtype)
    assert additive.shape == (3, 1, 1, 5) and additive.dtype == dtype
    assert torch.equal(additive[:, 0, 0] == 0, mask.bool())
    assert torch.isneginf(additive[:, 0, 0][mask == 0]).all()
    torch.manual_seed(2)
    q, k, v = (torch.randn(3, 2, n, 16).to(dtype) for n in (3, 5, 5))
    boolean = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.bool()[:, None, None, :])
    assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=additive), boolean)


def test_no_row_padded_means_no_mask():
    assert additive_mask(torch.ones(1, 9, dtype=torch.long), torch.float32) is None
    assert additive_mask(torch.ones(4, 3, dtype=torch.long), torch.bfloat16) is None


def unpadded(model, bank, prompts, slot):
    """A cache holding ``prompts`` (all of one length: no padding) and each row's next token."""
    cache, last = BatchedCache(), []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            with routed(bank, torch.full(ids.shape, slot)):
                out = model(input_ids=ids, use_cache=True)
            cache.add(out.cache, len(prompt))
            last.append([int(out.logits[0, -1].argmax())])
    return cache, torch.tensor(last)


@pytest.mark.parametrize("base", ["float32", "int4-groups"])
@pytest.mark.parametrize("prompts", [[[5, 9, 2, 7]], [[5, 9, 2, 7], [3, 3, 8, 1]]], ids=["1", "2"])
def test_steps_without_padding_equal_the_models_own_forward(base, prompts):
    """One stream (and rows of one length): no mask; three steps in a row, logits and the keys
    and values written as the model's own forward computes them; the embedding's weight stays
    (the residual adds are in place, after the first)."""
    model, bank = served("llama", base)
    decoder = LeanDecoder(model, fuse_siblings=True)
    embedding = model.model.embed_tokens.weight.clone()
    mine, last = unpadded(model, bank, prompts, slot=0)
    theirs, atol = copy.deepcopy(mine), 1e-5 if base == "float32" else 2e-3
    slots = torch.zeros(len(prompts), 1, dtype=torch.long)
    with torch.inference_mode(), routed(bank, slots):
        for _ in range(3):
            mask, positions = mine.step_inputs()
            theirs.step_inputs()
            assert additive_mask(mask, torch.float32) is None
            lean = decoder.step(last, mask, positions, mine.cache)
            own = model(
                input_ids=last, attention_mask=mask, position_ids=positions, cache=theirs.cache
            ).logits[:, -1]
            assert own.abs().max() > 0.1
            assert torch.allclose(lean, own, atol=atol), (lean - own).abs().max()
            mine.advance()
            theirs.advance()
            last = own.argmax(-1, keepdim=True)
    for a, b in zip(mine.cache.layers, theirs.cache.layers, strict=True):
        assert torch.allclose(a.keys, b.keys, atol=atol)
        assert torch.allclose(a.values, b.values, atol=atol)
    assert torch.equal(model.model.embed_tokens.weight, embedding)
