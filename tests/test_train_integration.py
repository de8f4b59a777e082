"""One integration test on the real packaged SmolLM2-135M-Instruct: two training steps, save,
reload into a fresh model, generate."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit import data
from lorakit.train import TrainingConfig, train

pytestmark = pytest.mark.integration


def test_smollm2_trains_two_steps_saves_reloads_and_generates(tmp_path):
    from lorakit.commands.generate import generate_text
    from lorakit.io import load_adapter
    from lorakit.models import load_model

    model, tokenizer = load_model("smollm2-135m-instruct")
    examples = data.load_examples("rotten-tomatoes", "train", style="plain")[:8]
    tokenized = data.tokenize_examples(examples, tokenizer, max_length=64)
    torch.manual_seed(0)
    lorakit.inject(
        model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    config = TrainingConfig(
        output_dir=str(tmp_path), max_steps=2, batch_size=4, lr=1e-3, progress=False, plot=False
    )
    result = train(model, range(len(tokenized)), lambda i: data.collate(tokenized, i), config)
    assert result.steps == 2 and result.final_loss is not None and result.final_loss > 0
    trained = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" in k}
    assert len(trained) == 2 * 2 * 30  # A and B of q_proj and v_proj in 30 layers
    b_factors = [v for k, v in trained.items() if ".lora_B." in k]
    assert all(v.abs().max() > 0 for v in b_factors)  # every B moved away from its zero init

    fresh, _ = load_model("smollm2-135m-instruct")
    load_adapter(fresh, result.adapter_dir)
    reloaded = fresh.state_dict()
    for key, tensor in trained.items():  # A and B, bit for bit
        assert torch.equal(reloaded[key], tensor), key
    prompt = "What is the capital of France?"
    text = generate_text(fresh.eval(), tokenizer, prompt, max_new_tokens=12)
    assert "Paris" in text
    assert text == generate_text(model.eval(), tokenizer, prompt, max_new_tokens=12)
