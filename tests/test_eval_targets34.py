"""Training review, session 34: evaluation data with no target token (every label -100) used to
report ``eval_loss 0.0`` -- a perfect score that could win a best-checkpoint choice -- while the
same examples as training data were refused. Its mean loss is undefined: it is refused, by
``train`` before the first step and by ``evaluate`` itself."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.errors import UserError
from lorakit.train import TrainingConfig, pad_collate, train
from lorakit.train.losses import evaluate
from tests import tiny_models

_LEARNT = [{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}] * 4
_UNLEARNT = [{"input_ids": [1, 2, 3, 4], "labels": [-100] * 4}] * 3


def _model():
    model = tiny_models.llama()
    lorakit.inject(
        model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    return model


def test_train_refuses_eval_data_without_targets_before_the_first_step(tmp_path):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    config = TrainingConfig(
        output_dir=str(tmp_path / "run"), batch_size=2, max_steps=2, progress=False, plot=False
    )
    with pytest.raises(UserError, match="evaluation data has no target tokens"):
        train(model, _LEARNT, pad_collate(0), config, eval_data=_UNLEARNT)
    after = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_evaluate_refuses_batches_without_targets():
    batches = [pad_collate(0)(_UNLEARNT)]
    with pytest.raises(UserError, match="every label is -100"):
        evaluate(_model(), batches)


def test_eval_data_with_one_target_somewhere_still_evaluates(tmp_path):
    """One learnt example among unlearnt ones is enough; its loss is the mean over its targets."""
    model = _model()
    config = TrainingConfig(
        output_dir=str(tmp_path / "run"), batch_size=2, max_steps=1, progress=False, plot=False
    )
    result = train(model, _LEARNT, pad_collate(0), config, eval_data=_UNLEARNT + _LEARNT[:1])
    alone = evaluate(model, [pad_collate(0)(_LEARNT[:1])])
    assert result.eval_metrics["loss"] == pytest.approx(alone["loss"], rel=1e-6)
    assert result.eval_metrics["loss"] > 0


def test_an_adapter_scaled_by_zero_everywhere_is_refused_before_the_first_step(tmp_path):
    """lora_alpha may be 0, as in PEFT (its files load), but training such an adapter can
    only save one that changes nothing (s B A = 0, zero gradients): refused, as --alpha 0 was
    before any finite alpha was allowed. A negative alpha trains."""
    config = TrainingConfig(
        output_dir=str(tmp_path / "run"), batch_size=2, max_steps=1, progress=False, plot=False
    )
    for alpha in (0.0, -8.0):
        model = tiny_models.llama()
        lorakit.inject(model, lorakit.LoraConfig(r=2, lora_alpha=alpha, target_modules=["q_proj"]))
        if alpha == 0:
            with pytest.raises(UserError, match=r"lora_alpha 0 .* nothing would train"):
                train(model, _LEARNT, pad_collate(0), config)
        else:
            train(model, _LEARNT, pad_collate(0), config)
            assert any(
                float(p.abs().max()) > 0 for n, p in model.named_parameters() if "lora_B" in n
            )


@pytest.mark.parametrize(
    "extra",
    [{"use_dora": True}, {"modules_to_save": ["lm_head"]}, {"trainable_token_indices": [3, 4]}],
    ids=["dora", "saved-head", "token-rows"],
)
def test_an_adapter_scaled_by_zero_that_trains_something_else_trains(tmp_path, extra):
    """lora_alpha 0 zeroes s B A only: DoRA magnitudes, a saved head, token rows still train."""
    model = tiny_models.llama()
    config = lorakit.LoraConfig(r=2, lora_alpha=0.0, target_modules=["q_proj"], **extra)
    lorakit.inject(model, config)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    training = TrainingConfig(
        output_dir=str(tmp_path / "run"), batch_size=2, max_steps=2, progress=False, plot=False
    )
    train(model, _LEARNT, pad_collate(0), training)
    changed = [
        n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])
    ]
    assert changed and not any("lora_A" in n or "lora_B" in n for n in changed)
