"""Fixes from the review of the PEFT front door (``lorakit.PeftModel``), with the real ``peft``
package as the oracle: one adapter with a bias at most, ``Trainer`` with default arguments,
gradient checkpointing after a ``use_adapters`` / ``disabled`` block, ``push_to_hub``,
``merge_adapter(adapter_names)``, and PEFT's other entry points and arguments."""

from __future__ import annotations

import copy
import inspect
import os
import pickle
import shutil
import warnings
from pathlib import Path

import peft
import pytest
import torch

import lorakit
from lorakit import LoraConfig, PeftModel, get_peft_model
from tests import tiny_models
from tests.peft_pairs import copy_into_peft, front_door_pair

GPT2_BIAS = dict(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
DEFAULT = dict(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
OTHER = dict(r=4, lora_alpha=8, target_modules=["v_proj"], init_lora_weights=False)


def _pair(first=DEFAULT, second=OTHER):
    """lorakit's and peft's PeftModel with the same adapters ('default' active, 'other')."""
    return front_door_pair(first, second, "other")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------- 1. one adapter with a bias
@pytest.mark.parametrize("biases", [("all", "all"), ("lora_only", "all"), ("all", "lora_only")])
def test_second_bias_adapter_beside_a_bias_adapter_is_refused_and_nothing_changes(biases):
    """Two adapters that train biases are refused, as PEFT refuses them (a bias-free one beside
    a bias adapter is fine: tests/test_peft_api_review_fixes27.py)."""
    ours = get_peft_model(tiny_models.gpt2(), LoraConfig(**GPT2_BIAS, bias=biases[0]))
    ids = tiny_models.input_ids()
    before_state = {k: v.clone() for k, v in ours.state_dict().items()}
    before = _logits(ours, ids)
    with pytest.raises(ValueError, match=r"bias='none'.*several|set bias='none'"):
        ours.add_adapter("b", LoraConfig(**GPT2_BIAS, bias=biases[1]))
    with pytest.raises(ValueError, match="'b'"):
        lorakit.inject(ours.model, LoraConfig(**GPT2_BIAS, bias=biases[1]), "b", activate=False)
    with pytest.raises(ValueError):  # peft refuses the same
        theirs = peft.get_peft_model(tiny_models.gpt2(), peft.LoraConfig(**GPT2_BIAS, bias="all"))
        theirs.add_adapter("b", peft.LoraConfig(**GPT2_BIAS, bias="all"))
    assert list(ours.peft_config) == ["default"]
    after_state = ours.state_dict()
    assert set(after_state) == set(before_state)
    assert all(torch.equal(after_state[k], v) for k, v in before_state.items())
    torch.testing.assert_close(_logits(ours, ids), before, rtol=0, atol=0)


def test_loading_a_second_adapter_beside_a_bias_adapter_is_refused(tmp_path):
    first = get_peft_model(tiny_models.gpt2(), LoraConfig(**GPT2_BIAS, bias="all"))
    with torch.no_grad():  # trained biases: the second file would overwrite them
        for parameter in first.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    first.save_pretrained(tmp_path / "a")
    get_peft_model(tiny_models.gpt2(1), LoraConfig(**GPT2_BIAS, bias="all")).save_pretrained(
        tmp_path / "b"
    )
    loaded = PeftModel.from_pretrained(tiny_models.gpt2(), tmp_path / "a")
    ids = tiny_models.input_ids()
    expected = _logits(first, ids)
    torch.testing.assert_close(_logits(loaded, ids), expected)
    state = {k: v.clone() for k, v in loaded.state_dict().items()}
    with pytest.raises(ValueError, match=r"\['default', 'B'\].*bias='none'"):
        loaded.load_adapter(tmp_path / "b", "B")
    assert list(loaded.peft_config) == ["default"]
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=0)


def test_disabling_a_bias_adapter_warns_that_the_output_is_not_the_base():
    ours = get_peft_model(tiny_models.gpt2(), LoraConfig(**GPT2_BIAS, bias="all"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one bias adapter alone: no warning, no error
        with torch.no_grad():
            for parameter in ours.parameters():
                if parameter.requires_grad:
                    parameter.add_(torch.randn_like(parameter) * 0.1)
    ids = tiny_models.input_ids()
    with pytest.warns(UserWarning, match="biases"), ours.disable_adapter():
        disabled_output = _logits(ours, ids)
    with pytest.warns(UserWarning, match="biases"), lorakit.disabled(ours):
        pass
    with pytest.warns(UserWarning, match="biases"):
        ours.disable_adapter_layers()
    ours.enable_adapter_layers()
    base = _logits(tiny_models.gpt2(), ids)
    assert (
        disabled_output - base
    ).abs().max() > 1e-3  # the trained biases stay, as the warning says


def test_one_bias_adapter_alone_matches_peft():
    ours = get_peft_model(tiny_models.gpt2(), LoraConfig(**GPT2_BIAS, bias="all"))
    theirs = peft.get_peft_model(tiny_models.gpt2(), peft.LoraConfig(**GPT2_BIAS, bias="all"))
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        ours_trainable = [p for p in ours.parameters() if p.requires_grad]
        theirs_trainable = [p for p in theirs.parameters() if p.requires_grad]
        assert len(ours_trainable) == len(theirs_trainable)
        for mine, their in zip(ours_trainable, theirs_trainable, strict=True):
            mine.add_(torch.randn(mine.shape, generator=generator) * 0.1)
            their.copy_(mine)
    ids = tiny_models.input_ids()
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), rtol=1e-5, atol=1e-5)


def test_from_pretrained_not_trainable_freezes_the_trained_biases(tmp_path):
    get_peft_model(tiny_models.gpt2(), LoraConfig(**GPT2_BIAS, bias="all")).save_pretrained(
        tmp_path
    )
    frozen = PeftModel.from_pretrained(tiny_models.gpt2(), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0
    trainable = PeftModel.from_pretrained(tiny_models.gpt2(), tmp_path, is_trainable=True)
    theirs = peft.PeftModel.from_pretrained(tiny_models.gpt2(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


# ---------------------------------------------------------------- 2. Trainer, default arguments
def test_wrapper_class_shows_the_models_forward_signature():
    ours = get_peft_model(tiny_models.llama(), LoraConfig(**DEFAULT))
    assert isinstance(ours, PeftModel)
    assert type(ours).__name__ == "PeftModelForLlamaForCausalLM"
    assert type(get_peft_model(tiny_models.llama(), LoraConfig(**DEFAULT))) is type(ours)
    parameters = inspect.signature(ours.forward).parameters
    assert {"input_ids", "attention_mask", "labels", "adapter_names"} <= set(parameters)
    from transformers.utils.generic import find_labels

    assert find_labels(type(ours)) == find_labels(type(ours.model)) == ["labels"]
    ids = tiny_models.input_ids()
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert type(clone) is type(ours)
        torch.testing.assert_close(_logits(clone, ids), _logits(ours, ids), rtol=0, atol=0)


def test_trainer_with_default_arguments_trains_and_evaluates_like_peft(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    ours = get_peft_model(tiny_models.llama(), LoraConfig(**DEFAULT, lora_dropout=0.0))
    tiny_models.randomize_adapters(ours.model, std=0.2)
    theirs = peft.get_peft_model(tiny_models.llama(), peft.LoraConfig(**DEFAULT))
    copy_into_peft(ours, theirs)
    ids = tiny_models.input_ids(batch=8, length=8)
    rows = {"input_ids": ids.tolist(), "attention_mask": [[1] * 8] * 8, "labels": ids.tolist()}
    data = Dataset.from_dict(rows)
    options = dict(use_cpu=True, report_to="none", per_device_train_batch_size=4, max_steps=2)
    losses = {}
    for name, model in (("ours", ours), ("theirs", theirs)):
        args = TrainingArguments(output_dir=str(tmp_path / name), **options)
        trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
        assert trainer.label_names == ["labels"]
        losses[name] = trainer.evaluate()["eval_loss"]
        if name == "ours":
            before = [p.detach().clone() for p in ours.parameters() if p.requires_grad]
            trainer.train()
            after = [p for p in ours.parameters() if p.requires_grad]
            assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert losses["ours"] == pytest.approx(losses["theirs"], abs=1e-5)


# ---------------------------------------------------------------- 3. checkpointing after a block
def _checkpointed_grads(mode: str, checkpointing: bool, reentrant: bool) -> dict:
    model = tiny_models.llama()
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": reentrant})
    ours = get_peft_model(model, LoraConfig(**DEFAULT))
    ours.add_adapter("other", LoraConfig(**DEFAULT))
    tiny_models.randomize_adapters(ours.model, std=0.1)
    ours.set_adapter("other")
    for name, parameter in ours.named_parameters():
        if "lora_" in name:
            parameter.requires_grad_(True)
    ours.model.model.embed_tokens.weight.requires_grad_(True)  # gradients through every layer
    ours.train()
    ids = tiny_models.input_ids(length=8)
    block = lorakit.use_adapters(ours, ["default"]) if mode == "use" else lorakit.disabled(ours)
    with block:
        loss = ours(input_ids=ids, labels=ids).loss
    loss.backward()  # after the block: a checkpointed segment is recomputed here
    return {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["use", "disabled"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_gradients_after_the_block_equal_those_without_checkpointing(mode, reentrant):
    expected = _checkpointed_grads(mode, checkpointing=False, reentrant=reentrant)
    got = _checkpointed_grads(mode, checkpointing=True, reentrant=reentrant)
    assert set(got) == set(expected)
    assert any("lora_" in name for name in got) == (mode == "use")
    for name, gradient in expected.items():
        torch.testing.assert_close(got[name], gradient, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------- 4. push_to_hub
def test_push_to_hub_uploads_the_adapter_files_only(monkeypatch, tmp_path):
    import huggingface_hub

    calls = {}

    def create_repo(self, repo_id, **options):
        calls["create_repo"] = (repo_id, options)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **options):
        calls["upload_folder"] = (repo_id, options)
        shutil.copytree(folder_path, tmp_path / "uploaded")
        return "commit"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    ours, _ = _pair()
    result = ours.push_to_hub("me/adapter", private=True, commit_message="first")
    assert result == "commit"
    assert calls["create_repo"][0] == "me/adapter"
    assert calls["create_repo"][1]["private"] is True
    assert calls["upload_folder"][1]["commit_message"] == "first"
    uploaded = tmp_path / "uploaded"
    files = sorted(str(p.relative_to(uploaded)) for p in uploaded.rglob("*") if p.is_file())
    assert files == [
        "adapter_config.json",
        "adapter_model.safetensors",
        os.path.join("other", "adapter_config.json"),
        os.path.join("other", "adapter_model.safetensors"),
    ]
    reference = peft.PeftModel.from_pretrained(tiny_models.llama(), uploaded).eval()
    ids = tiny_models.input_ids()
    torch.testing.assert_close(_logits(reference, ids), _logits(ours, ids))


# ---------------------------------------------------------------- 5. merge_adapter(names)
@pytest.mark.parametrize("second", [OTHER, dict(OTHER, target_modules=["q_proj", "v_proj"])])
def test_merge_adapter_of_another_adapter_keeps_the_active_one_like_peft(second):
    ours, theirs = _pair(second=second)
    ids = tiny_models.input_ids()
    for model in (ours, theirs):
        model.merge_adapter(["other"])
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), rtol=1e-5, atol=1e-5)
    assert ours.active_adapters == theirs.active_adapters == ["default"]
    for model in (ours, theirs):
        model.unmerge_adapter()
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), rtol=1e-5, atol=1e-5)
    assert ours.active_adapters == theirs.active_adapters == ["default"]


def test_merge_adapter_of_disjoint_adapters_adds_both():
    ours, _ = _pair()
    ids = tiny_models.input_ids()
    with lorakit.use_adapters(ours, ["default", "other"]):
        both = _logits(ours, ids)
    ours.merge_adapter(["other"])
    torch.testing.assert_close(_logits(ours, ids), both, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- 6. PEFT's other entry points
def test_disable_and_enable_adapter_layers_like_peft():
    ours, theirs = _pair()
    ids = tiny_models.input_ids()
    adapted = _logits(ours, ids)
    for model in (ours, theirs):
        model.disable_adapter_layers()
    base = _logits(tiny_models.llama(), ids)
    for _ in range(2):  # it holds until enabled
        torch.testing.assert_close(_logits(ours, ids), base, rtol=0, atol=0)
        torch.testing.assert_close(_logits(theirs, ids), base, rtol=1e-6, atol=1e-6)
    assert ours.active_adapters == theirs.active_adapters == ["default"]
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    for model in (ours, theirs):
        model.enable_adapter_layers()
    torch.testing.assert_close(_logits(ours, ids), adapted, rtol=0, atol=0)
    torch.testing.assert_close(_logits(theirs, ids), adapted, rtol=1e-5, atol=1e-5)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_peft_model_constructor_builds_like_get_peft_model():
    ours = PeftModel(tiny_models.llama(), LoraConfig(**DEFAULT), adapter_name="mine")
    theirs = peft.PeftModel(tiny_models.llama(), peft.LoraConfig(**DEFAULT), adapter_name="mine")
    assert type(ours).__name__ == "PeftModelForLlamaForCausalLM"
    assert ours.active_adapters == theirs.active_adapters == ["mine"]
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    tiny_models.randomize_adapters(ours.model, std=0.2)
    copied = {"base_model.model." + k: v for k, v in ours.model.state_dict().items()}
    theirs.load_state_dict({k: v for k, v in copied.items() if "lora_" in k}, strict=False)
    ids = tiny_models.input_ids()
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), rtol=1e-5, atol=1e-5)


def test_save_pretrained_takes_peft_positional_order(tmp_path):
    ours, _ = _pair()
    ours.save_pretrained(tmp_path / "a", True)  # PEFT's 2nd positional: safe_serialization
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "a" / "other" / "adapter_model.safetensors").is_file()
    ours.save_pretrained(tmp_path / "b", True, ["other"])
    assert sorted(os.listdir(tmp_path / "b")) == ["other"]
    with pytest.raises(ValueError, match="safetensors only"):
        ours.save_pretrained(tmp_path / "c", False)
    with pytest.raises(TypeError, match="selected_adapters="):
        ours.save_pretrained(tmp_path / "c", ["other"])


def test_set_adapter_inference_mode_freezes_like_peft():
    ours, theirs = _pair()
    for model in (ours, theirs):
        model.set_adapter("other", inference_mode=True)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters()[0] == 0
    assert ours.active_adapters == theirs.active_adapters == ["other"]
    ours.set_adapter("other")
    assert ours.get_nb_trainable_parameters()[0] > 0


def test_from_pretrained_and_add_adapter_take_peft_options(tmp_path):
    ours = get_peft_model(tiny_models.llama(dtype=torch.bfloat16), LoraConfig(**DEFAULT))
    ours.save_pretrained(tmp_path)
    options = dict(autocast_adapter_dtype=False, low_cpu_mem_usage=True, torch_device="cpu")
    results = {}
    for library in (lorakit, peft):
        loaded = library.PeftModel.from_pretrained(
            tiny_models.llama(dtype=torch.bfloat16), tmp_path, **options
        )
        loaded.add_adapter(
            "other",
            library.LoraConfig(**OTHER),
            low_cpu_mem_usage=False,
            autocast_adapter_dtype=False,
        )
        results[library.__name__] = (
            {p.dtype for n, p in loaded.named_parameters() if "lora_" in n},
            _logits(loaded, tiny_models.input_ids()),
        )
    assert results["lorakit"][0] == results["peft"][0] == {torch.bfloat16}
    torch.testing.assert_close(results["lorakit"][1], results["peft"][1], rtol=0, atol=1e-2)
    with pytest.raises(RuntimeError):
        lorakit.PeftModel.from_pretrained(tiny_models.llama(), tmp_path, torch_device="nowhere")


def test_a_missing_attribute_names_lorakit_peft_model():
    ours = get_peft_model(tiny_models.llama(), LoraConfig(**DEFAULT))
    assert ours.config is ours.model.config  # the model's attributes pass through
    with pytest.raises(AttributeError, match=r"lorakit\.PeftModel has no attribute 'no_such'"):
        ours.no_such  # noqa: B018
    assert not hasattr(ours, "no_such")
    assert Path(inspect.getfile(type(ours))).name == "peft_compat.py"


# ------------------------------------------- adapter layers disabled: merge, unload and delete
def test_merge_and_unload_while_adapter_layers_are_disabled_merges_the_active_adapter_like_peft():
    ids = tiny_models.input_ids()
    for build in (lambda: _pair()[0], lambda: _pair()[1]):
        model = build()
        expected = _logits(model, ids)  # the active adapter's output
        model.disable_adapter_layers()
        merged = model.merge_and_unload()  # PEFT merges the active adapters all the same
        torch.testing.assert_close(_logits(merged, ids), expected, atol=1e-5, rtol=0)


def test_merge_adapter_while_adapter_layers_are_disabled_merges_on_enable_like_peft():
    ours, theirs = _pair()
    ids = tiny_models.input_ids()
    for model in (ours, theirs):
        expected = _logits(model, ids)
        model.disable_adapter_layers()
        model.merge_adapter()
        model.enable_adapter_layers()
        torch.testing.assert_close(_logits(model, ids), expected, atol=1e-5, rtol=0)
    assert lorakit.state.lora_layers(ours.model)  # still LoRA layers, now merged
    assert any(layer.merged_adapters for _, layer in lorakit.state.lora_layers(ours.model))


def test_deleting_the_active_adapter_while_disabled_activates_the_next_on_enable_like_peft():
    ours, theirs = _pair(DEFAULT, {**OTHER, "target_modules": ["q_proj"]})  # (peft reports
    # active adapters from a layer: one that holds both)
    ids = tiny_models.input_ids()
    base = _logits(tiny_models.llama(), ids)
    for model in (ours, theirs):
        model.disable_adapter_layers()
        with pytest.warns(UserWarning, match="Setting active adapter to other"):
            model.delete_adapter("default")
        assert model.active_adapters == ["other"]
        model.enable_adapter_layers()
        assert model.active_adapters == ["other"]
        assert (_logits(model, ids) - base).abs().max() > 1e-3  # "other" computes again
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=1e-5, rtol=0)
