"""Review 35 of the PEFT front door (``lorakit.get_peft_model``) under transformers' ``Trainer``,
with the real peft as the oracle: a model already gradient-checkpointing when it is wrapped
(reentrant checkpointing passes the LoRA tensors of a block no gradient unless the block's input
requires grad), and ``label_smoothing_factor`` (``Trainer`` shifts the labels only when the
model's ``_get_name()`` is a causal-LM class's)."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

from lorakit import LoraConfig, get_peft_model
from tests import tiny_models
from tests.peft_pairs import copy_into_peft

VIT_FIELDS = dict(
    r=4,
    lora_alpha=8,
    lora_dropout=0.0,
    target_modules=["q_proj", "v_proj"],
    modules_to_save=["classifier"],
)
LLAMA_FIELDS = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def _vit(reentrant: bool | None) -> ViTForImageClassification:
    """A tiny ViT classifier (main input ``pixel_values``); checkpointing on with ``reentrant``
    (None: off) before it is wrapped."""
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        image_size=16,
        patch_size=8,
        num_channels=3,
        num_labels=3,
    )
    model = ViTForImageClassification(config)
    if reentrant is not None:
        model.gradient_checkpointing_enable({"use_reentrant": reentrant})
    return model


def _vit_pair(reentrant: bool | None):
    """lorakit's and peft's front door on the same ViT, with the same non-zero LoRA factors."""
    ours = get_peft_model(_vit(reentrant), LoraConfig(**VIT_FIELDS))
    tiny_models.randomize_adapters(ours.model, std=0.1)
    theirs = peft.get_peft_model(_vit(reentrant), peft.LoraConfig(**VIT_FIELDS))
    copy_into_peft(ours, theirs)
    return ours, theirs


def _lora(ours, theirs, read) -> tuple[dict, dict]:
    """``read(parameter)`` of every LoRA tensor of each model, under lorakit's names."""
    mine = {k: read(p) for k, p in ours.model.named_parameters() if "lora_" in k}
    prefix = "base_model.model."
    other = {k.removeprefix(prefix): read(p) for k, p in theirs.named_parameters() if "lora_" in k}
    assert set(mine) == set(other) and mine
    return mine, other


def _pixels() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 16, 16, generator=generator), torch.tensor([0, 1, 2, 0])


# ---------------------------------------------------------------- 1. checkpointing before wrapping
@pytest.mark.parametrize("reentrant", [True, False])
def test_vit_checkpointing_before_wrapping_gives_the_lora_tensors_peft_gradients(reentrant):
    """Reentrant: every LoRA tensor gets peft's gradient (before the fix: none got any, and
    only the classifier copy trained)."""
    ours, theirs = _vit_pair(reentrant)
    pixels, labels = _pixels()
    for model in (ours, theirs):
        model.train()
        model(pixel_values=pixels, labels=labels).loss.backward()
    mine, peft_grads = _lora(ours, theirs, lambda p: p.grad)
    assert len(mine) == 8
    for key, grad in mine.items():
        assert grad is not None, f"{key} got no gradient"
        assert grad.abs().max() > 0, key
        torch.testing.assert_close(grad, peft_grads[key], rtol=1e-5, atol=1e-7)


def test_vit_checkpointing_before_wrapping_trains_under_trainer_as_peft(tmp_path):
    """``Trainer(gradient_checkpointing=True, use_reentrant=True)`` on a ViT that was already
    checkpointing when wrapped: peft's losses step by step, and the same trained LoRA tensors."""
    generator = torch.Generator().manual_seed(1)
    rows = [
        {"pixel_values": torch.randn(3, 16, 16, generator=generator), "labels": i % 3}
        for i in range(16)
    ]

    def collate(batch):
        return {
            "pixel_values": torch.stack([row["pixel_values"] for row in batch]),
            "labels": torch.tensor([row["labels"] for row in batch]),
        }

    ours, theirs = _vit_pair(reentrant=True)
    initial, _ = _lora(ours, theirs, lambda p: p.detach().clone())
    losses = {}
    for name, model in (("ours", ours), ("theirs", theirs)):
        args = _args(
            tmp_path / name,
            remove_unused_columns=False,
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": True},
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
        trainer.train()
        losses[name] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses["ours"]) == 4
    assert losses["ours"] == pytest.approx(losses["theirs"], rel=1e-5)
    mine, peft_final = _lora(ours, theirs, lambda p: p.detach())
    for key, tensor in mine.items():
        assert not torch.equal(tensor, initial[key]), f"{key} did not train"
        torch.testing.assert_close(tensor, peft_final[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reentrant", [None, True])
def test_input_embeddings_output_requires_grad_only_where_checkpointing_as_peft(reentrant):
    """As PEFT's ``PeftModel``: the hook is added only to a model already checkpointing."""
    seen = {}
    for name, model in zip(("ours", "theirs"), _vit_pair(reentrant), strict=True):
        embeddings = model.get_base_model().get_input_embeddings()
        handle = embeddings.register_forward_hook(
            lambda _, __, output, name=name: seen.__setitem__(name, output.requires_grad)
        )
        model(pixel_values=_pixels()[0])
        handle.remove()
    assert seen == {"ours": reentrant is not None, "theirs": reentrant is not None}


def test_llama_checkpointing_before_wrapping_keeps_one_set_of_hooks():
    """transformers hooked a Llama's embeddings when checkpointing was turned on; wrapping adds
    no second set, so ``disable_input_require_grads()`` still takes the hook away."""
    model = tiny_models.llama()
    model.gradient_checkpointing_enable({"use_reentrant": True})
    hooks = list(model._require_grads_hooks)
    ours = get_peft_model(model, LoraConfig(**LLAMA_FIELDS))
    assert model._require_grads_hooks == hooks
    ours.disable_input_require_grads()
    seen = []
    embeddings = model.get_input_embeddings()
    embeddings.register_forward_hook(lambda _, __, output: seen.append(output.requires_grad))
    ours(input_ids=tiny_models.input_ids())
    assert seen == [False]


class _Checkpointed(nn.Module):
    """Not a transformers model: no ``is_gradient_checkpointing``, a ``get_input_embeddings``,
    and a reentrant-checkpointed block (PEFT adds its hook to such a module)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh())

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, self.embed(ids), use_reentrant=True).square().mean()


def test_module_without_transformers_gets_peft_gradients_through_a_reentrant_block():
    fields = dict(r=2, lora_alpha=4, target_modules=["block.0"], init_lora_weights=False)
    ours = get_peft_model(_Checkpointed(), LoraConfig(**fields))
    theirs = peft.get_peft_model(_Checkpointed(), peft.LoraConfig(**fields))
    copy_into_peft(ours, theirs)
    ids = torch.arange(6).reshape(2, 3)
    for model in (ours, theirs):
        model(ids).backward()
    mine, peft_grads = _lora(ours, theirs, lambda p: p.grad)
    for key, grad in mine.items():
        assert grad is not None, f"{key} got no gradient"
        torch.testing.assert_close(grad, peft_grads[key], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- 2. label smoothing
def _args(directory, **overrides) -> TrainingArguments:
    arguments = dict(
        output_dir=str(directory),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        save_strategy="no",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return TrainingArguments(**(arguments | overrides))


def _padded_rows(count: int = 16, length: int = 8) -> list[dict]:
    """Token rows of 3 to 8 tokens, padded to ``length`` (labels -100 on the padding)."""
    generator = torch.Generator().manual_seed(5)
    rows = []
    for i in range(count):
        n = 3 + (i * 5) % 6
        ids = torch.randint(3, 128, (n,), generator=generator).tolist()
        pad = length - n
        rows.append(
            {
                "input_ids": ids + [0] * pad,
                "labels": ids + [-100] * pad,
                "attention_mask": [1] * n + [0] * pad,
            }
        )
    return rows


def _collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.tensor([row[key] for row in rows]) for key in rows[0]}


def test_label_smoothing_losses_equal_peft_step_by_step(tmp_path):
    """``Trainer.compute_loss`` shifts the labels for a causal LM by ``_get_name()``; the front
    door answers the model's name (before the fix, ``PeftModelForLlamaForCausalLM``: every
    position was scored against its own token, 6.3 where peft has 4.8)."""
    ours = get_peft_model(tiny_models.llama(), LoraConfig(**LLAMA_FIELDS))
    tiny_models.randomize_adapters(ours.model, std=0.05)
    theirs = peft.get_peft_model(tiny_models.llama(), peft.LoraConfig(**LLAMA_FIELDS))
    copy_into_peft(ours, theirs)
    rows = _padded_rows()
    losses, eval_losses = {}, {}
    for name, model in (("ours", ours), ("theirs", theirs)):
        args = _args(tmp_path / name, label_smoothing_factor=0.1)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=_collate)
        trainer.train()
        losses[name] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        eval_losses[name] = trainer.evaluate(rows[:8])["eval_loss"]
    assert len(losses["ours"]) == 4
    assert losses["ours"] == pytest.approx(losses["theirs"], rel=1e-5)
    assert eval_losses["ours"] == pytest.approx(eval_losses["theirs"], rel=1e-5)
    mine, peft_final = _lora(ours, theirs, lambda p: p.detach())
    for key, tensor in mine.items():
        torch.testing.assert_close(tensor, peft_final[key], rtol=1e-4, atol=1e-6)


def test_name_is_the_models_and_repr_still_shows_the_wrapper():
    ours = get_peft_model(tiny_models.llama(), LoraConfig(**LLAMA_FIELDS))
    assert ours._get_name() == "LlamaForCausalLM"
    assert repr(ours).startswith("PeftModelForLlamaForCausalLM(\n  (model): LlamaForCausalLM(\n")
    assert repr(ours).removeprefix("PeftModelFor") == nn.Module.__repr__(ours)
