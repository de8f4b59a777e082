"""transformers.Trainer checkpoints of a front-door model whose base ties its input embedding and
``lm_head`` (SmolLM2, Llama-3.2, Qwen2.5 do).

Trainer saves a model that is neither a ``PreTrainedModel`` nor a ``peft.PeftModel`` with
``safetensors.torch.save_file(model.state_dict())``, which refuses tensors sharing memory: the
first checkpoint crashed and left an empty ``checkpoint-N/``. lorakit's ``PeftModel.state_dict``
now lists a tied tensor once and loading fills its other name from the twin, also under a
parent module (``lorakit.peft_state_dict``). Also: ``load_adapter`` on a Trainer checkpoint says what it is.
Tiny random Llama, a few CPU steps, dropout 0 (resumed runs match the uninterrupted one exactly).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaForCausalLM, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import lorakit
from lorakit.errors import AdapterFileError
from tests.tiny_models import llama_config

EMBED = "model.model.embed_tokens.weight"
HEAD = "model.lm_head.weight"


def front_door(tie: bool = True, seed: int = 0) -> nn.Module:
    """A tiny Llama (``tie_word_embeddings=tie``) with a LoRA adapter through the front door."""
    torch.manual_seed(seed)
    base = LlamaForCausalLM(llama_config(tie_word_embeddings=tie))
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    torch.manual_seed(11)
    return lorakit.get_peft_model(base, config)


def data(count: int = 16, seed: int = 5) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        ids = torch.randint(3, 128, (8,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": ids, "attention_mask": [1] * 8})
    return rows


def collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    return {key: torch.tensor([row[key] for row in rows]) for key in rows[0]}


def trainer(model: nn.Module, out, **overrides) -> Trainer:
    hf_logging.set_verbosity_error()
    arguments = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    arguments.update(overrides)
    return Trainer(
        model=model,
        args=TrainingArguments(**arguments),
        train_dataset=data(),
        eval_dataset=data(8, seed=9),
        data_collator=collate,
    )


def adapter(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}


def assert_tied(model: nn.Module) -> None:
    assert model.model.lm_head.weight is model.model.model.embed_tokens.weight


def test_tied_front_door_writes_trainer_checkpoints(tmp_path):
    model = front_door()
    trainer(model, tmp_path).train()
    saved = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert EMBED in saved and HEAD not in saved  # the tied weight once, as save_pretrained does
    assert torch.equal(saved[EMBED], model.model.model.embed_tokens.weight)
    final = load_file(tmp_path / "checkpoint-4" / "model.safetensors")
    for key, tensor in adapter(model).items():
        assert torch.equal(final[key], tensor), key
    assert_tied(model)


@pytest.mark.slow
def test_resume_from_tied_checkpoint_continues_like_the_uninterrupted_run(tmp_path):
    uninterrupted = front_door()
    first = trainer(uninterrupted, tmp_path)
    first.train()
    resumed = front_door()
    assert not torch.equal(*[next(iter(adapter(m).values())) for m in (resumed, uninterrupted)])
    second = trainer(resumed, tmp_path)
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    expected, got = adapter(uninterrupted), adapter(resumed)
    assert expected.keys() == got.keys() and expected
    for key in expected:
        assert torch.equal(got[key], expected[key]), key

    def losses(t):
        return [e["loss"] for e in t.state.log_history if "loss" in e]

    assert len(losses(first)) == 4  # the resumed history: steps 1-2 read back, 3-4 computed
    assert losses(second) == pytest.approx(losses(first), rel=1e-6)
    assert_tied(resumed)


def test_load_best_model_at_end_with_a_tied_front_door(tmp_path):
    model = front_door()
    run = trainer(
        model,
        tmp_path,
        learning_rate=0.3,
        max_steps=6,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
    )
    run.train()
    best = run.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-6")  # loading it changes the model
    saved = load_file(f"{best}/model.safetensors")
    now = adapter(model)
    assert now
    for key, tensor in now.items():
        assert torch.equal(tensor, saved[key]), key
    best_loss = min(e["eval_loss"] for e in run.state.log_history if "eval_loss" in e)
    assert run.evaluate()["eval_loss"] == pytest.approx(best_loss, rel=1e-5)
    assert_tied(model)


def test_state_dict_lists_the_tied_weight_once_and_loads_back_strictly():
    source, target = front_door(seed=0), front_door(seed=1)
    state = source.state_dict()
    full = nn.Module.state_dict(source)  # what PeftModel.state_dict gave before
    assert set(full) - set(state) == {HEAD}
    assert list(state) == [key for key in full if key != HEAD]  # order kept
    keys_before = set(state)
    result = target.load_state_dict(state)  # strict
    assert set(state) == keys_before  # the caller's dict is not changed
    assert not result.missing_keys and not result.unexpected_keys
    assert_tied(target)
    for key, tensor in nn.Module.state_dict(target).items():
        assert torch.equal(tensor, full[key]), key


def test_an_old_full_state_dict_and_a_head_only_one_still_load():
    source = front_door(seed=0)
    full = nn.Module.state_dict(source)  # both names, as torch.save(...) of an older lorakit
    target = front_door(seed=1)
    target.load_state_dict(full)
    assert_tied(target)
    assert torch.equal(target.model.lm_head.weight, full[HEAD])
    head_only = {k: v for k, v in full.items() if k != EMBED}  # the twin the other way round
    target = front_door(seed=1)
    target.load_state_dict(head_only)
    assert torch.equal(target.model.model.embed_tokens.weight, full[EMBED])
    assert_tied(target)


@pytest.mark.parametrize(
    ("wrap", "prefix"),
    [
        (lambda m: nn.ModuleDict({"peft": m}), "peft."),
        (lambda m: nn.ModuleList([m]), "0."),
        (nn.DataParallel, "module."),  # (DDP's and torch.compile's wrappers load the same way)
    ],
)
def test_under_a_parent_the_alias_is_dropped_and_a_strict_load_fills_it(wrap, prefix):
    """A parent's ``load_state_dict`` never calls the child's ``load_state_dict``; the filling
    is done in ``_load_from_state_dict``, which it does call (a first version filled in
    ``load_state_dict`` and failed strict loads under any wrapper)."""
    holder = wrap(front_door())
    state = holder.state_dict()
    assert prefix + EMBED in state and prefix + HEAD not in state
    other = wrap(front_door(seed=1))
    result = other.load_state_dict(state)  # strict
    assert not result.missing_keys and not result.unexpected_keys
    loaded = other.module if isinstance(other, nn.DataParallel) else next(iter(other.children()))
    assert_tied(loaded)
    assert torch.equal(loaded.model.lm_head.weight, state[prefix + EMBED])


def test_layer_replication_shares_modules_and_loads_strictly_under_a_parent():
    """Replicated layers share their base modules: each shared tensor is listed once too."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config(tie_word_embeddings=False))
    config = lorakit.LoraConfig(r=2, target_modules=["q_proj"], layer_replication=[[0, 2], [1, 2]])
    holder = nn.ModuleDict({"peft": lorakit.get_peft_model(base, config)})
    state = holder.state_dict()
    layer = "peft.model.model.layers.{}.self_attn.k_proj.weight"  # layer 2 is layer 0's copy
    assert layer.format(0) in state and layer.format(2) not in state
    torch.manual_seed(1)
    other_base = LlamaForCausalLM(llama_config(tie_word_embeddings=False))
    other = nn.ModuleDict({"peft": lorakit.get_peft_model(other_base, config)})
    result = other.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    mine = dict(holder.named_parameters(remove_duplicate=False))
    for key, tensor in other.named_parameters(remove_duplicate=False):
        assert torch.equal(tensor, mine[key]), key


def test_untied_state_dict_keys_are_unchanged():
    model = front_door(tie=False)
    assert list(model.state_dict()) == list(nn.Module.state_dict(model))
    assert HEAD in model.state_dict()


def test_load_adapter_on_a_trainer_checkpoint_says_what_it_is_and_the_way_out_works(tmp_path):
    model = front_door(tie=False)
    run = trainer(model, tmp_path / "run", save_strategy="no")
    run.train()
    run.save_model(str(tmp_path / "saved"))
    torch.manual_seed(0)
    with pytest.raises(AdapterFileError) as error:
        lorakit.load_adapter(LlamaForCausalLM(llama_config()), tmp_path / "saved")
    text = str(error.value)
    assert "transformers.Trainer checkpoint" in text and "not an adapter" in text
    assert "load_state_dict(" in text and "strict=False" in text
    assert "lorakit.save_adapter" in text and "TrainerCallback.on_save" in text
    # the way out it names: load the state dict into the same model, then save the adapter
    fresh = front_door(tie=False, seed=1)
    fresh.load_state_dict(load_file(tmp_path / "saved" / "model.safetensors"), strict=False)
    lorakit.save_adapter(fresh, tmp_path / "adapter")
    torch.manual_seed(0)
    loaded = lorakit.PeftModel.from_pretrained(
        LlamaForCausalLM(llama_config()), tmp_path / "adapter"
    )
    trained = adapter(model)
    assert trained and adapter(loaded).keys() == trained.keys()
    for key, tensor in adapter(loaded).items():
        assert torch.equal(tensor, trained[key]), key


def test_a_plain_model_directory_keeps_the_generic_message(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config()).save_pretrained(tmp_path)  # model.safetensors, no LoRA
    with pytest.raises(AdapterFileError, match="is this an adapter directory") as error:
        lorakit.load_adapter(LlamaForCausalLM(llama_config()), tmp_path)
    assert "Trainer checkpoint" not in str(error.value)
