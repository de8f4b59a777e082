"""Review fixes to ``lorakit plan`` (second round), each checked against what lorakit really
does: ``lorakit train``'s refusal of one-process FSDP, the dtype ``load_model`` gives a built-in
model, the bytes of a real ``save_adapter`` file, and the layer a GGUF format cannot store."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

import lorakit
from lorakit.cli import main
from lorakit.errors import UserError
from lorakit.io import save_adapter
from lorakit.meta_model import BUILTIN_CONFIGS
from lorakit.plan import plan
from tests import tiny_models

# 1. FSDP on one device: refused, as lorakit train refuses it


def test_fsdp_on_one_device_is_refused_as_lorakit_train_refuses_it(monkeypatch):
    from lorakit.train.distributed import check_strategy

    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(UserError, match="--strategy fsdp shards the model across processes"):
        check_strategy("fsdp")  # what train says
    with pytest.raises(UserError) as planned:
        plan("llama-2-7b", devices=1, strategy="fsdp")
    message = str(planned.value)
    assert message.startswith("--strategy fsdp shards across processes (got --devices 1)")
    assert "give --devices 2 or more, or drop --strategy fsdp to plan one process" in message
    two = plan("llama-2-7b", devices=2, strategy="fsdp")  # what it advises is planned
    assert two.per_device_training_bytes == (
        -(-two.lora_training_bytes // 2) + two.fsdp_gathered_bytes
    )


def test_cli_plan_fsdp_on_one_device_exits_2_without_a_plan(capsys):
    assert main(["plan", "llama-2-7b", "--devices", "1", "--strategy", "fsdp"]) == 2
    captured = capsys.readouterr()
    assert "--strategy fsdp shards across processes" in captured.err
    assert "per device" not in captured.out


# 2. A lorakit built-in model is planned in the dtype load_model gives it


@pytest.mark.slow  # converts and loads the tiny stand-in built-in model
def test_a_builtin_model_is_planned_in_the_dtype_load_model_gives_it(tiny_builtin_model):
    from lorakit.models import load_model

    model, _ = load_model("smollm2-135m-instruct", progress=False)  # (tiny, converted)
    loaded = str(next(model.parameters()).dtype).removeprefix("torch.")
    assert loaded == "float32"
    planned = plan("smollm2-135m-instruct", seq_len=8)  # the built-in config says bfloat16
    assert planned.dtype == loaded
    assert planned.dtype_bytes == 4
    assert planned.base_bytes == planned.base_parameters * 4
    assert plan("smollm2-135m-instruct", dtype="bfloat16", seq_len=8).dtype == "bfloat16"
    assert plan("llama-2-7b", seq_len=8).dtype == "float16"  # a config name only: its dtype


def test_a_builtin_model_plans_as_its_float32_directory(tmp_path):
    """The name and a directory holding the same config saved as float32 (what lorakit
    loads) give the same plan (but for the adapter file's header, which names the model)."""
    values = dict(BUILTIN_CONFIGS["smollm2-135m-instruct"]) | {"torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(values))
    by_directory = plan(str(tmp_path), seq_len=16, batch_size=2).to_dict()
    by_name = plan("smollm2-135m-instruct", seq_len=16, batch_size=2).to_dict()
    assert by_name["dtype"] == "float32"
    assert by_name["base_bytes"] == by_name["base_parameters"] * 4  # (bfloat16's 2 before)
    for differs in ("model", "adapter_header_bytes", "adapter_file_bytes"):
        del by_name[differs], by_directory[differs]
    assert by_name == by_directory


# 3. The adapter file's size counts its header (the base fingerprint, the config, the keys)


@pytest.mark.parametrize("rank", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_planned_adapter_file_is_the_size_of_a_real_save(tmp_path, rank, dtype):
    base = tmp_path / "base"
    tiny_models.llama().save_pretrained(base)
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = lorakit.LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules="all-linear", base_model_name_or_path=str(base)
    )
    lorakit.inject(model, config)
    tiny_models.randomize_adapters(model)  # B != 0
    saved = save_adapter(model, tmp_path / "adapter", dtype=dtype)
    real = (saved / "adapter_model.safetensors").stat().st_size
    planned = plan(str(base), r=rank, seq_len=8).adapter_file_bytes[str(dtype)[6:]]
    assert abs(planned - real) <= 0.02 * real
    trainable = lorakit.count_parameters(model).trainable
    tensor_bytes = trainable * dtype.itemsize
    assert real - tensor_bytes > 0.02 * real  # the header: what the old plan left out at r=1
    assert planned - tensor_bytes >= 0.98 * (real - tensor_bytes)


def test_the_adapter_header_is_counted_per_adapted_module():
    """SmolLM2's 210 adapted modules: ~470 bytes of fingerprint each, far more than a few KB."""
    seven = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    planned = plan("smollm2-135m-instruct", r=1, target_modules=seven, seq_len=8)
    header_float32, _ = planned.adapter_header_bytes
    assert header_float32 > 210 * 470
    assert planned.adapter_file_bytes["float32"] == planned.trainable_parameters * 4 + (
        header_float32
    )


# 4. A GGUF format that cannot store a layer names it and the formats that can


def test_a_gguf_row_of_partial_blocks_names_the_layer_and_the_way_out(tmp_path):
    values = tiny_models.llama_config(intermediate_size=80, vocab_size=100).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(UserError) as error:
        plan(str(tmp_path), quantization="q4_0")
    message = str(error.value)
    assert "layer model.layers.0.mlp.down_proj has in_features=80" in message
    assert "choose nf4, fp4, int8, int8-rows or int4-groups" in message
    assert plan(str(tmp_path), quantization="int8-rows", seq_len=8).base_bytes > 0


# 5. A negative number of adapters


def test_a_negative_num_adapters_is_refused_by_the_python_api():
    with pytest.raises(UserError, match=r"num_adapters \(--adapters\) must be >= 0.*got -1"):
        plan("llama-2-7b", num_adapters=-1)
    zero = plan("llama-2-7b", num_adapters=0, seq_len=8)
    assert zero.inference_with_adapters_bytes == zero.base_bytes
