"""The lean decode step's own ops (``lorakit.serve.lean_decode``) give transformers' bits.

The step is written in few ops (issue 17: each op is paid per layer), each giving exactly what
transformers' Llama forward computes: RoPE of q and k in one call with rotate_half's sign folded
into sin, an RMSNorm of in-place ops, an additive mask made once per step, none for rows without
padding. Checked against transformers' own functions (``apply_rotary_pos_emb``, ``LlamaRMSNorm``,
SDPA with a boolean mask) with ``torch.equal``, and a step without padding (one stream, equal
rows: the no-mask path) against the model's own forward. The pieces around the products (issue
17, second pass): the sibling groups' check before each use (a weight rebound after fused calls
ends the fusion before the next), the one-adapter router's sibling adapters added through split
views (against a float64 formula), and the int4 kernel's casts in fewer calls (the kernel's
bits on any layout).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from lorakit.quantized.int4_groups import HAS_KERNEL, Int4GroupsLinear, int4_groups_matmul
from lorakit.serve import routed
from lorakit.serve.kv import BatchedCache
from lorakit.serve.lean_decode import LeanDecoder, additive_mask, rms_norm, rotate, signed_sin
from lorakit.serve.one_adapter import OneAdapterRouter, routed_one
from tests.test_lean_decode import SIZES, family_model, served, served_reference

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


def rebind(base, how: str) -> None:
    """Give ``base`` (a fused member) other weights: a new tensor, or the same one's ``.data``."""
    name = "packed" if isinstance(base, Int4GroupsLinear) else "weight"
    current = getattr(base, name)
    other = current.flip(0).clone()  # other rows: another function
    if how == "data":
        current.data = other
    elif name == "weight":
        base.weight = nn.Parameter(other, requires_grad=False)
    else:
        base.packed = other  # (a buffer)


@pytest.mark.parametrize("how", ["new tensor", "data"])
@pytest.mark.parametrize("base", ["float32", "int4-groups"])
def test_a_weight_rebound_after_fused_calls_ends_the_fusion_before_its_next_use(base, how):
    """The check before each use reads the members' tensors (not a flag set once): after fused
    calls, a rebound k_proj weight (a new Parameter or buffer, or ``.data`` set) makes the very
    next call compute each member itself, with the new weight."""
    model, bank = served("llama", base)
    decoder = LeanDecoder(model, fuse_siblings=True)
    group = decoder.blocks[0].qkv
    x = torch.randn(2, 1, SIZES["hidden_size"])
    with torch.inference_mode(), routed_one(OneAdapterRouter(bank, 0)) as router:
        for _ in range(2):
            fused = group(x, router)
        assert group.intact()
        rebind(group.bases[1], how)
        assert not group.intact() and not decoder.fused
        after = group(x, router)
        own = [module(x) for module in group.modules]
    for got, expected in zip(after, own, strict=True):
        assert torch.equal(got, expected)
    assert torch.equal(after[0], fused[0]) and not torch.allclose(after[1], fused[1], atol=1e-3)


def float64_siblings(reference, layer_index: int, names, adapter: str, x) -> list[torch.Tensor]:
    """``W x + b + s B A x`` in float64 per layer of ``reference`` (the model the bank copied
    its adapters from; its bases are the served float model's)."""
    layer = reference.model.layers[layer_index]
    outputs = []
    for name in names:
        module = layer.get_submodule(name)
        wide = x.double()
        y = wide @ module.base_layer.weight.double().T
        if module.base_layer.bias is not None:
            y = y + module.base_layer.bias.double()
        if adapter in module.lora_A:
            a, b = module.lora_A[adapter].weight.double(), module.lora_B[adapter].weight.double()
            y = y + module.scalings[adapter] * (wide @ a.T @ b.T)
        outputs.append(y)
    return outputs


GROUPS = {
    "qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "gate_up": ["mlp.gate_proj", "mlp.up_proj"],
    "o_proj": ["self_attn.o_proj"],
}


@pytest.mark.parametrize("slot, adapter", [(0, "all"), (1, "qv")])
@pytest.mark.parametrize("group_name", list(GROUPS))
def test_sibling_adapters_through_split_views_match_a_float64_formula(group_name, slot, adapter):
    """The one-adapter router adds each adapted sibling's ``s B A x`` to its view of the fused
    output (one split of the output and one of ``low``; a lone member without a split): every
    member as the float64 formula, the unadapted ones (k_proj, gate/up under "qv") the base."""
    model, bank = served("llama", "float32")
    reference = served_reference("llama")
    decoder = LeanDecoder(model, fuse_siblings=True)
    group = getattr(decoder.blocks[1], group_name)
    assert group.intact()
    x = torch.randn(3, 1, group.bases[0].in_features)
    with torch.inference_mode(), routed_one(OneAdapterRouter(bank, slot)) as router:
        got = group(x, router)
        again = group(x, router)  # the kept factors
    expected = float64_siblings(reference, 1, GROUPS[group_name], adapter, x)
    for mine, want, name in zip(got, expected, GROUPS[group_name], strict=True):
        assert mine.shape == want.shape and mine.dtype == torch.float32, name
        assert torch.allclose(mine.double(), want, atol=1e-5), (name, (mine - want).abs().max())
    assert all(torch.equal(a, b) for a, b in zip(got, again, strict=True))


@pytest.mark.skipif(not HAS_KERNEL, reason="this torch has no CPU int4 kernel")
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "bfloat16", "2-d"])
def test_int4_matmul_gives_the_kernels_bits_on_any_layout(layout):
    """One cast to a contiguous bfloat16 and a view give the kernel the operand it got from
    reshape, cast and ``contiguous``: the same bits; and ``x W0^T`` within bfloat16 rounding."""
    torch.manual_seed(3)
    module = Int4GroupsLinear.from_weight(torch.randn(96, 64) * 0.1)
    x = torch.randn(2, 3, 64)
    if layout == "transposed":
        x = torch.randn(3, 2, 64).transpose(0, 1)  # not contiguous
    elif layout == "bfloat16":
        x = x.to(torch.bfloat16)
    elif layout == "2-d":
        x = x[0]
    flat = x.reshape(-1, 64).to(torch.bfloat16).contiguous()
    kernel = torch._weight_int4pack_mm_for_cpu(flat, module.packed, 32, module.scales_and_offsets)
    got = int4_groups_matmul(x, module)
    assert got.shape == (*x.shape[:-1], 96) and got.dtype == x.dtype
    assert torch.equal(got, kernel.to(x.dtype).view(*x.shape[:-1], 96))
    exact = x.double() @ module.dequantized().double().T
    assert torch.allclose(got.double(), exact, atol=0.05, rtol=0.02)
