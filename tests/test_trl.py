"""lorakit models train under TRL's ``SFTTrainer`` and end as PEFT-format adapters peft loads.

Offline: a tiny random Llama and a tiny BPE tokenizer (tests/tiny_tokenizer.py) saved to a
temporary directory, and an in-memory ``datasets.Dataset``; ``use_cpu``, ``report_to="none"``
and a few steps. The oracle: the same training with the real ``peft`` from the same initial
adapter weights gives the same losses and the same trained adapter.
"""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

import lorakit
from lorakit.io import save_adapter
from lorakit.state import lora_layers
from tests import tiny_models, tiny_tokenizer
from tests.seed_snippets import CONFIG_SNIPPET, adapt, run

SFT_SNIPPET = """
from transformers import TrainingArguments
from trl import SFTTrainer

training_args = TrainingArguments(
    output_dir="./lora-output",
    num_train_epochs=3,
    per_device_train_batch_size=4,
    gradient_accumulation_steps=4,
    learning_rate=2e-4,            # LoRA often uses a higher LR than full fine-tuning
    fp16=True,
    logging_steps=10,
    save_strategy="epoch",
)

trainer = SFTTrainer(
    model=peft_model,
    args=training_args,
    train_dataset=dataset,
)

trainer.train()

# Save only the adapter weights (tiny checkpoint: ~80 MB vs ~14 GB for full model)
peft_model.save_pretrained("./lora-adapter")
"""

CPU_ARGS = 'fp16=False, use_cpu=True, report_to="none", max_steps=2, disable_tqdm=True,'

TEXTS = [
    "Review: a dull, lifeless mess. Sentiment: negative",
    "Review: a warm, funny and moving film. Sentiment: positive",
    "What is the capital of France? The capital of France is Paris.",
    "the quick brown fox jumps over the lazy dog",
] * 4


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny Llama + tokenizer directory, like a hub checkout (no download)."""
    directory = tmp_path_factory.mktemp("tiny-llama-chat")
    tokenizer = tiny_tokenizer.build()
    tiny_models.save_llama_with_tokenizer(directory, tokenizer, pad_token_id=tokenizer.eos_token_id)
    return directory


def dataset() -> Dataset:
    return Dataset.from_list([{"text": text} for text in TEXTS])


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_seed_sft_snippet_trains_the_front_door_model(base_dir, tmp_path):
    paths = {"meta-llama/Llama-2-7b-hf": base_dir}
    config_code = adapt(CONFIG_SNIPPET, "lorakit", paths)
    config_code = config_code.replace("torch.float16", "torch.float32")  # CPU training
    built, _ = run(config_code)
    peft_model = built["peft_model"]
    base_before = {
        k: v.clone() for k, v in peft_model.model.state_dict().items() if "lora" not in k
    }

    adapter_dir = tmp_path / "lora-adapter"
    sft_paths = {"./lora-output": tmp_path / "out", "./lora-adapter": adapter_dir}
    sft_code = adapt(SFT_SNIPPET, "lorakit", sft_paths).replace("fp16=True,", CPU_ARGS)
    trained, _ = run(sft_code, peft_model=peft_model, dataset=dataset())
    assert trained["trainer"].state.global_step == 2
    assert all(
        torch.count_nonzero(layer.lora_B["default"].weight) > 0
        for _, layer in lora_layers(peft_model.model)
    )
    for key, value in peft_model.model.state_dict().items():
        if "lora" not in key:
            assert torch.equal(value, base_before[key]), f"{key} changed: the base is frozen"

    reference = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir
    ).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    expected = logits(reference, ids)
    torch.testing.assert_close(logits(peft_model.eval(), ids), expected, rtol=1e-5, atol=1e-5)
    base_logits = logits(AutoModelForCausalLM.from_pretrained(base_dir), ids)
    assert (expected - base_logits).abs().max() > 1e-6  # training moved the adapter


def sft(model: torch.nn.Module, output_dir: Path) -> SFTTrainer:
    """Four SFT steps at a high learning rate, same seed and data order for every model."""
    args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=1,
        max_length=32,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset())
    trainer.train()
    return trainer


def losses(trainer: SFTTrainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_plain_lorakit_model_trains_like_peft(base_dir, tmp_path):
    """``lorakit.inject`` on the transformers model itself (no wrapper), against peft."""
    fields = dict(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    ours = lorakit.inject(
        AutoModelForCausalLM.from_pretrained(base_dir), lorakit.LoraConfig(**fields)
    )
    theirs = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), peft.LoraConfig(**fields)
    )
    initial = {k: v.clone() for k, v in ours.state_dict().items() if ".lora_" in k}
    theirs.load_state_dict({"base_model.model." + k: v for k, v in initial.items()}, strict=False)

    our_losses, their_losses = (
        losses(sft(ours, tmp_path / "a")),
        losses(sft(theirs, tmp_path / "b")),
    )
    assert len(our_losses) == 4
    assert our_losses == pytest.approx(their_losses, rel=1e-4)
    assert our_losses[-1] < our_losses[0]
    their_state = theirs.state_dict()
    for key, value in ours.state_dict().items():
        if ".lora_" in key:
            assert not torch.equal(value, initial[key]), f"{key} did not train"
            torch.testing.assert_close(
                value, their_state["base_model.model." + key], rtol=1e-3, atol=1e-5
            )

    # After train() the model's forward stays wrapped in the trainer's (bf16) autocast, so the
    # saved adapter is compared on fresh bases: read back by peft and by lorakit.
    save_adapter(ours, tmp_path / "adapter")
    by_peft = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter"
    ).eval()
    by_lorakit = lorakit.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter"
    ).eval()
    saved = dict(by_lorakit.model.state_dict())
    for key, value in ours.state_dict().items():
        if ".lora_" in key:
            assert torch.equal(saved[key], value)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    torch.testing.assert_close(logits(by_lorakit, ids), logits(by_peft, ids), rtol=1e-5, atol=1e-5)
