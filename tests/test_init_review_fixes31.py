"""Review fix 31 of the initialisations, against the real ``peft`` (0.21.2):

1. ``init_lora_weights="orthogonal"`` (PEFT's ``LoraLayer.orthogonal_init``) is implemented with
   PEFT's draws, so a seed gives PEFT's factors (nn.Linear, Conv1D; float32, bfloat16, float64
   bases) and ``B A = 0``: the model starts at the base's output. An odd rank, an embedding and
   a quantized layer are refused (peft fails on the first and last, and silently gives an
   embedding its default init), leaving the model as it was.
2. PEFT's values lorakit does not implement ("mica" in any case, "corda", "lora_ga") get their
   own message, quoting the value as passed and saying what to do; typos keep the old one.
3. On a float64 base the factors are drawn in float32 and cast, as PEFT draws them, so a seed
   gives PEFT's factors there too (nn.Linear, Conv1D, nn.Embedding, a bias on B, expert
   parameters, DoRA).
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch

import lorakit
from tests import quantized_layers, tiny_models
from tests.peft_pairs import adapter_tensor_pairs


def _quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


def _both(base, seed=5, **fields):
    """``(peft's model, lorakit's model)``, each injected into its own copy of ``base`` right
    after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(base), peft.LoraConfig(**fields))
    torch.manual_seed(seed)
    ours = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**fields))
    return theirs, ours


def _assert_equal_to_peft(theirs, ours) -> None:
    for key, (their_value, our_value) in adapter_tensor_pairs(theirs, ours).items():
        assert our_value.dtype == their_value.dtype, key
        diff = (our_value.double() - their_value.double()).abs().max().item()
        assert torch.equal(our_value, their_value), (key, diff)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tiny_models.input_ids()).logits.double()


# ------------------------------------------------------------------ 1. "orthogonal"

ORTHOGONAL_CASES = {
    "llama-fp32": (lambda: tiny_models.llama(), ["q_proj", "down_proj"]),
    "llama-bf16": (lambda: tiny_models.llama(dtype=torch.bfloat16), ["q_proj", "down_proj"]),
    "llama-fp64": (lambda: tiny_models.llama(dtype=torch.float64), ["q_proj", "down_proj"]),
    "gpt2-conv1d": (lambda: tiny_models.gpt2(), ["c_attn", "c_fc"]),
}


@pytest.mark.parametrize("case", list(ORTHOGONAL_CASES))
def test_orthogonal_factors_equal_peft_for_the_same_seed(case):
    make, targets = ORTHOGONAL_CASES[case]
    base = make()
    fields = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="orthogonal")
    theirs, ours = _both(base, **fields)
    _assert_equal_to_peft(theirs, ours)
    low_precision = next(base.parameters()).dtype == torch.bfloat16  # (another summation order)
    tolerance = 1e-2 if low_precision else 1e-6
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=0, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_orthogonal_starts_at_the_base_output_with_nonzero_factors(dtype):
    base = tiny_models.llama(dtype=dtype)
    config = lorakit.LoraConfig(
        r=6,
        lora_alpha=12,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights="orthogonal",
    )
    torch.manual_seed(0)
    ours = lorakit.inject(copy.deepcopy(base), config)
    layer = ours.get_submodule("model.layers.0.mlp.down_proj")
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert lora_A.shape == (6, 96) and lora_B.shape == (64, 6)
    assert lora_A.abs().min() > 0 and lora_B.abs().max() > 1e-2  # dense, not zero
    # A's rows span the odd rows of an orthogonal Q, B's columns its even rows: B A = 0
    product = (lora_B.double() @ lora_A.double()).abs().max().item()
    assert product < 1e-7
    torch.testing.assert_close(_logits(ours), _logits(base), rtol=0, atol=1e-6)


def test_orthogonal_adapter_saved_by_lorakit_loads_in_peft(tmp_path):
    base = tiny_models.llama()
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="orthogonal"
    )
    torch.manual_seed(1)
    ours = lorakit.inject(copy.deepcopy(base), config)
    tiny_models.randomize_adapters(ours)  # as if trained
    lorakit.save_adapter(ours, tmp_path)
    theirs = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path)
    again = lorakit.load_adapter(copy.deepcopy(base), tmp_path)
    expected = _logits(ours)
    assert (expected - _logits(base)).abs().max() > 1e-3
    torch.testing.assert_close(_logits(theirs), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(again), expected, rtol=0, atol=0)


def _assert_refused_and_untouched(model, config, *needles) -> None:
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError) as caught:
        lorakit.inject(model, config)
    for needle in needles:
        assert needle in str(caught.value), (needle, str(caught.value))
    assert not any("lora" in name for name, _ in model.named_modules())
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], value) for key, value in before.items())


@pytest.mark.parametrize(
    "fields, rank",
    [({"r": 3}, 3), ({"r": 4, "rank_pattern": {"down_proj": 5}}, 5)],
    ids=["r", "rank_pattern"],
)
def test_orthogonal_with_an_odd_rank_is_refused_and_changes_nothing(fields, rank):
    config = lorakit.LoraConfig(
        target_modules=["q_proj", "down_proj"], init_lora_weights="orthogonal", **fields
    )
    _assert_refused_and_untouched(
        tiny_models.llama(),
        config,
        "'orthogonal' needs an even rank",
        f"got rank {rank}",
        "use an even r",
    )


def test_orthogonal_on_an_embedding_is_refused_naming_it():
    config = lorakit.LoraConfig(
        r=4, target_modules=["q_proj", "embed_tokens"], init_lora_weights="orthogonal"
    )
    _assert_refused_and_untouched(
        tiny_models.llama(),
        config,
        "embedding Embedding(128, 64)",
        "nn.Linear / Conv1D",
        "exclude_modules",
        "init_lora_weights=True",
    )


def test_orthogonal_on_a_quantized_layer_is_refused_naming_it():
    model = torch.nn.Sequential(quantized_layers.bnb_4bit(quantized_layers.float_linear()))
    config = lorakit.LoraConfig(r=4, target_modules=["0"], init_lora_weights="orthogonal")
    _assert_refused_and_untouched(
        model, config, "quantized Linear4bit", "bnb-nf4", "init_lora_weights=True"
    )


# ------------------------------------------------------------------ 2. PEFT's other values


@pytest.mark.parametrize(
    "init, what, way_out",
    [
        ("mica", "PEFT's MiCA", "initialise it with peft and load the saved file"),
        ("corda", "PEFT's CorDA", "path_initial_model_for_weight_conversion"),
        ("lora_ga", "PEFT's LoRA-GA", "path_initial_model_for_weight_conversion"),
    ],
)
def test_peft_inits_lorakit_lacks_say_so(init, what, way_out):
    with pytest.raises(ValueError) as caught:
        lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights=init)
    message = str(caught.value)
    assert f"init_lora_weights={init!r} is invalid: it is {what}" in message
    assert "not implemented in lorakit: " in message and way_out in message
    assert "expected True, False" not in message


def test_mica_in_any_case_is_peft_s_mica():
    """PEFT reads "MiCA" as "mica" (``init_lora_weights.lower()``), so lorakit refuses it as
    MiCA too, not as a typo."""
    with pytest.raises(ValueError, match="init_lora_weights='mica' is invalid: it is PEFT's MiCA"):
        lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights="MiCA")


@pytest.mark.parametrize("init", ["Orthogonal", "micaa", "lora-ga", "PiSSA"])
def test_typos_keep_the_expected_values_message(init):
    with pytest.raises(ValueError) as caught:
        lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights=init)
    message = str(caught.value)
    assert message.startswith(f"LoraConfig.init_lora_weights={init!r} is invalid: expected ")
    assert '"orthogonal"' in message and "PEFT's" not in message


# ------------------------------------------------------------------ 3. float64 bases

FLOAT64_CASES = {
    "llama-linear-embedding": (
        lambda: tiny_models.llama(dtype=torch.float64),
        dict(target_modules=["q_proj", "embed_tokens"]),
    ),
    "gpt2-conv1d-embedding": (
        lambda: tiny_models.gpt2().double(),
        dict(target_modules=["c_attn", "wte"], fan_in_fan_out=True),
    ),
    "gpt2-lora-bias": (
        lambda: tiny_models.gpt2().double(),
        dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_bias=True),
    ),
    "mixtral-experts": (
        lambda: tiny_models.mixtral(dtype=torch.float64),
        dict(target_modules=[], target_parameters=["mlp.experts.gate_up_proj"]),
    ),
}


FLOAT64_PARAMS = [
    (case, init)
    for case in FLOAT64_CASES
    for init in (True, False, "gaussian")
    if not (case == "gpt2-lora-bias" and init == "gaussian")  # (lora_bias: True / False only)
]


@pytest.mark.parametrize("case, init", FLOAT64_PARAMS, ids=str)
def test_float64_base_factors_equal_peft_for_the_same_seed(case, init):
    make, targets = FLOAT64_CASES[case]
    theirs, ours = _both(make(), r=4, lora_alpha=8, init_lora_weights=init, **targets)
    pairs = adapter_tensor_pairs(theirs, ours)
    assert {value.dtype for pair in pairs.values() for value in pair} == {torch.float64}
    _assert_equal_to_peft(theirs, ours)


@pytest.mark.parametrize("init", [True, False], ids=str)
def test_float64_dora_factors_and_magnitude_equal_peft(init):
    base = tiny_models.llama(dtype=torch.float64)
    theirs, ours = _both(
        base, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True, init_lora_weights=init
    )
    for key, (their_value, our_value) in adapter_tensor_pairs(theirs, ours).items():
        assert our_value.dtype == their_value.dtype == torch.float64, key
        if "magnitude" in key:  # ||W0 + s B A|| per row, computed from equal factors
            torch.testing.assert_close(our_value, their_value, rtol=1e-12, atol=1e-12)
        else:
            assert torch.equal(our_value, their_value), key
