"""``lorakit.activations``: what a training forward keeps for backward, counted on the meta device,
checked to the byte against a real forward on CPU, and against the Llama formula by hand."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import lorakit
from lorakit.activations import training_activations
from lorakit.cli import main
from lorakit.plan import plan
from lorakit.plan_report import format_report
from tests import tiny_models
from tests.saved_tensors import saved_bytes

BATCH, SEQ_LEN = 2, 24


def real_saved_bytes(model: torch.nn.Module, ids: torch.Tensor, causal: bool) -> int:
    """``saved_bytes`` of a forward on ``ids`` (with the ids as labels for a causal LM)."""
    return (
        saved_bytes(model, input_ids=ids, labels=ids)
        if causal
        else saved_bytes(model, input_ids=ids)
    )


def build(config, dtype: torch.dtype, device: str, targets, dropout: float = 0.0):
    causal = config.model_type != "bert"
    with torch.device(device):
        torch.manual_seed(0)
        model = (AutoModelForCausalLM if causal else AutoModel).from_config(config).to(dtype)
    lorakit.inject(
        model,
        lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=dropout),
    )
    return model, causal


LLAMA_SIZES = dict(tiny_models.DECODER_SIZES, intermediate_size=176, vocab_size=300)
CASES = {
    "llama-bf16-all": ("llama", LLAMA_SIZES, torch.bfloat16, "all-linear"),
    "llama-fp32-qv": ("llama", LLAMA_SIZES, torch.float32, ["q_proj", "v_proj"]),
    "qwen2-bf16-all": ("qwen2", LLAMA_SIZES, torch.bfloat16, "all-linear"),
    "qwen3-fp32-all": ("qwen3", dict(LLAMA_SIZES, head_dim=16), torch.float32, "all-linear"),
    "mistral-bf16-mlp": ("mistral", LLAMA_SIZES, torch.bfloat16, ["gate_proj", "down_proj"]),
    "gpt2-fp32-attn": (
        "gpt2",
        tiny_models.GPT2_SIZES,  # with GPT-2's own dropout (0.1), which CPU runs as it is
        torch.float32,
        ["c_attn", "c_proj"],
    ),
    "bert-fp32-qkv": (
        "bert",
        tiny_models.BERT_SIZES,  # BERT's own dropout (0.1) too
        torch.float32,
        ["query", "key", "value"],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_the_meta_count_is_what_a_real_cpu_step_saves(case):
    model_type, sizes, dtype, targets = CASES[case]
    config = AutoConfig.for_model(model_type, **sizes)
    real, causal = build(config, dtype, "cpu", targets)
    ids = torch.randint(0, 64, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    meta, _ = build(config, dtype, "meta", targets)
    counted = training_activations(meta, batch=BATCH, seq_len=SEQ_LEN)
    assert counted.dropout_mask_bytes == 0
    assert counted.saved_bytes == real_saved_bytes(real, ids, causal)


def llama_config():
    return AutoConfig.for_model("llama", **LLAMA_SIZES)


def test_dropout_masks_are_a_bit_per_adapted_input_element():
    """p = 0.3 keeps packed bits (CPU and CUDA): the count equals a real step with dropout. At
    p = 0.05 CPU keeps int16 steps between the drops, fewer bytes than the bits counted."""
    ids = torch.randint(0, 64, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    meta, _ = build(llama_config(), torch.float32, "meta", "all-linear")
    without = training_activations(meta, batch=BATCH, seq_len=SEQ_LEN)
    counted = training_activations(meta, batch=BATCH, seq_len=SEQ_LEN, dropout=0.3)
    hidden, mlp, layers, tokens = 64, 176, 2, BATCH * SEQ_LEN
    inputs_per_layer = 6 * hidden + mlp  # q, k, v, o, gate, up read H wide; down reads I wide
    assert counted.dropout_mask_bytes == layers * inputs_per_layer * tokens // 8
    assert counted.saved_bytes == without.saved_bytes
    real, _ = build(llama_config(), torch.float32, "cpu", "all-linear", dropout=0.3)
    assert real_saved_bytes(real, ids, True) == counted.total_bytes
    real, _ = build(llama_config(), torch.float32, "cpu", "all-linear", dropout=0.05)
    kept = real_saved_bytes(real, ids, True)
    assert without.total_bytes < kept < counted.total_bytes


def llama_block_bytes(tokens, batch, seq, hidden, mlp, heads, kv_heads, head_dim, rank, b):
    """The module docstring's formula for one Llama block (all-linear LoRA, no dropout)."""
    norms = 2 * tokens * (4 * hidden + 4)
    lora_inputs = tokens * (2 * hidden + mlp) * b + 7 * tokens * rank * b
    attention = tokens * (2 * heads + 2 * kv_heads) * head_dim * b + batch * heads * seq * 4
    return norms + lora_inputs + attention + 3 * tokens * mlp * b


def test_llama_2_7b_activations_are_the_documented_formula():
    batch, seq, hidden, vocab, layers = 2, 1024, 4096, 32000, 32
    tokens = batch * seq
    result = plan("llama-2-7b", r=16, batch_size=batch, seq_len=seq)
    block = llama_block_bytes(tokens, batch, seq, hidden, 11008, 32, 32, 128, 16, 2)
    first_block_norm = tokens * (4 * hidden + 4)  # no gradient flows into the embedding
    once = tokens * (4 * hidden + 4) + 2 * seq * 128 * 2 + tokens * vocab * 4 + tokens * 8 + 4
    # final norm; rotary cos and sin (float16); the loss's float32 log-softmax, labels, loss
    assert result.activations.saved_bytes == layers * block - first_block_norm + once
    # at backward's peak the loss backward's two float32 (N, V) buffers are alive beside it all
    assert result.activations.peak_bytes == result.activations.total_bytes + 2 * tokens * vocab * 4
    assert result.training_with_activations_bytes == (
        result.lora_training_bytes + result.activations.peak_bytes
    )


def test_the_count_leaves_the_model_as_it_was():
    meta, _ = build(llama_config(), torch.float32, "meta", ["q_proj"])
    meta.eval()
    hooks = sum(len(m._forward_pre_hooks) for m in meta.modules())
    training_activations(meta, batch=1, seq_len=8, dropout=0.1)
    assert not any(m.training for m in meta.modules())
    assert sum(len(m._forward_pre_hooks) for m in meta.modules()) == hooks
    with pytest.raises(ValueError, match="batch and seq_len must be >= 1"):
        training_activations(meta, batch=0, seq_len=8)


def test_cli_plan_prints_the_activations_and_takes_the_batch(capsys):
    assert (
        main(
            [
                "plan",
                "smollm2-135m-instruct",
                "--batch-size",
                "4",
                "--seq-len",
                "512",
                "--lora-dropout",
                "0.05",
                "--json",
            ]
        )
        == 0
    )
    numbers = json.loads(capsys.readouterr().out)
    activations = numbers["activations"]
    assert (activations["batch"], activations["seq_len"]) == (4, 512)
    assert activations["dropout_mask_bytes"] > 0
    assert activations["total_bytes"] == (
        activations["saved_bytes"] + activations["dropout_mask_bytes"]
    )
    assert numbers["training_with_activations_bytes"] == (
        numbers["lora_training_bytes"] + activations["peak_bytes"]
    )
    assert main(["plan", "llama-2-7b"]) == 0
    text = capsys.readouterr().out
    assert "activations kept for backward (1 x 2048 tokens, flash attention" in text
    assert "training with activations: 26.1 GB" in text  # 11.4 GB kept + 0.52 GB loss backward
    assert main(["plan", "llama-2-7b", "--batch-size", "0"]) == 2
    assert "--batch-size and --seq-len must be >= 1" in capsys.readouterr().err


def test_a_forward_that_cannot_run_on_meta_is_reported_not_raised(monkeypatch):
    def fails(model, **_):
        raise RuntimeError("Tensor.item() cannot be called on meta tensors")

    monkeypatch.setattr("lorakit.plan.training_activations", fails)
    result = plan("smollm2-135m-instruct")
    assert result.activations is None and result.training_with_activations_bytes is None
    assert "activations: not counted; this model's forward does not run on the meta device " in (
        format_report(result)
    )
    assert "Tensor.item() cannot be called on meta tensors" in format_report(result)


@pytest.mark.parametrize("name", ["bnb-nf4-dq", "bnb-int8", "gguf-Q4_1"])
def test_a_quantized_base_keeps_what_the_float_base_keeps(name):
    """The fused node on a bitsandbytes or GGUF layer saves x, A x (and the mask) as on a float
    one, and never the dequantized weight: the float meta count holds for the quantized base."""
    from tests import quantized_layers

    model = quantized_layers.quantize_linears(tiny_models.llama(), name)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    lorakit.inject(model, config)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_models.llama_config())
    lorakit.inject(meta, config)
    ids = torch.randint(0, 128, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    counted = training_activations(meta, batch=BATCH, seq_len=SEQ_LEN)
    assert real_saved_bytes(model, ids, True) == counted.saved_bytes


CHECKPOINTED = {
    "llama": (LLAMA_SIZES, "all-linear", 64),
    "gpt2": (tiny_models.GPT2_SIZES, ["c_attn", "c_proj"], 64),
    "bert": (tiny_models.BERT_SIZES, ["query", "key", "value"], 64),
}


def real_block_bytes(model, ids, causal: bool) -> tuple[list[int], int, int]:
    """What each block (transformers' checkpointing layers) saves in a real forward whose
    input embeddings require grad (as checkpointing makes them), attributed by forward hooks,
    and what is saved before the first block and after the last."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    per_block, running, seen = [0] * len(blocks), [None], {}
    outside = {"before": 0, "head": 0}
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own and storage.data_ptr() not in seen:
            seen[storage.data_ptr()] = storage
            if running[0] is not None:
                per_block[running[0]] += storage.nbytes()
            else:
                outside["head" if any(per_block) else "before"] += storage.nbytes()
        return tensor

    for index, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda *_, i=index: running.__setitem__(0, i))
        block.register_forward_hook(lambda *_: running.__setitem__(0, None))
    model.enable_input_require_grads()
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids) if causal else model(input_ids=ids)
    return per_block, outside["before"], outside["head"]


@pytest.mark.parametrize("model_type", CHECKPOINTED)
def test_gradient_checkpointing_keeps_the_block_inputs_and_one_block_at_a_time(model_type):
    """With checkpointing, a real forward keeps what lies outside the blocks and each block's
    input (the outer hooks see what the checkpoints store); each block's share, counted on
    meta, is what that block saves in a real forward (recomputed one at a time in backward)."""
    from lorakit.train.loop import enable_gradient_checkpointing

    sizes, targets, hidden = CHECKPOINTED[model_type]
    config = AutoConfig.for_model(model_type, **sizes)
    ids = torch.randint(0, 64, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    meta, causal = build(config, torch.float32, "meta", targets)
    counted = training_activations(meta, batch=BATCH, seq_len=SEQ_LEN)
    assert counted.checkpoint_input_bytes == 2 * BATCH * SEQ_LEN * hidden * 4  # 2 blocks
    real, _ = build(config, torch.float32, "cpu", targets)
    per_block, before, head = real_block_bytes(real, ids, causal)
    assert tuple(per_block) == counted.checkpoint_block_bytes
    assert (before, head) == (counted.checkpoint_before_bytes, counted.checkpoint_head_bytes)
    assert (before > 0) == (model_type != "llama")  # BERT's embedding norm, GPT-2's dropout
    real, _ = build(config, torch.float32, "cpu", targets)
    enable_gradient_checkpointing(real)
    kept = real_saved_bytes(real, ids, causal)
    assert kept == before + head + counted.checkpoint_input_bytes
    # the head's part (with the loss backward's buffers) is freed before the blocks' backward;
    # what came before them is not
    assert counted.checkpointed_bytes == counted.checkpoint_input_bytes + before + max(
        head + counted.loss_backward_bytes, max(counted.checkpoint_block_bytes)
    )


def test_llama_2_7b_qlora_with_checkpointing_in_the_report():
    qlora = plan("llama-2-7b", quantization="nf4", dtype="bfloat16")
    assert qlora.activations.checkpoint_input_bytes == 32 * 2048 * 4096 * 2  # 0.54 GB
    assert "(32 blocks' inputs 0.54 GB + one block recomputed or the head)" in format_report(qlora)
    assert len(plan("minilm-l6").activations.checkpoint_block_bytes) == 6  # not the embeddings


def test_the_report_names_the_attention_path_and_what_comes_before_the_blocks(tmp_path):
    """BERT's attention dropout sends CPU down the math path (the T x T weights are kept): the
    report says so instead of "flash attention"; what its embeddings keep before the first
    block is named and counted in the checkpointed total; a longer --seq-len than its learned
    position table is refused."""
    bert = plan("minilm-l6", seq_len=128)
    activations = bert.activations
    assert activations.attention == "math"
    no_dropout = tmp_path / "config.json"
    fields = json.loads(AutoConfig.for_model("bert", **tiny_models.BERT_SIZES).to_json_string())
    no_dropout.write_text(json.dumps(fields | {"attention_probs_dropout_prob": 0.0}))
    assert plan(str(no_dropout), target_modules=["query"]).activations.attention == "flash"
    report = format_report(bert)
    assert "attention dropout: CPU's math attention keeps the T x T weights" in report
    assert activations.checkpoint_before_bytes > 0  # embedding norm and dropout
    assert re.search(r" [kM]B before the first block \+ one block recomputed or the head", report)
    assert activations.checkpointed_bytes == (
        activations.checkpoint_input_bytes
        + activations.checkpoint_before_bytes
        + max(
            activations.checkpoint_head_bytes + activations.loss_backward_bytes,
            max(activations.checkpoint_block_bytes),
        )
    )
    with pytest.raises(lorakit.errors.UserError, match=r"BertModel's learned position table"):
        plan("minilm-l6", seq_len=513)
    assert plan("smollm2-135m-instruct", seq_len=8193).activations.seq_len == 8193  # rotary


def test_checkpointing_that_saves_nothing_says_so(capsys):
    assert main(["plan", "smollm2-135m-instruct", "--target-modules", "lm_head"]) == 0
    assert "(no saving: checkpointing makes the input embeddings' output require" in (
        capsys.readouterr().out
    )
