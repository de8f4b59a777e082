"""``lorakit plan`` on classifiers, review 35: backward's peak and a bfloat16 head copy.

1. A classifier's loss backward is small (N x num_labels), so backward's peak is one block's own
   buffers: the MLP's gradients (a gated MLP: the block output's and its two (N, I)
   intermediates'), or, in bfloat16, a float32 RMSNorm's backward. The plan took what is kept
   plus the loss backward alone: 6% short on a 4-layer Llama classifier, 10-19% on smaller
   ones. ``Plan.block_backward_bytes`` now floors the peak (and the recomputed block's, with
   checkpointing): a real CPU step's peak, measured op by op as ``test_plan_peaks33`` does, is
   reached and not overshot by more than a few %.
2. ``save_adapter`` keeps a bfloat16 model's ``modules_to_save`` copy (the classifier's head) in
   bfloat16, and torch's AdamW keeps its gradient and both states in bfloat16 too: the plan
   counted it at 4 bytes in the file and 16 in training.
"""

from __future__ import annotations

import copy
import warnings

import torch
from transformers import AutoConfig, LlamaForSequenceClassification

import lorakit
from lorakit.plan import plan
from lorakit.plan_report import format_report
from lorakit.train.loop import enable_gradient_checkpointing
from lorakit.train.optim import build_optimizer
from tests.test_plan_peaks33 import SIZES, _LiveStorages, ids

CLASSIFIER = dict(  # the review's repro: 4 layers, I = 3 H
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=2048,
    max_position_embeddings=512,
    pad_token_id=0,
    num_labels=3,
)
SMALL = dict(SIZES, pad_token_id=0)  # 2 layers, H 64, I 128


def classifier_config(sizes: dict):
    config = AutoConfig.for_model("llama", **sizes)
    config.architectures = ["LlamaForSequenceClassification"]
    return config


def planned(tmp_path, sizes: dict, dtype: str, batch: int, seq_len: int):
    classifier_config(sizes).save_pretrained(tmp_path)
    return plan(str(tmp_path / "config.json"), dtype=dtype, batch_size=batch, seq_len=seq_len)


def real_classifier_peak(
    sizes: dict, dtype: torch.dtype, batch: int, seq_len: int, checkpointing: bool = False
) -> int:
    """The most bytes a real training step of the r=16 all-linear Llama classifier holds at once
    beyond its parameters, inputs and the adapter's gradients (``test_plan_peaks33``)."""
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(classifier_config(sizes)).to(dtype)
    config = lorakit.LoraConfig(
        r=16, lora_alpha=32, target_modules="all-linear", task_type="SEQ_CLS"
    )
    lorakit.inject(model, config)
    if checkpointing:
        enable_gradient_checkpointing(model)
    inputs, labels = ids(batch, seq_len), torch.zeros(batch, dtype=torch.long)
    tensors = (*model.parameters(), *model.buffers(), inputs, labels)
    live = _LiveStorages({t.untyped_storage()._cdata for t in tensors})
    model.train()
    with live:
        model(input_ids=inputs, labels=labels).loss.backward()
    gradients = {p.grad.untyped_storage()._cdata for p in model.parameters() if p.grad is not None}
    return live.peak(gradients)


def reaches(planned_bytes: int, real_bytes: int, over: float) -> bool:
    """At least the real peak, and at most ``over`` (a fraction) above it."""
    return real_bytes <= planned_bytes <= (1 + over) * real_bytes


# ---- 1. a classifier's backward peaks in a block ----------------------------------------------
def test_a_float32_classifiers_peak_is_its_last_blocks_mlp_backward(tmp_path):
    """float32, 2 x 128 tokens: kept 20,734,028 (a real forward's, to 12 bytes), a real peak of
    22,027,272; the plan said 20,734,076 (0.94), it now adds N (H + 2 I) 4 = 1,835,008 (the MLP
    backward: the block output's gradient and those of gate and up)."""
    result = planned(tmp_path, CLASSIFIER, "float32", 2, 128)
    activations, peak = result.activations, result.activations_peak_bytes
    real = real_classifier_peak(CLASSIFIER, torch.float32, 2, 128)
    assert reaches(peak, real, 0.03), (peak, real)
    assert activations.peak_bytes < 0.95 * real  # kept + the loss backward alone: short
    assert activations.loss_backward_bytes == 2 * 2 * 3 * 4  # pooled: batch x num_labels
    tokens, hidden, width = 256, 256, 768
    assert result.block_backward_bytes == tokens * (hidden + 2 * width) * 4 == 1_835_008
    assert peak == activations.total_bytes + 1_835_008
    assert result.training_with_activations_bytes == result.lora_training_bytes + peak
    report = format_report(result)
    assert (
        f"      + at backward's peak: {(peak - activations.total_bytes) / 1e6:,.1f} MB "
        "(one block's backward buffers: its MLP's gradients, or a float32 norm's)"
    ) in report


def test_a_bfloat16_classifiers_peak_is_a_float32_norm_backward(tmp_path):
    """bfloat16: transformers' RMSNorm computes in float32, and its backward holds five (N, H)
    float32 tensors at once, more than the MLP's bfloat16 gradients: 5 N H 4."""
    result = planned(tmp_path, SMALL, "bfloat16", 2, 64)
    peak = result.activations_peak_bytes
    real = real_classifier_peak(SMALL, torch.bfloat16, 2, 64)
    assert reaches(peak, real, 0.03), (peak, real)
    assert result.activations.peak_bytes < 0.85 * real  # was 0.81 of it
    tokens, hidden = 128, SMALL["hidden_size"]
    assert result.block_backward_bytes == 5 * tokens * hidden * 4


def test_a_checkpointed_classifier_counts_the_recomputed_blocks_backward(tmp_path):
    """Gradient checkpointing: the block recomputed in backward and its backward's buffers
    together (the plan had the block alone: 0.80 of a real step's peak)."""
    result = planned(tmp_path, CLASSIFIER, "float32", 2, 128)
    checkpointed = result.checkpointed_peak_bytes
    real = real_classifier_peak(CLASSIFIER, torch.float32, 2, 128, checkpointing=True)
    assert reaches(checkpointed, real, 0.05), (checkpointed, real)
    without = result.activations.checkpointed_peak_bytes()  # the recomputed block alone
    assert without < 0.85 * real
    assert checkpointed == without + result.block_backward_bytes


def test_a_causal_lms_peak_stays_its_loss_backward(tmp_path):
    """A causal LM's loss backward (2 N V 4) outweighs a block's buffers: its peak is as it
    was, within 0.1% of a real step (``test_plan_peaks33``)."""
    AutoConfig.for_model("llama", **SIZES).save_pretrained(tmp_path)
    result = plan(str(tmp_path / "config.json"), dtype="float32", batch_size=2, seq_len=32)
    activations = result.activations
    assert 0 < result.block_backward_bytes < activations.loss_backward_bytes
    assert result.activations_peak_bytes == activations.peak_bytes
    assert result.checkpointed_peak_bytes == activations.checkpointed_bytes
    assert "(the loss backward's float32 buffers)" in format_report(result)


# ---- 2. a bfloat16 classifier's head copy ------------------------------------------------------
def bfloat16_classifier(tmp_path):
    """A tiny bfloat16 Llama classifier saved as a base, its plan (r=4, all-linear) and the
    model with that adapter injected (B random, the head copy trained in full)."""
    sizes = dict(SMALL, vocab_size=256, num_labels=2)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(classifier_config(sizes)).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    result = plan(str(tmp_path / "base"), r=4, seq_len=8, dtype="bfloat16")
    config = lorakit.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        task_type="SEQ_CLS",
        base_model_name_or_path=str(tmp_path / "base"),
    )
    lorakit.inject(model, config)
    for parameter in model.parameters():
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter)
    return result, model


def test_a_bfloat16_classifiers_planned_file_is_the_saved_files_size(tmp_path):
    """The adapter in float32, the head copy (2 x 64) in bfloat16: the plan counted the head at
    4 bytes a parameter, 256 bytes over the file ``save_adapter`` writes."""
    result, model = bfloat16_classifier(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = lorakit.save_adapter(model, tmp_path / "adapter")
    real = (saved / "adapter_model.safetensors").stat().st_size
    assert result.adapter_file_bytes["float32"] == real
    assert result.trainable_in_dtype == 2 * 64  # score: num_labels x hidden
    header_float32, _ = result.adapter_header_bytes
    assert real == (result.trainable_parameters - 128) * 4 + 128 * 2 + header_float32
    assert "(its 128 head parameters in bfloat16)" in format_report(result)


def test_a_bfloat16_head_copy_trains_in_bfloat16(tmp_path):
    """lorakit's optimizer (torch's fused AdamW) keeps the bfloat16 head copy's gradient and
    both states in bfloat16: 8 bytes a parameter, the adapter's float32 16; the plan's
    training state is the bytes a real step leaves."""
    result, model = bfloat16_classifier(tmp_path)
    optimizer = build_optimizer(model, 1e-3)
    inputs = ids(2, 8, vocab=200)
    model(input_ids=inputs, labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    state = 0
    for parameter in (p for p in model.parameters() if p.requires_grad):
        moments = optimizer.state[parameter]
        tensors = (parameter, parameter.grad, moments["exp_avg"], moments["exp_avg_sq"])
        state += sum(t.numel() * t.element_size() for t in tensors)
    assert result.lora_trainable_state_bytes == state
    in_float32 = result.trainable_parameters - 128
    assert state == in_float32 * 16 + 128 * 8
    assert f"+ {in_float32:,} trainable x 16 bytes + 128 in bfloat16 x 8 bytes" in (
        format_report(result)
    )


def test_the_planned_header_writes_a_bfloat16_head_copy_as_bf16(tmp_path):
    """The planned header gave every tensor "F32"; the head copy is written "BF16", one byte
    less, and where that moved the JSON across its 8-byte padding the planned file was 8 bytes
    short. The base's path (in the config the header holds) takes 8 lengths in turn, so one of
    them crosses the padding whatever the rest of the header is."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(
        "llama",
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        pad_token_id=0,
        num_labels=2,
    )
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_config(config).to(torch.bfloat16)
    for extra in range(8):
        where = tmp_path / ("base" + "x" * extra)
        base.save_pretrained(where)
        result = plan(str(where), r=4, seq_len=8, dtype="bfloat16")
        model = copy.deepcopy(base)
        lorakit.inject(
            model,
            lorakit.LoraConfig(
                r=4,
                lora_alpha=8,
                target_modules="all-linear",
                task_type="SEQ_CLS",
                base_model_name_or_path=str(where),
            ),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            saved = lorakit.save_adapter(model, tmp_path / f"adapter{extra}")
        real = (saved / "adapter_model.safetensors").stat().st_size
        assert result.adapter_file_bytes["float32"] == real, extra
