"""``lorakit plan --quantization``: the frozen base's bytes with its linears quantized, checked
against the bytes real quantized layers store and against the formula written out by hand."""

from __future__ import annotations

import json

import pytest

from lorakit import quantized
from lorakit.cli import main
from lorakit.errors import UserError
from lorakit.plan import plan
from lorakit.plan_report import format_report
from lorakit.quantized.footprint import weight_bytes
from tests import quantized_layers, tiny_models

# Llama-2-7B: 32 blocks of q, k, v, o (4096 x 4096) and gate, up, down (11008 x 4096);
# embeddings and output layer 32000 x 4096 and 65 norms of 4096 stay in float16.
LINEAR_WEIGHTS = 32 * (4 * 4096 * 4096 + 3 * 11008 * 4096)
FLOAT_WEIGHTS = 2 * 32000 * 4096 + 65 * 4096


def test_llama2_7b_nf4_base_takes_3_87_gb():
    result = plan("llama-2-7b", quantization="nf4")
    assert result.quantized_weights[0] == LINEAR_WEIGHTS == 6_476_005_376
    # per weight: half a byte of code, 1/64 byte of 8-bit absmax, 4/(64*256) byte of float32
    # second-level absmax (every layer's weights are whole blocks of 64 * 256), 4 bytes a layer
    per_weight = 0.5 + 1 / 64 + 4 / (64 * 256)
    expected_linears = LINEAR_WEIGHTS * per_weight + 4 * 224
    assert result.quantized_weights[1] == pytest.approx(expected_linears, abs=1)
    assert result.base_bytes == pytest.approx(expected_linears + 2 * FLOAT_WEIGHTS, abs=1)
    assert 3.5e9 < result.base_bytes < 3.9e9
    adapter_state = 39_976_960 * 16  # r=16 all-linear, fp32 weights + gradients + AdamW
    assert result.lora_training_bytes == result.base_bytes + adapter_state
    assert result.inference_with_adapters_bytes == result.base_bytes + 39_976_960 * 4
    report = format_report(result)
    assert "6,476,005,376 frozen in nf4 (0.5159 bytes each" in report
    assert "= 4.51 GB" in report


@pytest.mark.parametrize(
    ("quantization", "per_weight"),
    [("int8", 1.0), ("q4_0", 18 / 32), ("q4_1", 20 / 32), ("q8_0", 34 / 32)],
)
def test_llama2_7b_other_formats_by_hand(quantization, per_weight):
    result = plan("llama-2-7b", quantization=quantization)
    # int8: one float32 scale per output row; a block has q, k, v, o, down (4096 rows each)
    # and gate, up (11008 rows each)
    row_scales = 4 * 32 * (4 * 4096 + 2 * 11008 + 4096) if quantization == "int8" else 0
    assert result.quantized_weights[1] == LINEAR_WEIGHTS * per_weight + row_scales


@pytest.mark.parametrize("name", ["bnb-nf4-dq", "bnb-fp4-dq", "bnb-int8", "gguf-Q4_0", "gguf-Q4_1"])
@pytest.mark.parametrize("shape", [(96, 320), (48, 64)])
def test_the_formula_is_what_a_real_quantized_layer_stores(name, shape):
    layer = quantized_layers.QUANTIZERS[name](quantized_layers.float_linear(*shape))
    stored = sum(tensor.nbytes for tensor in quantized.storage(layer).values())
    if name.startswith("bnb-") and name != "bnb-int8":
        stored += layer.weight.quant_state.offset.nbytes  # the double quantization's offset
    plan_name = {"bnb-nf4-dq": "nf4", "bnb-fp4-dq": "fp4", "bnb-int8": "int8"}.get(name)
    assert weight_bytes(plan_name or name.removeprefix("gguf-").lower(), *shape) == stored


def test_cli_plan_quantized_json_and_a_row_of_partial_blocks(capsys, tmp_path):
    assert main(["plan", "llama-2-7b", "--quantization", "q4_1", "--json"]) == 0
    numbers = json.loads(capsys.readouterr().out)
    assert numbers["quantization"] == "q4_1"
    assert numbers["base_bytes"] == LINEAR_WEIGHTS * 20 // 32 + 2 * FLOAT_WEIGHTS
    with pytest.raises(ValueError, match="in_features=48 is not a multiple"):
        weight_bytes("q8_0", 16, 48)
    with pytest.raises(ValueError, match="unknown quantization 'nf5'"):
        weight_bytes("nf5", 16, 64)


def test_a_gguf_format_on_a_model_with_partial_blocks_is_a_user_error(tmp_path):
    config = {"model_type": "llama", "hidden_size": 48, "intermediate_size": 96}
    config |= {"num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="--quantization: a q4_0 row holds whole blocks"):
        plan(str(tmp_path), quantization="q4_0")
    assert plan(str(tmp_path), quantization="nf4").base_bytes > 0


def test_lorakits_cpu_formats_store_the_output_layer_in_int8_rows():
    # Llama-2-7B (untied output layer): the block linears and the 32000 x 4096 output layer
    output_weights = 32000 * 4096
    int8 = plan("llama-2-7b", quantization="int8-rows")
    rows = 32 * (5 * 4096 + 2 * 11008)  # q, k, v, o, down: 4096 rows; gate, up: 11008
    assert int8.quantized_weights == (
        LINEAR_WEIGHTS + output_weights,
        LINEAR_WEIGHTS + 2 * rows + output_weights + 2 * 32000,
    )
    int4 = plan("llama-2-7b", quantization="int4-groups")
    assert int4.quantized_weights[1] == LINEAR_WEIGHTS * 5 // 8 + output_weights + 2 * 32000
    assert int4.base_bytes == int4.quantized_weights[1] + 2 * (32000 * 4096 + 65 * 4096)
    assert "scales and the output layer's int8 rows included" in format_report(int4)
    with pytest.raises(ValueError, match="multiples of 32; got 48 x 64"):
        weight_bytes("int4-groups", 48, 64)


@pytest.mark.parametrize(("quantization", "mlp"), [("int8-rows", 96), ("int4-groups", 80)])
def test_cpu_formats_plan_what_quantize_linears_stores_on_a_tied_model(quantization, mlp):
    from transformers import LlamaForCausalLM

    from lorakit.quantized import int4_groups, int8_rows
    from lorakit.quantized.footprint import quantized_base

    # tied output layer; int4-groups: an MLP of 80 (not whole groups of 32) stays float
    config = tiny_models.llama_config(tie_word_embeddings=True, intermediate_size=mlp)
    model = LlamaForCausalLM(config)
    float_weights = sum(p.numel() for p in model.parameters())
    weights, planned = quantized_base(model, quantization)
    {"int8-rows": int8_rows, "int4-groups": int4_groups}[quantization].quantize_linears(model)
    layers = [m for m in model.modules() if quantized.is_quantized(m)]
    stored = sum(t.nbytes for m in layers for t in quantized.storage(m).values())
    assert planned == stored > 0
    assert float_weights - weights == sum(p.numel() for p in model.parameters())
    assert isinstance(model.lm_head, int8_rows.Int8RowsLinear)  # a copy: the embedding is float
    assert len(layers) == 2 * (7 if quantization == "int8-rows" else 4) + 1


@pytest.mark.parametrize(
    "settings",
    [
        {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
        {"load_in_8bit": True},
    ],
)
def test_gpt2s_conv1d_projections_are_planned_as_bitsandbytes_stores_them(tmp_path, settings):
    """transformers' bitsandbytes loading quantizes GPT-2's Conv1D projections too: the plan
    counts the bytes the loaded 4-bit / 8-bit layers store."""
    import warnings

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_models.gpt2().save_pretrained(tmp_path)
    quantization = "nf4" if settings.get("load_in_4bit") else "int8"
    weights, planned = plan(str(tmp_path), quantization=quantization).quantized_weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=BitsAndBytesConfig(**settings), device_map="cpu"
        )
    layers = [m for m in loaded.modules() if quantized.is_quantized(m)]
    assert len(layers) == 4 * tiny_models.GPT2_SIZES["n_layer"]  # c_attn, c_proj, c_fc, c_proj
    stored = sum(t.nbytes for m in layers for t in quantized.storage(m).values())
    offsets = [getattr(m.weight, "quant_state", None) for m in layers]  # double quantization's
    stored += sum(state.offset.nbytes for state in offsets if state is not None)
    assert planned == stored
    assert weights == sum(m.in_features * m.out_features for m in layers)


def test_a_cpu_format_that_would_quantize_nothing_is_a_user_error(tmp_path):
    from transformers import GPT2Config

    config = GPT2Config(**tiny_models.GPT2_SIZES, architectures=["GPT2Model"])
    config.save_pretrained(tmp_path)  # Conv1D projections, no output layer
    with pytest.raises(UserError, match="no layer of this GPT2Model would be stored"):
        plan(str(tmp_path), quantization="int4-groups")


@pytest.mark.parametrize(
    ("family", "quantization"), [("gpt2", "int8-rows"), ("llama", "int4-groups")]
)
def test_plan_refuses_what_loading_refuses(tmp_path, family, quantization):
    """A GPT-2 LM in int8-rows (Conv1D blocks; only the tied head's int8 copy would be stored)
    and a Llama whose sizes are no multiples of 32 in int4-groups store no block layer
    quantized: loading refuses them, and the plan did not (it planned the head's copy)."""
    from transformers import LlamaForCausalLM

    from lorakit.quantized.loading import quantize_loaded

    if family == "gpt2":
        model = tiny_models.gpt2()
    else:
        config = tiny_models.llama_config(hidden_size=40, intermediate_size=72)
        model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path)
    with pytest.raises(UserError) as loading:
        quantize_loaded(model, quantization, None)
    with pytest.raises(UserError) as planning:
        plan(str(tmp_path), quantization=quantization)
    assert str(planning.value) == str(loading.value)
    assert f"no layer of this {type(model).__name__} would be stored" in str(planning.value)


@pytest.mark.parametrize("quantization", ["nf4", "int8", "q4_1", "int4-groups"])
def test_fsdp_on_a_quantized_base_is_refused_as_lorakit_train_refuses_it(quantization):
    """``lorakit train --strategy fsdp`` on several processes refuses a quantized base
    (``check_shardable``): the plan prints no per-device figures for it either, and says what
    to do instead. (One process shards nothing: train refuses FSDP there, and so does plan.)"""
    from lorakit.train.fsdp import check_shardable

    with pytest.raises(UserError) as planned:
        plan("llama-2-7b", quantization=quantization, devices=4, strategy="fsdp")
    message = str(planned.value)
    assert message.startswith("--strategy fsdp cannot shard a quantized base yet (")
    assert f"(--quantization {quantization})" in message
    quantized_model = tiny_models.llama()
    quantized_layers.quantize_linears(quantized_model, "bnb-nf4-dq")
    with pytest.raises(UserError) as trained:
        check_shardable(quantized_model)
    # train's sentence around the reason (its reason names a parameter)
    assert message.split("(")[0] == str(trained.value).split("(")[0]
    assert message.split(")", 1)[1] == str(trained.value).split(")", 1)[1]
    # what it advises is planned
    ddp = plan("llama-2-7b", quantization=quantization, devices=4, strategy="ddp")
    assert ddp.per_device_training_bytes == ddp.lora_training_bytes
    with pytest.raises(UserError, match="--strategy fsdp shards across processes"):
        plan("llama-2-7b", quantization=quantization, devices=1, strategy="fsdp")
    assert plan("llama-2-7b", devices=4, strategy="fsdp").per_device_training_bytes > 0


def test_cli_plan_fsdp_on_a_quantized_base_exits_2_with_the_message(capsys):
    code = main(
        ["plan", "llama-2-7b", "--devices", "4", "--strategy", "fsdp", "--quantization", "nf4"]
    )
    assert code == 2
    captured = capsys.readouterr()
    assert "--strategy fsdp cannot shard a quantized base yet (--quantization nf4)" in captured.err
    assert "per device" not in captured.out.lower()
