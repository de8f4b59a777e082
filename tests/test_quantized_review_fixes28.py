"""Review fixes (round 28) on quantized bases and their messages: an NF4 adapter fits every
``bnb_4bit_quant_storage`` of the same codes; an ``llm_int8_has_fp16_weight`` layer gets advice
that works; a ``GGUFLinear``'s bias trains with ``bias="all"``; DoRA / ``lora_bias`` refusals
on a quantized base say so, at inject and at load (a PEFT DoRA embedding too)."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import lorakit
from lorakit.accounting import count_parameters
from lorakit.errors import AdapterFileError
from lorakit.io import fingerprint
from lorakit.quantized import UnsupportedQuantizedLayerError
from lorakit.quantized.int8_rows import Int8RowsLinear
from tests import quantized_layers, tiny_models

TARGETS = ["q_proj", "v_proj", "down_proj"]


# ------------------------------------------------ 1. NF4 adapters across quant_storage dtypes
@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama-float")
    tiny_models.llama().save_pretrained(directory)
    return directory


def _nf4(directory, storage: torch.dtype) -> nn.Module:
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=storage,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            directory, quantization_config=config, device_map="cpu", dtype=torch.float32
        )
    return model.train()  # (bitsandbytes' training path: no CPU repacking)


@pytest.mark.parametrize(
    ("saved_on", "loaded_on"), [(torch.uint8, torch.bfloat16), (torch.bfloat16, torch.uint8)]
)
def test_nf4_adapter_loads_on_another_quant_storage(float_dir, tmp_path, saved_on, loaded_on):
    model = lorakit.inject(
        _nf4(float_dir, saved_on), lorakit.LoraConfig(r=4, target_modules=TARGETS)
    )
    tiny_models.randomize_adapters(model, std=0.2)  # B != 0
    ids = tiny_models.input_ids()
    with torch.no_grad():
        expected = model(ids).logits
    lorakit.save_adapter(model, tmp_path / "adapter")
    other = _nf4(float_dir, loaded_on)
    codes = other.model.layers[0].self_attn.q_proj.weight.data
    assert codes.dtype == loaded_on  # (the storage dtype really differs)
    lorakit.load_adapter(other, tmp_path / "adapter")
    with torch.no_grad():
        got = other(ids).logits
    assert torch.equal(got, expected)


def test_nf4_fingerprints_are_the_bytes_and_old_ones_still_fit(float_dir):
    """A uint8-storage NF4 layer's fingerprint is unchanged (the codes as stored), the
    bfloat16-storage layer of the same codes gives the same one, and a fingerprint an older
    lorakit took of the bfloat16 storage (shape (bytes / 2, 1)) fits both."""
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    as_uint8, as_bf16 = _nf4(float_dir, torch.uint8), _nf4(float_dir, torch.bfloat16)
    fmt = "bnb-nf4-dq"
    new_uint8 = fingerprint.compute(as_uint8, names)
    old_uint8 = {
        n: fingerprint.weight_fingerprint(as_uint8.get_submodule(n).weight.data, fmt) for n in names
    }
    codes_part = {n: {key: entry[key] for key in old_uint8[n]} for n, entry in new_uint8.items()}
    assert codes_part == old_uint8  # (session 32 added the scales and dequantized samples)
    assert fingerprint.compute(as_bf16, names) == new_uint8
    old_bf16 = {
        n: fingerprint.weight_fingerprint(as_bf16.get_submodule(n).weight.data, fmt) for n in names
    }
    assert old_bf16[names[0]]["shape"] != new_uint8[names[0]]["shape"]
    for model in (as_uint8, as_bf16):
        assert fingerprint.first_mismatch(model, old_bf16, names) is None
        assert fingerprint.first_mismatch(model, old_uint8, names) is None
    changed = copy.deepcopy(old_bf16)
    changed[names[0]]["sha256"] = "0" * 32  # other codes: still refused
    found = fingerprint.first_mismatch(as_bf16, changed, names)
    assert found is not None and found[0] == names[0]


# ------------------------------------------------ 2. Linear8bitLt with has_fp16_weights=True
def test_int8_layer_with_fp16_weights_names_the_setting():
    import bitsandbytes as bnb

    linear = quantized_layers.float_linear()
    layer = bnb.nn.Linear8bitLt(64, 48, bias=True, has_fp16_weights=True).to("cpu")
    layer.load_state_dict(linear.state_dict())
    with pytest.raises(UnsupportedQuantizedLayerError) as caught:
        lorakit.inject(nn.Sequential(layer), lorakit.LoraConfig(r=4, target_modules=["0"]))
    message = str(caught.value)
    assert "llm_int8_has_fp16_weight=False" in message and "'0'" in message
    assert ".to('cpu')" not in message
    assert layer.weight.dtype == torch.float32  # (.to('cpu') did not quantize it)
    unquantized = bnb.nn.Linear8bitLt(64, 48, has_fp16_weights=False)  # not moved yet
    with pytest.raises(UnsupportedQuantizedLayerError, match=r"\.to\('cpu'\) quantizes it"):
        lorakit.inject(nn.Sequential(unquantized), lorakit.LoraConfig(r=4, target_modules=["0"]))


# ------------------------------------------------ 3. a GGUFLinear's bias with bias="all"
class _OneProj(nn.Module):
    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _trained_bias(base: nn.Module, tmp_path, label: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(bias after one SGD step with bias="all", the bias saved in the adapter file)."""
    config = lorakit.LoraConfig(r=4, target_modules=["proj"], bias="all", init_lora_weights=False)
    model = lorakit.inject(_OneProj(base), config).train()
    torch.manual_seed(7)
    with torch.no_grad():  # the same A, B (B != 0) on every base
        model.proj.lora_A["default"].weight.copy_(torch.randn(4, 64) * 0.1)
        model.proj.lora_B["default"].weight.copy_(torch.randn(48, 4) * 0.1)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.linspace(-1, 1, 6 * 64).view(6, 64)
    weights = torch.linspace(-2, 1, 6 * 48).view(6, 48)
    (model(x) * weights).sum().backward()
    optimizer.step()
    lorakit.save_adapter(model, tmp_path / label)
    with safe_open(str(tmp_path / label / "adapter_model.safetensors"), "pt") as file:
        saved = file.get_tensor("base_model.model.proj.base_layer.bias")
    return model.proj.base_layer.bias.detach().clone(), saved


def test_gguf_bias_trains_and_saves_with_bias_all(tmp_path):
    linear = quantized_layers.float_linear()
    gguf = quantized_layers.gguf(linear, "Q8_0")
    assert isinstance(gguf.bias, nn.Parameter) and not gguf.bias.requires_grad
    assert set(gguf.state_dict()) == {"packed", "bias"}  # (the same keys as before)
    start = linear.bias.detach().clone()
    # dL/db = sum over rows of the output weights: SGD gives b - lr * that
    expected = start - 0.1 * torch.linspace(-2, 1, 6 * 48).view(6, 48).sum(0)
    for label, base in (
        ("gguf", gguf),
        ("int8-rows", Int8RowsLinear.from_weight(linear.weight, linear.bias)),
        ("float", copy.deepcopy(linear).requires_grad_(False)),
    ):
        trained, saved = _trained_bias(base, tmp_path, label)
        torch.testing.assert_close(trained, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(saved, expected, rtol=0, atol=1e-6)


def test_gguf_bias_is_counted_as_a_parameter():
    linear = quantized_layers.float_linear()
    counts = count_parameters(_OneProj(quantized_layers.gguf(linear, "Q4_1")))
    assert counts.total == 48 * 64 + 48 == count_parameters(_OneProj(linear)).total
    assert counts.trainable == 0


# ------------------------------------------------ 4. DoRA / lora_bias on a quantized base
@pytest.mark.parametrize("quantization", ["torchao-int8-weight-only", "gguf-Q4_0", "bnb-nf4-dq"])
@pytest.mark.parametrize("setting", ["use_dora", "lora_bias"])
def test_dora_and_lora_bias_refusal_says_quantized(quantization, setting):
    model = _OneProj(quantized_layers.QUANTIZERS[quantization](quantized_layers.float_linear()))
    config = lorakit.LoraConfig(r=4, target_modules=["proj"], **{setting: True})
    with pytest.raises(ValueError) as caught:
        lorakit.inject(model, config)
    message = str(caught.value)
    assert f"'proj' is quantized ({quantization})" in message
    assert f"{setting}=False" in message and "is a Linear:" not in message


# ------------------------------------------------ 5. loading a PEFT file lorakit cannot take
def _peft_file(tmp_path, **settings) -> str:
    torch.manual_seed(0)
    directory = str(tmp_path / "peft")
    peft_model = peft.get_peft_model(tiny_models.llama(), peft.LoraConfig(r=4, **settings))
    peft_model.save_pretrained(directory)
    return directory


def test_load_peft_dora_embedding_says_use_peft(tmp_path):
    directory = _peft_file(tmp_path, target_modules=["embed_tokens", "q_proj"], use_dora=True)
    model = tiny_models.llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(AdapterFileError) as caught:
        lorakit.load_adapter(model, directory)
    message = str(caught.value)
    assert "DoRA" in message and "the embedding 'model.embed_tokens'" in message
    assert "peft" in message and "merge_and_unload" in message
    assert "target_modules" not in message and "exclude_modules" not in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_load_peft_dora_onto_quantized_model_says_quantized(tmp_path):
    directory = _peft_file(tmp_path, target_modules=["q_proj"], use_dora=True)
    model = quantized_layers.quantize_linears(tiny_models.llama(), "gguf-Q8_0", only=("q_proj",))
    with pytest.raises(AdapterFileError) as caught:
        lorakit.load_adapter(model, directory)
    message = str(caught.value)
    assert "is quantized here (gguf-Q8_0)" in message and "float model" in message
    assert "target_modules" not in message


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unconverted_base_changing_dora_file_says_load_it_with_peft(init):
    """A PEFT file saved unconverted with a base-rewriting init and DoRA cannot be redone here:
    the message says so and points to peft, not to editing the config ("use one of them")."""
    import json

    from lorakit.errors import AdapterFileError
    from lorakit.io.config_json import config_from_json

    text = json.dumps(
        {
            "peft_type": "LORA",
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj"],
            "init_lora_weights": init,
            "use_dora": True,
        }
    )
    with pytest.raises(AdapterFileError) as caught:
        config_from_json(text, "adapter_config.json")
    message = str(caught.value)
    assert "load it with peft" in message and init in message
    assert "use one of them" not in message


def test_an_old_wider_storage_fingerprint_of_other_codes_says_the_weights_differ():
    """An older lorakit fingerprinted a bfloat16-storage NF4 base as (bytes / 2, 1) bf16: the
    same codes fit; other codes of the same layer are "sampled weights differ", not a shape
    mismatch between two views of the same layer."""
    from lorakit.io.fingerprint import describe_difference, weight_fingerprint

    codes = torch.randint(0, 256, (4096, 1), dtype=torch.uint8, generator=torch.manual_seed(0))
    old = weight_fingerprint(codes.reshape(2048, 2).view(torch.bfloat16), "bnb-nf4-dq")
    assert old["shape"] == [2048, 1]
    assert describe_difference(old, codes, "bnb-nf4-dq") is None
    other = codes.clone()
    other[::7] ^= 0x5A
    assert describe_difference(old, other, "bnb-nf4-dq") == "sampled weights differ"
