"""The training loop on tiny random models: schedule values, LoRA+ groups, a reference loop
(HF's own loss + clipping by formula + AdamW), accumulation equivalence, loss going down."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.errors import UserError
from lorakit.state import lora_layers
from lorakit.train import (
    BatchOrder,
    TrainingConfig,
    build_optimizer,
    evaluate,
    exact_match_counts,
    lr_factor,
    pad_collate,
    train,
)
from lorakit.train.schedule import build_scheduler
from tests import tiny_models
from tests.train_job import build_model, make_data


def _adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def _config(tmp_path, **overrides) -> TrainingConfig:
    settings = dict(output_dir=str(tmp_path), progress=False, plot=False, seed=0, lr=1e-2)
    settings.update(overrides)
    return TrainingConfig(**settings)


def test_schedule_warmup_then_cosine_values():
    # W = 2 warmup steps, T = 10: (t+1)/W, then m + (1-m) * (1 + cos(pi (t-W)/(T-W))) / 2
    assert lr_factor(0, 2, 10) == pytest.approx(0.5)
    assert lr_factor(1, 2, 10) == pytest.approx(1.0)
    assert lr_factor(2, 2, 10) == pytest.approx(1.0)
    assert lr_factor(6, 2, 10) == pytest.approx(0.5)
    assert lr_factor(4, 2, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(10, 2, 10, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(8, 2, 10, min_lr_ratio=0.1) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 6 / 8))
    )


def test_scheduler_drives_every_group_with_its_own_base_lr():
    model = build_model(dropout=0.0)
    optimizer = build_optimizer(model, lr=1e-3, loraplus_ratio=16.0)
    scheduler = build_scheduler(optimizer, total_steps=10, warmup_steps=2)
    seen = []
    for _ in range(10):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    for step, (lr_a, lr_b) in enumerate(seen):
        assert lr_a == pytest.approx(1e-3 * lr_factor(step, 2, 10))
        assert lr_b == pytest.approx(16e-3 * lr_factor(step, 2, 10))


def test_loraplus_groups_hold_exactly_the_B_matrices():
    model = build_model(dropout=0.0)
    optimizer = build_optimizer(model, lr=2e-4, loraplus_ratio=8.0)
    group_a, group_b = optimizer.param_groups
    b_ids = {id(layer.lora_B["default"].weight) for _, layer in lora_layers(model)}
    a_ids = {id(layer.lora_A["default"].weight) for _, layer in lora_layers(model)}
    assert {id(p) for p in group_b["params"]} == b_ids
    assert {id(p) for p in group_a["params"]} == a_ids
    assert group_b["lr"] == pytest.approx(8.0 * group_a["lr"])
    assert len(b_ids) == 6  # 2 layers x (q_proj, v_proj, down_proj)
    plain = build_optimizer(model, lr=2e-4)
    assert len(plain.param_groups) == 1 and len(plain.param_groups[0]["params"]) == 12


def test_optimizer_is_fused_on_cpu_and_steps_like_the_for_loop_adamw():
    """The fused AdamW kernel (one call for all adapter tensors, issue 16) gives the for-loop
    AdamW's update: same parameters after three steps with weight decay (1e-6 relative)."""
    model = build_model(dropout=0.0)
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1, loraplus_ratio=4.0)
    assert all(group["fused"] for group in optimizer.param_groups)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    copies = [p.detach().clone().requires_grad_() for p in params]
    reference = torch.optim.AdamW(
        [
            {"params": copies[: len(optimizer.param_groups[0]["params"])], "lr": 1e-2},
            {"params": copies[len(optimizer.param_groups[0]["params"]) :], "lr": 4e-2},
        ],
        weight_decay=0.1,
        foreach=False,
    )
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        for p, c in zip(params, copies, strict=True):
            p.grad = torch.randn(p.shape, generator=generator)
            c.grad = p.grad.clone()
        optimizer.step()
        reference.step()
    for p, c in zip(params, copies, strict=True):
        assert not torch.equal(p, torch.zeros_like(p))
        torch.testing.assert_close(p, c, rtol=1e-6, atol=1e-7)


def test_loop_matches_reference_with_hf_loss_clipping_and_adamw(tmp_path):
    """Two steps of our loop == a plain reference: HF's mean loss, gradient clipped by formula
    g * c / ||g||, AdamW, the schedule; clipping is active (tiny max norm)."""
    data = make_data(count=8)
    ours, reference = build_model(0.0), build_model(0.0)
    tiny_models.randomize_adapters(ours)
    tiny_models.randomize_adapters(reference)
    config = _config(tmp_path, max_steps=2, batch_size=4, warmup_steps=1, max_grad_norm=0.01)
    result = train(ours, data, pad_collate(0), config)
    plan = BatchOrder(len(data), 4, seed=0, lengths=tuple(len(e["input_ids"]) for e in data))
    params = [p for p in reference.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    logged_norms = [r["grad_norm"] for r in _records(result.metrics_path)]
    reference.train()
    for step in range(2):
        batch = pad_collate(0)([data[i] for i in plan.step_indices(step)])
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 * lr_factor(step, 1, 2)
        reference(**batch).loss.backward()  # HF: mean over shifted target tokens
        norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))
        assert logged_norms[step] == pytest.approx(float(norm), rel=1e-5)
        assert float(norm) > 0.01  # so clipping really acts
        for p in params:
            p.grad.mul_(0.01 / (float(norm) + 1e-6))
        optimizer.step()
        optimizer.zero_grad()
    for name, tensor in _adapter_tensors(reference).items():
        torch.testing.assert_close(dict(ours.named_parameters())[name], tensor, atol=1e-6, rtol=0)


def _records(path):
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


def test_accumulation_2x2_equals_batch_4(tmp_path):
    """Same update from one batch of 4 and from 2 accumulated micro-batches of 2. Examples have
    1-6 target tokens, so this needs the per-step token normalisation (a mean per micro-batch,
    transformers' before 4.46, fails it). (Adam divides by
    sqrt(v): float32 rounding differences in near-zero gradients grow with lr, hence lr 1e-3.)"""
    data = make_data(count=16, uneven_answers=True)
    assert len({sum(label != -100 for label in e["labels"]) for e in data}) >= 4
    big, accumulated, start = build_model(0.0), build_model(0.0), build_model(0.0)
    for model in (big, accumulated, start):
        tiny_models.randomize_adapters(model)
    train(big, data, pad_collate(0), _config(tmp_path / "a", max_steps=4, batch_size=4, lr=1e-3))
    config = _config(tmp_path / "b", max_steps=4, batch_size=2, grad_accum=2, lr=1e-3)
    train(accumulated, data, pad_collate(0), config)
    big_tensors = _adapter_tensors(big)
    for name, tensor in _adapter_tensors(accumulated).items():
        assert (tensor - dict(start.named_parameters())[name]).abs().max() > 1e-4
        torch.testing.assert_close(tensor, big_tensors[name], atol=1e-6, rtol=0)


def test_loss_goes_down_and_only_the_adapter_changes(tmp_path):
    model = build_model(dropout=0.0)
    base_before = {k: v.clone() for k, v in model.named_parameters() if not v.requires_grad}
    config = _config(tmp_path, max_steps=60, batch_size=8, lr=5e-2, plot=True)
    held_out = make_data(count=64, seed=99)
    before = evaluate(model, [pad_collate(0)(held_out)])
    result = train(model, make_data(count=64), pad_collate(0), config, eval_data=held_out)
    losses = [r["loss"] for r in _records(result.metrics_path) if "loss" in r]
    assert len(losses) == 60
    # The frozen random lm_head (std 0.02, hidden 64) caps the logit margin, so the loss
    # plateaus near 3.7 from ln(128) = 4.85; the argmax answers become right (held-out accuracy
    # 0.97-1.0 over training seeds 0-5 with these settings).
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5
    assert before["accuracy"] == 0.0 and result.eval_metrics["accuracy"] >= 0.7
    assert result.eval_metrics["loss"] < before["loss"] - 0.5
    for name, tensor in model.named_parameters():
        if name in base_before:
            assert torch.equal(tensor, base_before[name]), name
    assert result.loss_curve is not None and result.loss_curve.read_bytes()[:4] == b"\x89PNG"


def test_gradient_checkpointing_gives_the_same_update(tmp_path):
    data = make_data(count=8)
    plain, checkpointed = build_model(0.0), build_model(0.0)
    train(plain, data, pad_collate(0), _config(tmp_path / "a", max_steps=2, batch_size=4))
    config = _config(tmp_path / "b", max_steps=2, batch_size=4, gradient_checkpointing=True)
    train(checkpointed, data, pad_collate(0), config)
    assert checkpointed.model.gradient_checkpointing
    for name, tensor in _adapter_tensors(plain).items():
        torch.testing.assert_close(
            dict(checkpointed.named_parameters())[name], tensor, atol=1e-6, rtol=0
        )


def test_exact_match_accuracy_counts_examples():
    vocab = 5
    logits = torch.full((2, 4, vocab), -1.0)
    # row 0 predicts token 3 at positions 1 and 2 -> targets at positions 2, 3 are [3, 3]: right
    logits[0, 1, 3] = logits[0, 2, 3] = 1.0
    # row 1 predicts 3 then 4, targets [3, 3]: wrong
    logits[1, 1, 3] = logits[1, 2, 4] = 1.0
    labels = torch.tensor([[-100, -100, 3, 3], [-100, -100, 3, 3]])
    assert exact_match_counts(logits, {"labels": labels}) == {"accuracy": (1.0, 2)}
    classes = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert exact_match_counts(classes, {"labels": torch.tensor([1, 1, 1])}) == {
        "accuracy": (2.0, 3)
    }


def test_bad_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="batch_size"):
        TrainingConfig(batch_size=0)
    with pytest.raises(UserError, match="loraplus_ratio"):
        TrainingConfig(loraplus_ratio=-1.0)
    model = tiny_models.llama()
    with pytest.raises(UserError, match="no trainable parameters"):
        for p in model.parameters():
            p.requires_grad_(False)
        train(model, make_data(4), pad_collate(0), _config(tmp_path, max_steps=1))


def test_loss_on_target_columns_only_equals_the_full_loss():
    from lorakit.train.losses import batch_loss_sum, logits_loss_sum

    model = build_model(0.0)
    tiny_models.randomize_adapters(model)
    batch = pad_collate(0)(make_data(count=6))
    loss, logits, _ = batch_loss_sum(model, batch)
    assert logits.shape[1] < batch["input_ids"].shape[1]  # the column path was taken
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = logits_loss_sum(full, batch["labels"])
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-6)
    hf_mean = model(**batch).loss  # HF's mean over the shifted targets
    count = int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(loss / count, hf_mean, atol=1e-6, rtol=1e-6)


def test_the_loop_trains_a_sequence_classifier_with_class_labels(tmp_path):
    """labels of shape (B,) (class ids): the logged loss of the first step is the mean
    cross-entropy of the untrained classifier on that batch (computed here by hand), and LoRA on
    query/value plus a trained copy of the head learns a marker-token rule."""
    import lorakit

    generator = torch.Generator().manual_seed(0)
    examples = []
    for index in range(48):
        label = index % 2
        tokens = torch.randint(
            10, 128, (int(torch.randint(4, 10, (1,), generator=generator)),), generator=generator
        ).tolist()
        examples.append({"input_ids": [1 + label, *tokens], "label": label})

    def collate(items):
        batch = pad_collate(0)(items)
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "labels": torch.tensor([item["label"] for item in items]),
        }

    model = tiny_models.bert()
    torch.manual_seed(1)
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    lorakit.inject(model, config)
    lengths = tuple(len(example["input_ids"]) for example in examples)
    first_step = BatchOrder(48, 8, seed=0, lengths=lengths).step_indices(0)
    first_batch = collate([examples[i] for i in first_step])
    with torch.no_grad():
        inputs = {key: first_batch[key] for key in ("input_ids", "attention_mask")}
        logits = model.eval()(**inputs).logits.double()  # (8, 2), dropout off
    expected_first = float(torch.nn.functional.cross_entropy(logits, first_batch["labels"]))
    config = _config(tmp_path, max_steps=30, batch_size=8)
    result = train(model, examples, collate, config, eval_data=examples)
    records = [r for r in _records(result.metrics_path) if "loss" in r]
    assert records[0]["loss"] == pytest.approx(expected_first, rel=1e-5)
    chance = math.log(2)  # per example; measured 0.22 after 30 steps
    assert result.eval_metrics["accuracy"] == 1.0 and result.eval_metrics["loss"] < 0.5 * chance


def _loss_and_accuracy_by_hand(model, examples) -> tuple[float, float]:
    """HF's mean loss over all answer tokens (one padded batch), and the share of examples
    whose every answer token is the argmax of the full-sequence logits (one at a time)."""
    model.eval()
    with torch.no_grad():
        loss = float(model(**pad_collate(0)(examples)).loss)
        right = 0
        for example in examples:
            logits = model(torch.tensor([example["input_ids"]])).logits[0]
            predicted = logits[:-1].argmax(-1).tolist()
            targets = example["labels"][1:]
            right += all(p == t for p, t in zip(predicted, targets, strict=True) if t != -100)
    return loss, right / len(examples)


def test_periodic_evaluation_records_loss_and_accuracy_at_its_steps(tmp_path):
    """eval_every=2 over 5 steps: eval records at steps 2 and 4 and a final one at 5, each
    equal to the loss/accuracy of that step's weights (read back from the step's checkpoint
    adapter, or the final model) computed by hand."""
    from lorakit.io import load_adapter

    held_out = make_data(count=12, seed=99)
    model = build_model(0.0)
    config = _config(
        tmp_path,
        max_steps=5,
        batch_size=8,
        lr=5e-2,
        eval_every=2,
        checkpoint_every=2,
        keep_checkpoints=3,
    )
    result = train(model, make_data(count=32), pad_collate(0), config, eval_data=held_out)
    evals = [r for r in _records(result.metrics_path) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 5]
    for record in evals:
        if record["step"] == 5:
            weights = model
        else:
            step_dir = tmp_path / "checkpoints" / f"step-{record['step']:08d}" / "adapter"
            weights = load_adapter(tiny_models.llama(), step_dir)
        loss, accuracy = _loss_and_accuracy_by_hand(weights, held_out)
        assert record["eval_loss"] == pytest.approx(loss, rel=1e-5)
        assert record["eval_accuracy"] == accuracy
    assert len({round(r["eval_loss"], 4) for r in evals}) == 3  # the weights really changed
    assert result.eval_metrics == {
        "loss": evals[-1]["eval_loss"],
        "accuracy": evals[-1]["eval_accuracy"],
    }


def test_progress_bar_shows_each_steps_loss_lr_and_tokens_per_second(tmp_path, capsys):
    """The bar's postfix after every step carries that step's logged loss, lr and tokens/s."""
    import re

    config = _config(tmp_path, max_steps=3, batch_size=4, progress=True)
    result = train(build_model(0.0), make_data(count=12), pad_collate(0), config)
    err = capsys.readouterr().err
    records = [r for r in _records(result.metrics_path) if "loss" in r]
    shown = re.findall(r"(\d)/3 \[[^\]]*loss=([\d.]+), lr=([\d.e+-]+), tok_s=(\d+)\]", err)
    last_of_step = {int(step): values for step, *values in shown}
    assert sorted(last_of_step) == [1, 2, 3]
    for record in records:
        loss, lr, tokens_per_s = last_of_step[record["step"]]
        assert loss == f"{record['loss']:.4f}" and lr == f"{record['lr']:.2e}"
        assert tokens_per_s == f"{record['tokens_per_s']:.0f}" and float(tokens_per_s) > 0
    assert "train: 100%" in err
