"""Review fixes (round 33) of lorakit's weight-only CPU formats.

1. int4-groups: a group whose values sit far from zero (|offset| over ~256 of its steps) missed
   the half-step bound by up to 6.5 steps and never used code 15: the offset's bfloat16
   rounding moved the 16-code grid off [min, max]. Such a group's scale is now widened from
   the rounded offset; every other group keeps the old codes, scales and offsets bit for bit
   (an adapter's base fingerprint holds them).
2. The "no layer would be quantized" error of int4-groups offered "nf4, fp4, int8 or a GGUF
   format": not int8-rows, which takes any shape, and a GGUF format a non-built-in model
   does not have.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from lorakit.errors import UserError
from lorakit.quantized import describe, is_quantized
from lorakit.quantized.int4_groups import Int4GroupsLinear, unpack
from lorakit.quantized.loading import block_layers, quantize_loaded
from tests import tiny_models

# ------------------------------------------------- 1. the half-step bound far from zero


def old_quantizer(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The quantizer before the fix (round 33), copied: codes (out, in) in [0, 15], scale and
    offset (out, in / 32) bfloat16."""
    out_features, in_features = weight.shape
    groups = weight.detach().to(torch.float32).view(out_features, -1, 32)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).to(torch.bfloat16)
    offset = (low + 8 * scale.float()).to(torch.bfloat16)
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale)).float()
    steps = (groups - offset.float()[..., None]) / divisor[..., None] + 8
    codes = steps.round().clamp(0, 15).view(out_features, in_features)
    return codes.to(torch.uint8), scale, offset


def codes_scales_offsets(layer: Int4GroupsLinear):
    """A layer's codes (out, in) uint8, scale and offset (out, in / 32) bfloat16."""
    scale, offset = layer.scales_and_offsets.unbind(-1)  # (in / 32, out) each
    return unpack(layer.packed), scale.T, offset.T


def errors_in_steps(layer: Int4GroupsLinear, weight: torch.Tensor) -> torch.Tensor:
    """|W0 - W| / scale per weight (out, in / 32, 32), W0 in float64 from the stored values,
    less the codes' float32 rounding: a weight within float32 rounding of the midpoint of two
    codes may take either (the quantizer divides in float32), so it may sit that far past half
    a step. 0 where the scale is 0 and W0 == W."""
    codes, scale, offset = codes_scales_offsets(layer)
    out_features = weight.shape[0]
    q = codes.double().view(out_features, -1, 32) - 8
    s, o = scale.double()[..., None], offset.double()[..., None]
    w = weight.double().view(out_features, -1, 32)
    rounding = 2.0**-22 * (w.abs() + o.abs())  # float32 (w - o) / s, to within a few ulps
    error = ((q * s + o - w).abs() - rounding).clamp_min(0)
    return error / torch.where(s > 0, s, torch.full_like(s, float("inf")))


FAR = [(1.0, 0.01), (2.0, 0.02), (-1.5, 0.005), (0.5, 1e-4), (300.0, 0.5), (-0.01, 1e-6)]


@pytest.mark.parametrize(("mean", "spread"), FAR)
def test_groups_far_from_zero_meet_the_half_step_bound(mean, spread):
    """The reviewer's repro (mean 1.0, spread 0.01: 6.48 steps off, 30% of the weights clamped
    to code 0) and farther: every weight is within half a step of its code's value; only the
    scale of the groups the old grid missed widens, to the least bfloat16 reaching both ends
    from the rounded offset, and each such group reaches code 15 (or 0) with its largest
    (smallest) weight, the end that scale is set from."""
    torch.manual_seed(0)
    weight = mean + spread * torch.rand(64, 96)
    layer = Int4GroupsLinear.from_weight(weight)
    assert errors_in_steps(layer, weight).max() <= 0.5
    codes, scale, offset = codes_scales_offsets(layer)
    old_codes, old_scale, old_offset = old_quantizer(weight)
    assert torch.equal(offset, old_offset)  # the offset stays: only the scale widens
    widened = scale != old_scale
    assert widened.any() and (scale[widened] > old_scale[widened]).all()
    old = old_codes.view(64, 3, 32)
    assert torch.equal(codes.view(64, 3, 32)[~widened], old[~widened])
    groups = codes.view(64, 3, 32)
    low, high = weight.view(64, 3, 32).double().aminmax(dim=-1)
    s, o = scale.double(), offset.double()
    below = torch.nextafter(scale, torch.zeros_like(scale)).double()
    assert ((o + 7 * s >= high) & (o - 8 * s <= low))[widened].all()
    assert ((o + 7 * below < high) | (o - 8 * below > low))[widened].all()
    high_binds = (high - o) / 7 >= (o - low) / 8
    top, bottom = groups.amax(-1) == 15, groups.amin(-1) == 0
    assert torch.where(high_binds, top, bottom)[widened].all()


def test_the_reviewers_repro_numbers_are_gone():
    """The repro's seed and weights: max error 0.50 / 0.64 / 6.48 / 4.41 steps before, 30% of
    the weights clamped to code 0 at means 1.0 and 2.0."""
    torch.manual_seed(0)
    for mean, spread in ((0.0, 0.1), (0.5, 0.05), (1.0, 0.01), (2.0, 0.02)):
        weight = mean + spread * torch.rand(32, 64)
        layer = Int4GroupsLinear.from_weight(weight)
        assert errors_in_steps(layer, weight).max() <= 0.5
        codes = unpack(layer.packed)
        assert (codes == 0).float().mean() < 0.1 and (codes == 15).float().mean() < 0.1


def bfloat16s(start: float, stop: float) -> torch.Tensor:
    """Every bfloat16 in [start, stop] (positive), float64."""
    up = torch.tensor(float("inf"), dtype=torch.bfloat16)
    value, values = torch.tensor(start, dtype=torch.bfloat16), []
    while value.item() <= stop:
        values.append(value.item())
        value = torch.nextafter(value, up)
    return torch.tensor(values, dtype=torch.float64)


def test_no_bfloat16_grid_could_use_both_ends_of_such_a_group():
    """Why a widened group reaches one end only: at mean 1.0, spread 0.01 no pair of a
    bfloat16 offset (in [0.9, 1.1]) and a bfloat16 scale (in [1e-5, 1e-2]) puts a group's min
    and max within half a step of codes 0 and 15: that takes an offset within
    ``[min + 7.5 s, min + 8.5 s]``, s ~ spread / 15 = 0.0007 wide, and the bfloat16s there are
    0.0078 apart. The quantizer's group (below) meets the bound from the one end."""
    torch.manual_seed(0)
    groups = (1.0 + 0.01 * torch.rand(16, 32)).double()
    low, high = groups.amin(-1)[:, None, None], groups.amax(-1)[:, None, None]
    o, s = bfloat16s(0.9, 1.1)[:, None], bfloat16s(1e-5, 1e-2)[None, :]
    both_ends = (high <= o + 7.5 * s) & (high >= o + 6.5 * s)
    both_ends &= (low >= o - 8.5 * s) & (low <= o - 7.5 * s)
    assert not both_ends.any()
    layer = Int4GroupsLinear.from_weight(groups.float().view(16, 32).repeat(2, 1))
    assert errors_in_steps(layer, groups.float().view(16, 32).repeat(2, 1)).max() <= 0.5


def test_a_constant_group_keeps_scale_0_and_its_bfloat16_value_as_before():
    """A constant group: scale 0, codes 8 and its value rounded to bfloat16 as offset, whether
    that value is a bfloat16 (0.25) or not (0.1: off by bfloat16's own rounding, 9.8e-5), bit
    for bit as the old quantizer (regression review 33: a first version widened the 0.1 group,
    changing the codes, and the fingerprint, of bases that hold one)."""
    weight = torch.zeros(32, 64)
    weight[:, :32], weight[:, 32:] = 0.25, 0.1
    layer = Int4GroupsLinear.from_weight(weight)
    codes, scale, offset = codes_scales_offsets(layer)
    old_codes, old_scale, old_offset = old_quantizer(weight)
    assert (scale == 0).all() and (codes == 8).all()
    assert torch.equal(codes, old_codes) and torch.equal(scale, old_scale)
    assert torch.equal(offset, old_offset)
    assert (offset[:, 1].double() - 0.1).abs().max() <= 0.1 * 2.0**-9


def realistic_weights() -> list[torch.Tensor]:
    """randn * 0.02 weights of SmolLM2-135M's shapes, with outliers (a few weights of 10-40
    sigma, a row 8 times wider, a constant zero group), in float32 and rounded to bfloat16."""
    torch.manual_seed(4)
    weights = []
    for out_features, in_features in ((576, 576), (192, 576), (1536, 576), (576, 1536)):
        weight = torch.randn(out_features, in_features) * 0.02
        spots = torch.randint(0, weight.numel(), (50,))
        weight.view(-1)[spots] = torch.randn(50) * 0.5
        weight[3] *= 8
        weight[7, 64:96] = 0
        weights += [weight, weight.to(torch.bfloat16).float()]
    return weights


def assert_same_as_the_old_quantizer(weight: torch.Tensor) -> None:
    codes, scale, offset = codes_scales_offsets(Int4GroupsLinear.from_weight(weight))
    old_codes, old_scale, old_offset = old_quantizer(weight)
    assert torch.equal(codes, old_codes)
    assert torch.equal(scale.view(torch.int16), old_scale.view(torch.int16))
    assert torch.equal(offset.view(torch.int16), old_offset.view(torch.int16))


def test_ordinary_weights_quantize_bit_for_bit_as_before():
    for weight in realistic_weights():
        assert_same_as_the_old_quantizer(weight)


@pytest.mark.integration
def test_smollm2_quantizes_bit_for_bit_as_before():
    """All 210 block linears of the built-in SmolLM2-135M-Instruct (3,317,760 groups): the
    same codes, scales and offsets as the quantizer before the fix, so adapters trained on
    its int4-groups base keep their base fingerprint."""
    from safetensors.torch import load_file

    from lorakit.models import resolve_model

    tensors = load_file(str(resolve_model("smollm2-135m-instruct") / "model.safetensors"))
    linears = [w for name, w in tensors.items() if name.endswith("proj.weight")]
    assert len(linears) == 210
    for weight in linears:
        assert_same_as_the_old_quantizer(weight)


# ----------------------------------------- 2. the ways out when no layer would be quantized


def odd_llama() -> LlamaForCausalLM:
    """The reviewer's model: hidden 48, intermediate 80 (no multiple of 32 among its sizes)."""
    config = tiny_models.llama_config(hidden_size=48, intermediate_size=80)
    return LlamaForCausalLM(config).eval()


def test_int4_groups_refusal_offers_int8_rows_which_then_works():
    model = odd_llama()
    with pytest.raises(UserError) as refused:
        quantize_loaded(model, "int4-groups", None)
    message = str(refused.value)
    assert message.startswith(
        "--quantization int4-groups: no layer of this LlamaForCausalLM would be stored"
    )
    assert "choose int8-rows" in message and "14 block layers" in message
    assert "gguf" not in message.lower()  # this model has no GGUF file
    quantize_loaded(model, "int8-rows", None)
    assert sum(is_quantized(m) for m in model.modules()) == 15  # 2 layers x 7, and lm_head
    assert {describe(m) for m in model.modules() if is_quantized(m)} == {"int8-rows"}


@pytest.mark.parametrize("quantization", ["int8-rows", "int4-groups"])
def test_a_model_without_linear_blocks_is_not_sent_to_int8_rows(quantization):
    """GPT-2's blocks are Conv1D: int8-rows would refuse it too, so it is not offered."""
    model = tiny_models.gpt2()
    assert block_layers(model, "int8-rows") == 0
    with pytest.raises(UserError) as refused:
        quantize_loaded(model, quantization, None)
    message = str(refused.value)
    assert "not GPT-2's Conv1D" in message and message.endswith("choose nf4, fp4 or int8")
    assert "gguf" not in message.lower()
