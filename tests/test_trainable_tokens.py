"""``trainable_token_indices`` (PEFT's trainable tokens): chosen rows of an embedding trained in
full, saved as ``<embedding>.token_adapter.trainable_tokens_delta``.

Checked against the real ``peft`` (files both ways, list and dict forms, logits within 1e-5;
``merge_and_unload`` weights), training (only the chosen rows move), merge/unmerge, the per-call
adapter choice, the PEFT-compatible front door, ``lorakit inspect`` and the refusals.
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import lorakit
from lorakit.cli import main
from lorakit.errors import AdapterFileError
from lorakit.io import load_adapter, save_adapter
from lorakit.layers import TrainableTokens
from tests import tiny_models

TOLERANCE = 1e-5
TOKENS = [3, 5, 7]
DELTA = "model.embed_tokens.modules_to_save.{}.token_adapter.trainable_tokens_delta"


def _fields(**overrides) -> dict:
    fields = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return fields | dict(trainable_token_indices=TOKENS) | overrides


def _perturb(model: torch.nn.Module, seed: int = 7) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)


def _ids() -> torch.Tensor:
    ids = tiny_models.input_ids()
    ids[:, :3] = torch.tensor(TOKENS)  # every sequence holds the trained tokens
    return ids


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids()).logits.float()


def _peft(model: torch.nn.Module, **fields) -> peft.PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(**fields))


def _peft_load(directory) -> peft.PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(tiny_models.llama(), directory)


def test_injected_rows_start_as_the_embedding_rows_and_only_they_train():
    model = lorakit.inject(
        tiny_models.llama(), lorakit.LoraConfig(**_fields(r=2, init_lora_weights=True))
    )
    embedding = model.get_submodule("model.embed_tokens")
    assert isinstance(embedding, TrainableTokens)
    rows = model.get_parameter(DELTA.format("default"))
    assert torch.equal(rows, embedding.original_module.weight[TOKENS])
    assert rows.requires_grad and not embedding.original_module.weight.requires_grad
    assert torch.equal(_logits(model), _logits(tiny_models.llama()))  # B = 0, same rows
    lorakit.inject(model, lorakit.LoraConfig(**_fields(r=2)), "second")  # init False: PEFT
    second_rows = model.get_parameter(DELTA.format("second"))  # copies the rows too (0.21.2)
    assert torch.equal(second_rows, embedding.original_module.weight[TOKENS])


@pytest.mark.parametrize("form", ["list", "dict"])
def test_lorakit_file_loads_in_peft_with_identical_logits(form, tmp_path):
    indices = TOKENS if form == "list" else {"embed_tokens": TOKENS}
    ours = lorakit.inject(
        tiny_models.llama(), lorakit.LoraConfig(**_fields(trainable_token_indices=indices))
    )
    _perturb(ours)
    save_adapter(ours, tmp_path)
    assert (
        json.loads((tmp_path / "adapter_config.json").read_text())["trainable_token_indices"]
        == indices
    )
    theirs = _peft_load(tmp_path)
    assert (_logits(ours) - _logits(theirs)).abs().max().item() <= TOLERANCE
    assert (_logits(ours) - _logits(tiny_models.llama())).abs().max().item() > 1e-3


@pytest.mark.parametrize("form", ["list", "dict"])
def test_peft_file_loads_in_lorakit_with_identical_logits(form, tmp_path):
    indices = TOKENS if form == "list" else {"embed_tokens": TOKENS}
    theirs = _peft(tiny_models.llama(), **_fields(trainable_token_indices=indices))
    _perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = tiny_models.llama()
    load_adapter(ours, tmp_path)
    assert (_logits(ours) - _logits(theirs)).abs().max().item() <= TOLERANCE
    # the rows alone matter: put the original rows back in lorakit's copy and outputs move
    with torch.no_grad():
        rows = ours.get_parameter(DELTA.format("default"))
        rows.copy_(ours.model.embed_tokens.original_module.weight[TOKENS])
    assert (_logits(ours) - _logits(theirs)).abs().max().item() > 1e-4


def test_training_moves_only_the_chosen_rows():
    model = lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(**_fields()))
    model.train()
    base = model.model.embed_tokens.original_module.weight.detach().clone()
    rows = model.get_parameter(DELTA.format("default"))
    before = rows.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(_ids(), labels=_ids()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert (rows.detach() - before).abs().min().item() > 0  # every chosen row moved
    assert torch.equal(model.model.embed_tokens.original_module.weight, base)


def test_merge_unmerge_and_merge_and_unload_match_peft():
    theirs = _peft(tiny_models.llama(), **_fields())
    _perturb(theirs)
    ours = lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(**_fields()))
    with torch.no_grad():
        mine = dict(ours.named_parameters())
        for name, parameter in theirs.named_parameters():
            if parameter.requires_grad:
                key = name.removeprefix("base_model.model.").replace(
                    "embed_tokens.token_adapter",
                    "embed_tokens.modules_to_save.default.token_adapter",
                )
                mine[
                    key.replace(".trainable_tokens_delta.default", ".trainable_tokens_delta")
                ].copy_(parameter)
    unmerged = _logits(ours)
    assert (unmerged - _logits(theirs)).abs().max().item() <= TOLERANCE
    lorakit.merge(ours)
    assert (_logits(ours) - unmerged).abs().max().item() <= TOLERANCE
    lorakit.unmerge(ours)
    assert torch.equal(_logits(ours), unmerged)
    merged_theirs = theirs.merge_and_unload()
    merged_ours = lorakit.merge_and_unload(ours)
    assert type(merged_ours.model.embed_tokens) is torch.nn.Embedding
    for name, tensor in merged_theirs.state_dict().items():
        assert torch.allclose(merged_ours.state_dict()[name], tensor, atol=1e-6), name


def test_disabled_and_use_adapters_choose_rows_per_call():
    model = lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(**_fields()))
    other = lorakit.LoraConfig(**_fields(trainable_token_indices=[9]))
    lorakit.inject(model, other, "other", activate=False)
    assert not model.get_parameter(DELTA.format("other")).requires_grad  # inactive: frozen
    _perturb(model)
    with torch.no_grad():
        model.get_parameter(DELTA.format("other")).add_(1.0)  # inactive: not perturbed
    with lorakit.disabled(model):
        assert torch.equal(_logits(model), _logits(tiny_models.llama()))
    only_default = _logits(model)
    with lorakit.use_adapters(model, ["other"]):
        assert not torch.allclose(_logits(model), only_default)
    assert torch.equal(_logits(model), only_default)
    lorakit.set_active(model, ["other"])
    assert not model.get_parameter(DELTA.format("default")).requires_grad
    assert model.get_parameter(DELTA.format("other")).requires_grad


def test_unload_and_delete_restore_the_embedding():
    original = tiny_models.llama()
    embedding = original.model.embed_tokens
    model = lorakit.inject(original, lorakit.LoraConfig(**_fields()))
    lorakit.delete_adapter(model, "default")
    assert not any("token_adapter" in n for n, _ in model.named_parameters())
    lorakit.unload(model)
    assert model.model.embed_tokens is embedding


def test_front_door_saves_what_peft_loads_and_loads_it_back(tmp_path):
    ours = lorakit.get_peft_model(tiny_models.llama(), lorakit.LoraConfig(**_fields()))
    _perturb(ours)
    ours.save_pretrained(tmp_path)
    theirs = _peft_load(tmp_path)
    assert (_logits(ours) - _logits(theirs)).abs().max().item() <= TOLERANCE
    again = lorakit.PeftModel.from_pretrained(tiny_models.llama(), tmp_path)
    assert (_logits(again) - _logits(theirs)).abs().max().item() <= TOLERANCE


def test_inspect_shows_the_trainable_tokens(tmp_path, capsys):
    save_adapter(lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(**_fields())), tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    assert "trainable tokens: [3, 5, 7]" in capsys.readouterr().out


def _tied_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_models.llama_config(tie_word_embeddings=True)).eval()


@pytest.mark.parametrize(
    ("model", "fields", "match"),
    [
        (_tied_llama, {}, "tied to the output layer"),
        (tiny_models.llama, dict(trainable_token_indices=[128]), r"\[128\] outside"),
        (tiny_models.llama, dict(trainable_token_indices={"q_proj": [1]}), "nn.Embedding"),
        (tiny_models.llama, dict(trainable_token_indices={"nothing": [1]}), "matches no module"),
        (tiny_models.llama, dict(modules_to_save=["embed_tokens"]), "one way only"),
        (tiny_models.llama, dict(target_modules=["embed_tokens"]), "one way only"),
    ],
)
def test_what_cannot_be_done_is_refused_and_changes_nothing(model, fields, match):
    base = model()
    before = dict(base.named_modules())
    with pytest.raises(ValueError, match=match):
        lorakit.inject(base, lorakit.LoraConfig(**_fields(**fields)))
    assert dict(base.named_modules()) == before


@pytest.mark.parametrize("value", [[], [-1], [1.5], {"embed_tokens": []}, "3"])
def test_config_refuses_malformed_indices(value):
    with pytest.raises(ValueError, match="trainable_token_indices"):
        lorakit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=value)


def test_a_file_without_its_rows_is_refused(tmp_path):
    save_adapter(lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(**_fields())), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["trainable_token_indices"] = [3, 5]  # two rows in the config, three in the file
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    weights = tmp_path / "adapter_model.safetensors"  # without lorakit's copy of the config
    save_file(load_file(weights), weights, metadata={"format": "pt"})
    with pytest.raises(AdapterFileError, match="trainable_tokens_delta"):
        load_adapter(tiny_models.llama(), tmp_path, allow_base_mismatch=True)


def test_a_failed_load_keeps_the_rows_of_the_adapters_already_there(tmp_path, monkeypatch):
    from lorakit.io import load

    save_adapter(lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(**_fields())), tmp_path)
    model = lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(**_fields()), "first")
    wrapper = model.model.embed_tokens
    before = _logits(model)

    real = load.model_tensor

    def failing(model, entry, adapter_name):
        if entry.role == "tokens":  # after injection, while copying the rows
            raise RuntimeError("simulated failure while copying")
        return real(model, entry, adapter_name)

    monkeypatch.setattr(load, "model_tensor", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        load_adapter(model, tmp_path, "second")
    assert model.model.embed_tokens is wrapper
    assert list(wrapper.modules_to_save) == ["first"]
    assert torch.equal(_logits(model), before)


def test_another_adapter_cannot_save_the_embedding_in_full_and_nothing_changes():
    model = lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(**_fields()))
    before = dict(model.named_modules())
    config = lorakit.LoraConfig(r=2, target_modules=["k_proj"], modules_to_save=["embed_tokens"])
    with pytest.raises(ValueError, match="trains token rows"):
        lorakit.inject(model, config, "full")
    assert dict(model.named_modules()) == before  # no k_proj wrapped on the way


def test_two_adapters_with_copies_of_one_module_are_not_active_together() -> None:
    """With adapters a (tokens [1, 2]) and b (tokens [2, 3]) each saving lm_head too, both
    active ran a's lm_head with b's row 2, a mix of two adapters; PEFT refuses it
    ("Only one adapter can be set at a time"). Refused, before any change."""
    model = tiny_models.llama()
    for name, tokens in (("a", [1, 2]), ("b", [2, 3])):
        config = lorakit.LoraConfig(
            r=2,
            target_modules=["q_proj"],
            trainable_token_indices={"embed_tokens": tokens},
            modules_to_save=["lm_head"],
        )
        lorakit.inject(model, config, adapter_name=name)
    lorakit.set_active(model, ["a"])
    with pytest.raises(ValueError, match=r"adapters \['a', 'b'\] each hold their own copy"):
        lorakit.set_active(model, ["a", "b"])
    with pytest.raises(ValueError, match="activate one of them at a time"):
        lorakit.use_adapters(model, ["a", "b"]).__enter__()
    assert lorakit.active_adapters(model) == ("a",)
