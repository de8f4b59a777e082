"""Review fix 29 of the default inits: on a float16 / bfloat16 base a seed gives PEFT's factors
bit for bit. PEFT draws A and B in float32, casts the adapter to the base dtype and back to
float32 (``autocast_adapter_dtype=True``), so its factors are the draws rounded through the base
dtype; lorakit rounds them the same way (``layers.adapter_tables.round_through_base_dtype``) and keeps
the adapter tensors float32. Against the real ``peft`` on a tiny Llama (``q_proj``, an
``nn.Linear``; ``embed_tokens``, an ``nn.Embedding``) and GPT-2 (``c_attn``, a ``Conv1D``)."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch

import lorakit
from lorakit.layers.adapter_tables import round_through_base_dtype
from tests import tiny_models
from tests.peft_pairs import adapter_tensor_pairs

INITS = [True, False, "gaussian"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _llama(dtype):
    return tiny_models.llama(dtype=dtype), dict(target_modules=["q_proj", "embed_tokens"])


def _gpt2(dtype):
    return tiny_models.gpt2().to(dtype), dict(target_modules=["c_attn"], fan_in_fan_out=True)


def _llama_lora_bias(dtype):
    return tiny_models.llama(dtype=dtype), dict(target_modules=["q_proj"], lora_bias=True)


def _mixtral_experts(dtype):
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    return tiny_models.mixtral(dtype=dtype), dict(target_modules=[], target_parameters=experts)


def _factor_pairs(make, dtype, init, seed=1):
    """``{key: (peft's, lorakit's)}`` for every LoRA tensor, both injected after
    ``torch.manual_seed(seed)`` into copies of one base."""
    base, targets = make(dtype)
    fields = dict(r=4, lora_alpha=8, init_lora_weights=init, **targets)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields))
    torch.manual_seed(seed)
    ours = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**fields))
    return adapter_tensor_pairs(theirs, ours)


@pytest.mark.parametrize("init", INITS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_seeded_default_init_factors_equal_peft_bitwise(make, dtype, init):
    pairs = _factor_pairs(make, dtype, init)
    names = {part for key in pairs for part in key.split(".") if part.startswith("lora_")}
    if make is _llama:
        assert names == {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"}
    else:
        assert names == {"lora_A", "lora_B"}
    _check_equal(pairs, dtype)


def _check_equal(pairs, dtype) -> None:
    for key, (theirs, ours) in pairs.items():
        assert theirs.dtype == torch.float32, key
        assert ours.dtype == torch.float32, key  # the adapter stays float32 on a half base
        assert torch.equal(ours, theirs), (key, (ours - theirs).abs().max().item())
    drawn = [ours for key, (_, ours) in pairs.items() if ours.abs().max() > 0]
    assert drawn  # non-zero factors were compared, not only zeros
    if dtype != torch.float32:  # each value is one of the base dtype's
        for ours in drawn:
            assert torch.equal(ours.to(dtype).float(), ours)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("make", [_llama_lora_bias, _mixtral_experts], ids=["lora_bias", "experts"])
def test_lora_bias_and_expert_parameters_equal_peft_bitwise(make, dtype):
    """The two other ways factors are drawn: with ``lora_bias`` (A, B and the bias on B; init
    True and False) and on a bare parameter (``target_parameters``, Mixtral's experts)."""
    inits = [True, False] if make is _llama_lora_bias else INITS
    for init in inits:
        _check_equal(_factor_pairs(make, dtype, init), dtype)


def test_half_base_rounds_the_draw_float32_base_keeps_it():
    """The same seed on a float32 and a bfloat16 copy of one base: A on the bfloat16 base is
    exactly A of the float32 base rounded to bfloat16, and differs from it (the rounding is
    real, not a no-op)."""
    pairs32 = _factor_pairs(_llama, torch.float32, True)
    pairs16 = _factor_pairs(_llama, torch.bfloat16, True)
    key = "model.layers.0.self_attn.q_proj.lora_A.default.weight"
    drawn, rounded = pairs32[key][1], pairs16[key][1]
    assert torch.equal(rounded, drawn.to(torch.bfloat16).float())
    assert not torch.equal(rounded, drawn)


def test_round_through_base_dtype_rounds_only_float32_factors_on_half_bases():
    values = torch.tensor([1.0 + 2**-10, -(3.0 + 2**-12), 0.1])
    for base_dtype in (torch.float32, torch.float64, torch.int8):
        factor = values.clone()
        round_through_base_dtype([factor], base_dtype)
        assert torch.equal(factor, values)
    for base_dtype in (torch.float16, torch.bfloat16):
        factor = values.clone()
        round_through_base_dtype([factor], base_dtype)
        assert factor.dtype == torch.float32
        assert torch.equal(factor, values.to(base_dtype).float())
    factor64 = values.double()
    round_through_base_dtype([factor64], torch.bfloat16)
    assert torch.equal(factor64, values.double())


KEPT_HALF = [(make, init) for make in (_llama, _gpt2) for init in INITS] + [
    (_llama_lora_bias, init)
    for init in (True, False)  # (lora_bias takes these two, as PEFT)
]


@pytest.mark.parametrize(("make", "init"), KEPT_HALF, ids=lambda v: getattr(v, "__name__", str(v)))
def test_factors_kept_in_the_half_base_dtype_equal_peft_bitwise(make, init):
    """``autocast_adapter_dtype=False`` (the adapter in the base's bfloat16): PEFT draws in
    float32 and casts; a draw in bfloat16 itself lands elements near a rounding boundary
    elsewhere (up to 1.0 apart before)."""
    base, targets = make(torch.bfloat16)
    fields = dict(r=4, lora_alpha=8, init_lora_weights=init, **targets)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(**fields), autocast_adapter_dtype=False
        )
        torch.manual_seed(1)
        ours = lorakit.get_peft_model(
            copy.deepcopy(base), lorakit.LoraConfig(**fields), autocast_adapter_dtype=False
        )
    their_state = {
        k.removeprefix("base_model.model."): v
        for k, v in theirs.state_dict().items()
        if "lora_" in k
    }
    our_state = {k: v for k, v in ours.model.state_dict().items() if "lora_" in k}
    assert set(their_state) == set(our_state)
    for key, value in their_state.items():
        assert value.dtype == our_state[key].dtype == torch.bfloat16, key
        assert torch.equal(our_state[key], value), (key, (our_state[key] - value).abs().max())
