"""The same injected model trains under transformers.Trainer (users bring their own trainers)."""

from __future__ import annotations

import torch
from transformers import Trainer, TrainingArguments

from lorakit.train import pad_collate
from tests.train_job import build_model, make_data


def test_transformers_trainer_trains_only_the_adapter(tmp_path):
    model = build_model(dropout=0.0)
    frozen = {k: v.clone() for k, v in model.named_parameters() if not v.requires_grad}
    adapter_before = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
    data = make_data(count=32)
    collate = pad_collate(0)
    batch = collate(data)
    with torch.no_grad():
        loss_before = float(model(**batch).loss)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=25,
        learning_rate=3e-2,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
    trainer.train()
    model.eval()
    with torch.no_grad():
        loss_after = float(model(**batch).loss)
    assert loss_after < loss_before - 0.5
    for name, tensor in model.named_parameters():
        if name in frozen:
            assert torch.equal(tensor, frozen[name]), f"base weight {name} changed"
        else:
            assert not torch.equal(tensor, adapter_before[name]), f"adapter {name} did not train"
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.parameters() if p.requires_grad}
