"""``lorakit plan``: exact counts on meta-device models, checked against hand arithmetic from the
configs and against the real ``peft`` package on a tiny model that does hold weights."""

from __future__ import annotations

import json

import pytest

from lorakit.cli import main
from lorakit.errors import UserError
from lorakit.plan import plan
from lorakit.plan_report import format_report
from tests import tiny_models

SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama2_7b():
    return plan("llama-2-7b", r=16, lora_alpha=32, target_modules=SEVEN_PROJECTIONS)


def test_llama2_7b_counts_match_the_seed_arithmetic(llama2_7b):
    hidden, mlp, layers, vocab, r = 4096, 11008, 32, 32000, 16
    per_block = 4 * hidden * hidden + 3 * hidden * mlp + 2 * hidden  # attention, MLP, 2 norms
    base = layers * per_block + 2 * vocab * hidden + hidden  # + embed, lm_head, final norm
    # The seed's per-block sum: attention 524,288 + MLP 724,992 = 1,249,280.
    lora_per_block = 4 * r * (hidden + hidden) + 3 * r * (hidden + mlp)
    assert lora_per_block == 1_249_280
    assert llama2_7b.base_parameters == base == 6_738_415_616
    assert llama2_7b.trainable_parameters == layers * lora_per_block == 39_976_960
    assert llama2_7b.total_parameters == 6_778_392_576
    # The seed prints all params 6,778,957,824, which no Llama-2-7B config gives.
    assert llama2_7b.peft_line == (
        "trainable params: 39,976,960 || all params: 6,778,392,576 || trainable%: 0.5898"
    )
    by_type = {group.name: group for group in llama2_7b.module_types}
    assert by_type["q_proj"].lora_parameters == layers * r * (hidden + hidden)
    assert by_type["down_proj"].lora_parameters == layers * r * (mlp + hidden)
    assert by_type["down_proj"].base_parameters == layers * mlp * hidden
    assert {g.modules for g in llama2_7b.module_types} == {32}


def test_llama2_7b_memory_matches_the_seed_reasoning(llama2_7b):
    assert llama2_7b.dtype == "float16"
    assert llama2_7b.full_finetune_bytes == 6_738_415_616 * 16 == 107_814_649_856  # 107.8 GB
    assert llama2_7b.lora_frozen_bytes == 6_738_415_616 * 2  # 13.5 GB (~14 GB in the seed)
    assert llama2_7b.lora_trainable_state_bytes == 39_976_960 * 16 == 639_631_360  # 0.64 GB
    assert llama2_7b.lora_training_bytes == 13_476_831_232 + 639_631_360
    tensors = {"float32": 159_907_840, "bfloat16": 79_953_920}  # 39,976,960 x 4 / x 2 bytes
    header = dict(zip(tensors, llama2_7b.adapter_header_bytes, strict=True))  # config, keys,
    # and a base fingerprint per adapted module
    assert all(224 * 400 < header[dtype] < 224 * 1000 for dtype in tensors)  # 224 modules
    assert llama2_7b.adapter_file_bytes == {d: tensors[d] + header[d] for d in tensors}
    assert llama2_7b.inference_merged_bytes == 13_476_831_232
    report = format_report(llama2_7b)
    for text in ("= 107.8 GB", "= 13.5 GB", "= 0.64 GB", "80.1 MB in bfloat16", "1e9 bytes"):
        assert text in report


def test_llama2_7b_per_device_memory_under_fsdp_and_ddp(capsys):
    """4 devices, FSDP: a quarter of the LoRA training bytes, plus what is gathered whole while
    computing: everything outside the blocks (embeddings, head, final norm) and two blocks."""
    hidden, mlp, layers, vocab, r, devices = 4096, 11008, 32, 32000, 16, 4
    frozen_base = 6_738_415_616 * 2  # float16
    adapter_state = 39_976_960 * 16  # fp32 weight, gradient, AdamW m and v
    block_frozen = 4 * hidden * hidden + 3 * hidden * mlp + 2 * hidden
    block_lora = 4 * r * (hidden + hidden) + 3 * r * (hidden + mlp)
    outside_frozen = 2 * vocab * hidden + hidden
    assert block_frozen * layers + outside_frozen == 6_738_415_616
    sharded = (frozen_base + adapter_state) // devices  # divides exactly here
    gathered = outside_frozen * 2 + 2 * (block_frozen * 2 + block_lora * 4)
    assert (sharded, gathered) == (3_529_115_648, 1_343_823_872)
    fsdp = plan("llama-2-7b", r=16, target_modules=SEVEN_PROJECTIONS, devices=4, strategy="fsdp")
    assert fsdp.largest_block == (block_frozen, block_lora)
    assert fsdp.outside_blocks == (outside_frozen, 0)
    assert fsdp.fsdp_sharded_bytes == sharded and fsdp.fsdp_gathered_bytes == gathered
    assert fsdp.per_device_training_bytes == sharded + gathered == 4_872_939_520  # 4.87 GB
    ddp = plan("llama-2-7b", r=16, target_modules=SEVEN_PROJECTIONS, devices=4)
    assert ddp.per_device_training_bytes == frozen_base + adapter_state  # 14.1 GB each
    assert main(["plan", "llama-2-7b", "--devices", "4", "--strategy", "fsdp"]) == 0
    report = capsys.readouterr().out
    assert "per device (4 devices, FSDP): 14.1 GB / 4 = 3.53 GB" in report
    assert "(outside the blocks + 2 blocks) 1.34 GB = 4.87 GB" in report
    assert main(["plan", "llama-2-7b", "--devices", "0"]) == 2
    assert "--devices must be >= 1" in capsys.readouterr().err


def test_all_linear_equals_the_seven_projections_on_llama(llama2_7b):
    all_linear = plan("llama-2-7b", r=16, num_adapters=3)
    assert all_linear.trainable_parameters == llama2_7b.trainable_parameters
    assert all_linear.config.lora_alpha == 32  # default 2 r
    # the adapters in float32 on the float16 base (layer_wrapping.default_adapter_dtype): 4 bytes each
    assert all_linear.inference_with_adapters_bytes == 13_476_831_232 + 3 * 39_976_960 * 4


def test_smollm2_builtin_counts():
    result = plan("smollm2-135m-instruct", r=8, target_modules=["q_proj", "v_proj"])
    hidden, kv, layers, r = 576, 192, 30, 8
    assert result.base_parameters == 134_515_008  # DATA.md, tied embeddings counted once
    assert result.trainable_parameters == layers * r * ((hidden + hidden) + (hidden + kv))
    assert result.dtype == "float32"  # as load_model loads it; the published config says bf16
    assert result.lora_frozen_bytes == result.frozen_parameters * 4


@pytest.mark.parametrize("as_file", [False, True])
def test_local_config_matches_peft_on_real_weights(tmp_path, as_file):
    import peft

    model = tiny_models.llama()
    model.config.save_pretrained(tmp_path)
    spec = str(tmp_path / "config.json") if as_file else str(tmp_path)
    result = plan(spec, r=4, lora_alpha=8, target_modules="all-linear", dtype="float32")
    reference = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    trainable, total = reference.get_nb_trainable_parameters()
    assert (result.trainable_parameters, result.total_parameters) == (trainable, total)
    assert result.dtype_bytes == 4


def test_unknown_spec_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown model spec 'no-such-model'"):
        plan("no-such-model")
    with pytest.raises(UserError, match="unknown model spec"):
        plan(str(tmp_path))  # a directory without config.json
    with pytest.raises(UserError, match="lora_alpha=nan is invalid"):
        plan("llama-2-7b", lora_alpha=float("nan"))
    with pytest.raises(UserError, match="matched no module of this LlamaForCausalLM"):
        plan("smollm2-135m-instruct", target_modules=["no_such_proj"])


@pytest.mark.parametrize(
    ("contents", "message"),
    [
        (
            '{"model_type": "llama", "hidden_size": -5}',
            "invalid config: The hidden size (-5) is not a multiple of the number of attention heads",
        ),
        (
            '{"model_type": "llama", "vocab_size": -3}',
            "cannot build LlamaForCausalLM from its config: Trying to create tensor with negative "
            "dimension -3",
        ),
        (
            '{"model_type": "llama", "num_hidden_layers": "x"}',
            "invalid config: Field 'num_hidden_layers' expected int, got str",
        ),
        ('[{"model_type": "llama"}]', "holds a JSON list, not an object of settings"),
        ('{"model_type": "nosuch"}', "unknown model_type 'nosuch'"),
        ('{"model_type": "llama",', "cannot read the model config"),
    ],
)
def test_malformed_config_files_are_one_line_errors_naming_the_file(
    tmp_path, capsys, contents, message
):
    path = tmp_path / "config.json"
    path.write_text(contents.replace("}", ', "architectures": ["LlamaForCausalLM"]}', 1))
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(path) in err and message in err, err


def test_cli_json_and_errors(capsys):
    assert main(["plan", "llama-2-7b", "--rank", "16", "--alpha", "32", "--json"]) == 0
    numbers = json.loads(capsys.readouterr().out)
    assert numbers["trainable_parameters"] == 39_976_960
    assert numbers["full_finetune_bytes"] == 107_814_649_856
    assert numbers["config"]["target_modules"] == "all-linear"
    assert main(["plan", "smollm2-135m-instruct", "--target-modules", "q_proj,v_proj"]) == 0
    assert "q_proj" in capsys.readouterr().out
    assert main(["plan", "gpt-17"]) == 2
    assert "unknown model spec 'gpt-17'" in capsys.readouterr().err


def test_packaged_encoder_matches_peft_on_its_real_weights():
    import peft
    from transformers import AutoModel

    from lorakit.models import resolve_model

    result = plan("minilm-l6", r=8, target_modules=["query", "value"])
    assert result.architecture == "BertModel"  # the config's own architecture, no LM head
    real = AutoModel.from_pretrained(resolve_model("minilm-l6"))
    assert result.base_parameters == sum(p.numel() for p in real.parameters())
    reference = peft.get_peft_model(
        real, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])
    )
    trainable, total = reference.get_nb_trainable_parameters()
    assert (result.trainable_parameters, result.total_parameters) == (trainable, total)
    assert trainable == 6 * 2 * 8 * (384 + 384)  # 6 layers, query + value, hidden 384
