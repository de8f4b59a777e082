"""Fixes from the review of this round's own changes.

- A mixture of adapters that carry base embedding weights is refused by the server (combining
  now carries those weights; the bank cannot apply them, and dropped them silently).
- ``load_adapter``'s target check leaves the process's warning filters alone (it switched
  warnings off around a call, which other threads share).
- Combining carries a base weight saved in bfloat16 and the same one in float32 as one weight.
- A checkpoint of an older lorakit, which rounded a fractional ``--epochs`` half to even,
  resumes with its own number of steps.
"""

from __future__ import annotations

import json
import shutil
import warnings

import peft
import pytest
import torch

import lorakit
from lorakit.errors import BaseModelMismatchError, UserError
from lorakit.train import TrainingConfig, pad_collate, train
from tests import serving, tiny_models, tiny_tokenizer
from tests.train_job import make_data, q_proj_model


def peft_adapter_with_embeddings(directory, tokenizer, seed: int, dtype=torch.float32):
    """A PEFT adapter (q/v, non-zero B) saved with its base's embedding weights; the base's
    first 20 embedding rows re-initialised (as after training new tokens)."""
    base = serving.base_model(tokenizer)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(7)
        rows = torch.randn(20, base.config.hidden_size, generator=generator)
        base.get_input_embeddings().weight[:20] = rows
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    torch.manual_seed(seed)
    model = peft.get_peft_model(base.to(dtype), config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(directory, save_embedding_layers=True)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer.build()


def test_a_mixture_of_adapters_carrying_base_weights_is_a_400(tmp_path, tokenizer):
    for index in range(2):
        peft_adapter_with_embeddings(tmp_path / "adapters" / f"e{index}", tokenizer, index)
    server = serving.Served(tmp_path, tokenizer)
    with server.client:
        body = dict(prompt="hello world", max_tokens=4, temperature=0)
        alone = server.post("/v1/completions", dict(body, model="e0"))
        assert alone.status_code == 400
        mixed = dict(body, model=serving.BASE, merged_adapters={"ids": ["e0", "e1"]})
        answer = server.post("/v1/completions", mixed)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "merged_adapters"
    # (each input alone is refused for its embed_tokens copy: a layer the bank does not route;
    # the mixture's copies go through the same check since session 31)
    message = error["message"]
    assert "cannot be served" in message and "does not route" in message
    assert "'base_model.model.lm_head.weight'" in message or "embed_tokens.weight'" in message


def test_load_adapter_leaves_the_warning_filters_alone(tmp_path, monkeypatch):
    model = lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "adapter")

    changes = []
    simplefilter = warnings.simplefilter

    def recorded(*args, **kwargs):
        changes.append(args)
        return simplefilter(*args, **kwargs)

    monkeypatch.setattr(warnings, "simplefilter", recorded)
    filters = list(warnings.filters)
    lorakit.load_adapter(tiny_models.llama(), tmp_path / "adapter")
    monkeypatch.undo()
    assert changes == []
    assert warnings.filters == filters


def test_combine_carries_a_bfloat16_and_a_float32_copy_of_one_weight(tmp_path, tokenizer):
    peft_adapter_with_embeddings(tmp_path / "wide", tokenizer, 0)
    peft_adapter_with_embeddings(tmp_path / "narrow", tokenizer, 1, dtype=torch.bfloat16)
    result = lorakit.combine([tmp_path / "narrow", tmp_path / "wide"])
    (carried,) = [w for name, w in result.base_weights.items() if "embed_tokens" in name]
    assert carried.dtype == torch.float32  # the finer copy
    with torch.no_grad():
        model = serving.base_model(tokenizer)
        model.get_input_embeddings().weight.copy_(carried)
    result.add_to(model.to(torch.bfloat16), "mixed")  # the same base, rounded: accepted
    different = carried.clone()
    different[0, 0] += 1.0
    result.base_weights[next(iter(result.base_weights))] = different
    with pytest.raises(BaseModelMismatchError, match="differs from the model's"):
        result.add_to(serving.base_model(tokenizer), "other")


def test_an_older_checkpoint_of_fractional_epochs_resumes_with_its_own_steps(tmp_path):
    data = make_data(16)  # 4 steps an epoch of 4 examples
    config = TrainingConfig(
        output_dir=str(tmp_path),
        epochs=0.625,  # 2.5 steps: rounded to 2 before, counted up to 3 now
        batch_size=4,
        checkpoint_every=1,
        progress=False,
    )

    assert train(q_proj_model(), data, pad_collate(0), config).steps == 3
    checkpoints = sorted((tmp_path / "checkpoints").iterdir())
    state_path = checkpoints[0] / "trainer_state.json"
    state = json.loads(state_path.read_text())
    del state["data_plan"]["examples_sha256"]  # as an older lorakit wrote it ...
    state["data_plan"]["total_steps"] = 2  # ... with round(0.625 * 4) = 2 steps
    state_path.write_text(json.dumps(state))
    for later in checkpoints[1:]:
        shutil.rmtree(later)
    resumed = train(q_proj_model(), data, pad_collate(0), config, resume=True)
    assert resumed.steps == 2
    # a checkpoint of this lorakit keeps its own count (3), and so does any other older count
    state["data_plan"]["total_steps"] = 5
    state_path.write_text(json.dumps(state))
    for later in sorted((tmp_path / "checkpoints").iterdir())[1:]:
        shutil.rmtree(later)
    with pytest.raises(
        UserError, match=r"3 optimizer steps \(the checkpoint's: 5; --steps / --epochs\)"
    ):
        train(q_proj_model(), data, pad_collate(0), config, resume=True)
