"""Review fixes (session 32) of the base fingerprint (``lorakit.io.fingerprint``,
``lorakit.io.quantized_fingerprint``):

1. a quantized base is fingerprinted by its scales too, not its codes only: the same codes with
   other scales (a SmoothQuant-style x2 move of ``v_proj``) are another base;
2. float vs quantized bases are judged by the weights' values: a float model that IS the
   dequantized GGUF file shares adapters with it both ways, NF4 still does not (named as such);
   fingerprints written before (codes only) load as before;
3. bfloat16-rounded weights held in float32 get the verdict they get held in bfloat16;
4. an unconverted PiSSA / OLoRA adapter on the original base names the residual base it needs.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lorakit
from lorakit import quantized
from lorakit.errors import AdapterFileError, BaseModelMismatchError
from lorakit.io import fingerprint, quantized_fingerprint
from lorakit.io.read import read_adapter
from lorakit.quantized import int4_groups, int8_rows
from tests import quantized_layers, tiny_models

SCALES_DIFFER = "sampled scales differ: the same codes compute other weights"
FLOAT_DIFFERS = "the quantized weights differ from the float ones"

QUANTIZERS = {
    **quantized_layers.QUANTIZERS,
    "int8-rows": lambda linear: int8_rows.Int8RowsLinear.from_weight(linear.weight, linear.bias),
    "int4-groups": lambda linear: int4_groups.Int4GroupsLinear.from_weight(
        linear.weight, linear.bias
    ),
}


def _linear(out_features: int, in_features: int, scale: float = 1.0) -> nn.Linear:
    linear = quantized_layers.float_linear(out_features, in_features)
    with torch.no_grad():
        linear.weight.mul_(scale)
    return linear


def _save(model: nn.Module, directory, targets=("q_proj", "v_proj"), **config) -> nn.Module:
    lorakit.inject(
        model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), **config)
    )
    tiny_models.randomize_adapters(model)
    lorakit.save_adapter(model, directory)
    return model


def _quantized_llama(kind: str, v_scale: float = 1.0) -> nn.Module:
    """The tiny Llama (seed 0) with ``v_proj`` scaled by ``v_scale`` and every projection in
    ``kind`` (``QUANTIZERS``)."""
    model = tiny_models.llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight.mul_(v_scale)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name.endswith("proj"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, QUANTIZERS[kind](module))
    return model


def _rewrite_fingerprint(directory, edit) -> None:
    """Rewrite the header's fingerprint of the adapter in ``directory`` as ``edit(modules)``."""
    path = directory / "adapter_model.safetensors"
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
        keys = handle.keys()
        tensors = {key: handle.get_tensor(key) for key in keys}
    payload = json.loads(metadata[fingerprint.METADATA_KEY])
    payload["modules"] = edit(payload["modules"])
    metadata[fingerprint.METADATA_KEY] = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    save_file(tensors, path, metadata)


# ------------------------------------------------------------------------------ 1. scales
@pytest.mark.parametrize("kind", ["int8-rows", "int4-groups", "bnb-nf4-dq", "bnb-nf4", "bnb-int8"])
def test_the_same_codes_with_other_scales_are_another_base(kind):
    """Weights x2 (exact in every format): the codes stay, the scales double, every output
    doubles; the fingerprint of the first layer refuses the second, naming the scales."""
    first, second = (QUANTIZERS[kind](_linear(64, 128, scale)) for scale in (1.0, 2.0))
    codes, name = fingerprint.base_identity(second)
    assert torch.equal(codes, fingerprint.base_identity(first)[0])  # the codes are equal
    x = torch.randn(3, 128)
    with torch.no_grad():
        difference = quantized.base_forward(second, x) - quantized.base_forward(first, x)
    assert difference.abs().max() > 0.1
    stored = fingerprint.module_fingerprint(first)
    assert fingerprint.module_difference(stored, first, fingerprint.base_identity(first)) is None
    assert fingerprint.module_difference(stored, second, (codes, name)) == SCALES_DIFFER


@pytest.mark.parametrize(("kind", "scale_bytes"), [("gguf-Q4_0", 2), ("gguf-Q4_1", 4)])
def test_a_gguf_layer_with_other_block_scales_is_another_base(kind, scale_bytes):
    """GGUF keeps d (and m) in each block of the packed bytes: doubling them (the nibbles
    unchanged) doubles the weights, and the fingerprint's scales (those bytes) refuse it."""
    first = QUANTIZERS[kind](_linear(64, 128))
    second = copy.deepcopy(first)
    blocks = second.packed.view(-1, first.packed.shape[1] // 4)  # (blocks, block bytes)
    halves = blocks[:, :scale_bytes].contiguous().view(torch.float16)
    blocks[:, :scale_bytes] = (halves * 2).view(torch.uint8)
    assert torch.equal(blocks[:, scale_bytes:], first.packed.view_as(blocks)[:, scale_bytes:])
    dequantized = quantized.dequantized_weight
    assert torch.equal(dequantized(second), 2 * dequantized(first))
    stored = fingerprint.module_fingerprint(first)
    assert stored["scales"] != fingerprint.module_fingerprint(second)["scales"]
    reason = fingerprint.module_difference(stored, second, fingerprint.base_identity(second))
    assert reason in (SCALES_DIFFER, "sampled weights differ")  # (a sampled byte may be a scale)


@pytest.mark.parametrize("kind", ["int8-rows", "int4-groups", "bnb-nf4-dq"])
def test_an_adapter_is_refused_on_a_base_with_a_rescaled_layer(tmp_path, kind):
    """The review's case: base B = base A with v_proj x2; A's adapter loaded onto B."""
    _save(_quantized_llama(kind), tmp_path)
    with pytest.raises(BaseModelMismatchError) as error:
        lorakit.load_adapter(_quantized_llama(kind, v_scale=2.0), tmp_path)
    assert "module 'model.layers.0.self_attn.v_proj' does not match" in str(error.value)
    assert f"({SCALES_DIFFER})" in str(error.value)
    lorakit.load_adapter(_quantized_llama(kind), tmp_path)  # base A itself: loads


# --------------------------------------------------------- 2. the dequantized weights' values
@pytest.mark.parametrize("shape", [(128, 192), (160, 96)])
@pytest.mark.parametrize("kind", sorted(QUANTIZERS))
def test_the_sampled_dequantization_is_the_full_ones_values(kind, shape):
    """``dequantized_samples`` reads only the blocks / rows holding the samples, and gives the
    full dequantization's values there, bit for bit (160 rows: int4-groups' last block of 32
    rows). bitsandbytes 4-bit is checked on 192-wide rows only: its CPU ``dequantize_4bit``
    misreads the block scales of rows that are not whole blocks of 64 (docs/adapter-files.md,
    LoftQ), where the samples keep the flattened blocks' own scales."""
    if kind.startswith("bnb-") and kind != "bnb-int8" and shape[1] % 64:
        shape = (shape[0], 128)
    layer = QUANTIZERS[kind](_linear(*shape))
    full = quantized.dequantized_weight(layer).reshape(-1)
    expected = full[fingerprint.sample_positions(full.numel())]
    assert torch.equal(quantized_fingerprint.dequantized_samples(layer), expected)
    entry = fingerprint.module_fingerprint(layer)
    assert entry["dequantized"]["shape"] == list(shape)
    assert torch.equal(fingerprint.sample_values(entry["dequantized"]), expected)


def _float_twin(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The float model whose linears hold exactly the dequantized weights of ``model``'s."""
    return quantized_layers.dequantized_twin(model).to(dtype)


def test_a_float_model_equal_to_the_dequantized_gguf_shares_adapters_both_ways(tmp_path):
    gguf = _quantized_llama("gguf-Q4_1")
    twin = _float_twin(gguf)
    ids = tiny_models.input_ids()
    with torch.no_grad():
        assert torch.equal(gguf(ids).logits, twin(ids).logits)  # the same model
    trained_on_gguf = _save(copy.deepcopy(gguf), tmp_path / "gguf")
    trained_on_float = _save(copy.deepcopy(twin), tmp_path / "float")
    on_float, on_gguf = copy.deepcopy(twin), copy.deepcopy(gguf)
    lorakit.load_adapter(on_float, tmp_path / "gguf")
    lorakit.load_adapter(on_gguf, tmp_path / "float")
    with torch.no_grad():
        assert torch.allclose(on_float(ids).logits, trained_on_gguf(ids).logits, atol=1e-5)
        assert torch.allclose(on_gguf(ids).logits, trained_on_float(ids).logits, atol=1e-5)
    # the same weights held in bfloat16: accepted within its rounding
    lorakit.load_adapter(_float_twin(gguf, torch.bfloat16), tmp_path / "gguf")
    # another model's float weights: refused, saying so
    with pytest.raises(BaseModelMismatchError, match=FLOAT_DIFFERS):
        lorakit.load_adapter(tiny_models.llama(seed=1), tmp_path / "gguf")


def test_the_float_model_and_its_nf4_are_still_told_apart_by_their_values(tmp_path):
    float_model = tiny_models.llama()
    _save(_quantized_llama("bnb-nf4-dq"), tmp_path / "nf4")
    _save(copy.deepcopy(float_model), tmp_path / "float")
    with pytest.raises(BaseModelMismatchError) as onto_float:
        lorakit.load_adapter(copy.deepcopy(float_model), tmp_path / "nf4")
    assert (
        "(the adapter was trained on a bnb-nf4-dq base, this base is float32; "
        f"{FLOAT_DIFFERS}: sampled values differ beyond float32 rounding)"
    ) in str(onto_float.value)
    with pytest.raises(BaseModelMismatchError) as onto_nf4:
        lorakit.load_adapter(_quantized_llama("bnb-nf4-dq"), tmp_path / "float")
    assert "trained on a float32 base, this base is bnb-nf4-dq; " + FLOAT_DIFFERS in str(
        onto_nf4.value
    )
    # another format of the same weights: still "a different quantization"
    with pytest.raises(BaseModelMismatchError, match="a different quantization computes"):
        lorakit.load_adapter(_quantized_llama("bnb-fp4-dq"), tmp_path / "nf4")


@pytest.mark.integration
def test_the_builtin_smollm2_float_model_and_its_gguf_share_adapters(tmp_path):
    """The review's case: the built-in float model is exactly dequant(its Q4_1 GGUF)."""
    from lorakit.models import load_model

    float_model, _ = load_model("smollm2-135m-instruct", progress=False)
    gguf, _ = load_model("smollm2-135m-instruct", quantization="gguf", progress=False)
    _save(copy.deepcopy(gguf), tmp_path / "gguf", targets=("q_proj", "v_proj", "down_proj"))
    _save(copy.deepcopy(float_model), tmp_path / "float", targets=("q_proj", "down_proj"))
    lorakit.load_adapter(float_model, tmp_path / "gguf")
    lorakit.load_adapter(gguf, tmp_path / "float")


def test_fingerprints_written_before_load_as_before(tmp_path):
    """A file whose quantized entries hold the codes only (as lorakit wrote them before: the
    same fields as ``weight_fingerprint(codes, format)``) is compared by its codes: it loads
    onto the same codes (rescaled or not) and is refused by the float model, as before."""
    model = _save(_quantized_llama("int8-rows"), tmp_path)
    fields = ("shape", "dtype", "sha256", "values")
    _rewrite_fingerprint(tmp_path, lambda m: {n: {k: e[k] for k in fields} for n, e in m.items()})
    stored = read_adapter(tmp_path).fingerprint
    for name, entry in stored.items():
        codes, kind = fingerprint.base_identity(model.get_submodule(name))
        assert entry == fingerprint.weight_fingerprint(codes, kind)
    lorakit.load_adapter(_quantized_llama("int8-rows"), tmp_path)
    lorakit.load_adapter(_quantized_llama("int8-rows", v_scale=2.0), tmp_path)
    with pytest.raises(BaseModelMismatchError) as error:
        lorakit.load_adapter(_float_twin(_quantized_llama("int8-rows")), tmp_path)
    assert "(the adapter was trained on an int8-rows base, this base is float32; a different " in (
        str(error.value)
    )


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("scales", 7, "scales is not a string"),
        ("dequantized", {"shape": [64], "values": ""}, "dequantized shape [64] is not [out, in]"),
        ("dequantized", {"shape": [64, 64], "values": "!!"}, "dequantized values are not base64"),
        ("dequantized", {"shape": [64, 64], "values": "AAAAAA=="}, "4 bytes of dequantized values"),
    ],
)
def test_a_broken_quantized_field_is_an_unreadable_fingerprint(tmp_path, field, value, says):
    _save(_quantized_llama("int8-rows"), tmp_path)
    _rewrite_fingerprint(tmp_path, lambda m: {n: e | {field: value} for n, e in m.items()})
    with pytest.raises(AdapterFileError, match=r"base-model fingerprint .* is unreadable") as error:
        read_adapter(tmp_path)
    assert says in str(error.value)


# ------------------------------------------------------------------ 3. one set of weights
def test_bf16_rounded_weights_get_one_verdict_in_bf16_and_in_fp32(tmp_path):
    _save(tiny_models.llama(), tmp_path / "fp32")
    rounded = tiny_models.llama().to(torch.bfloat16)
    lorakit.load_adapter(copy.deepcopy(rounded), tmp_path / "fp32")  # (accepted before too)
    lorakit.load_adapter(rounded.to(torch.float32), tmp_path / "fp32")
    # the other way round: trained on the rounded weights held in fp32, loaded on the original
    _save(tiny_models.llama().to(torch.bfloat16).to(torch.float32), tmp_path / "rounded")
    lorakit.load_adapter(tiny_models.llama(), tmp_path / "rounded")
    # a rounded copy with one sampled element changed is still another base
    changed = tiny_models.llama().to(torch.bfloat16).to(torch.float32)
    weight = changed.model.layers[0].self_attn.q_proj.weight
    position = int(fingerprint.sample_positions(weight.numel())[5])
    with torch.no_grad():
        weight.view(-1)[position] += 2.0**-4
    with pytest.raises(
        BaseModelMismatchError, match=r"q_proj' does not match .*\(sampled weights differ\)"
    ):
        lorakit.load_adapter(changed, tmp_path / "fp32")


# ------------------------------------------------------------------- 4. unconverted PiSSA
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_unconverted_pissa_adapter_names_the_residual_base_it_needs(tmp_path, init):
    _save(tiny_models.llama(), tmp_path, init_lora_weights=init)
    with pytest.raises(BaseModelMismatchError) as error:
        lorakit.load_adapter(tiny_models.llama(), tmp_path)
    message = str(error.value)
    assert f"saved without conversion after init_lora_weights={init!r}" in message
    assert "belong to the residual base W0 - s B0 A0 that this init left" in message
    assert "allow_base_mismatch=True would give wrong outputs" in message
    assert "initial_adapter=<initial adapter dir>" in message
    assert "pass allow_base_mismatch=True to load it anyway" not in message
    # a plain adapter on another base keeps the plain remedy
    _save(tiny_models.llama(), tmp_path / "plain")
    with pytest.raises(BaseModelMismatchError, match="pass allow_base_mismatch=True to load it"):
        lorakit.load_adapter(tiny_models.llama(seed=1), tmp_path / "plain")


def test_combine_judges_two_files_bases_as_loading_does(tmp_path):
    """Adapters of the float model and of the GGUF file it equals each load onto either base,
    so they combine; NF4's and the float model's do not, nor a rescaled layer's same codes."""
    gguf = _quantized_llama("gguf-Q4_1")
    _save(copy.deepcopy(gguf), tmp_path / "gguf")
    _save(_float_twin(gguf), tmp_path / "float", targets=("q_proj",))
    combined = lorakit.combine([tmp_path / "gguf", tmp_path / "float"], [1.0, 0.5])
    assert "model.layers.0.self_attn.q_proj" in combined.factors
    _save(_quantized_llama("bnb-nf4-dq"), tmp_path / "nf4")
    _save(tiny_models.llama(), tmp_path / "plain")
    with pytest.raises(BaseModelMismatchError, match="sampled values differ"):
        lorakit.combine([tmp_path / "nf4", tmp_path / "plain"], [1.0, 1.0])
    _save(_quantized_llama("int8-rows"), tmp_path / "rows")
    _save(_quantized_llama("int8-rows", v_scale=2.0), tmp_path / "rescaled")
    with pytest.raises(BaseModelMismatchError, match="scales differ"):
        lorakit.combine([tmp_path / "rows", tmp_path / "rescaled"], [1.0, 1.0])
