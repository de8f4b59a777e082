"""Review 34 of the PEFT front door, peft 0.21.2 as the oracle where it applies:
``generate(inputs=..., adapter_names=...)`` checks the number of names (and the per-row router
refuses names that do not match the rows a layer sees), ``load_adapter`` into an adapter the
model holds reloads it, a task type's heads show in ``modules_to_save``,
and ``get_peft_model_state_dict`` / ``set_peft_model_state_dict``."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForTokenClassification,
    GenerationConfig,
)

import lorakit
from lorakit import LoraConfig, get_peft_model
from lorakit.errors import AdapterFileError
from lorakit.io.keys import canonical_keys
from tests import tiny_models
from tests.peft_pairs import copy_into_peft, front_door_pair
from tests.peft_versions import peft_task_heads

FIRST = dict(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
SECOND = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
GREEDY = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)


@pytest.fixture
def pair():
    """lorakit's and peft's PeftModel with the same two adapters ('default' active, 'b')."""
    return front_door_pair(FIRST, SECOND, "b")


def _alone_generate(model, ids: torch.Tensor, name: str, **options) -> torch.Tensor:
    names = [] if name == "__base__" else [name]
    with torch.no_grad(), lorakit.use_adapters(model.model, names):
        return model.generate(ids, **options)


# ------------------------------------------------- 1. adapter_names: generate(inputs=...)
def test_generate_inputs_keyword_refuses_a_wrong_number_of_names_like_peft(pair):
    ours, theirs = pair
    ids = tiny_models.input_ids(batch=4, length=5)
    with pytest.raises(ValueError, match="2 names for a batch of 4 rows"):
        ours.generate(inputs=ids, adapter_names=["default", "b"], **GREEDY)
    with pytest.raises(ValueError):
        theirs.generate(inputs=ids, adapter_names=["default", "b"], **GREEDY)


def test_generate_inputs_keyword_routes_rows_like_input_ids_and_peft(pair):
    ours, theirs = pair
    ids = tiny_models.input_ids(batch=3, length=5)
    names = ["b", "__base__", "default"]
    with torch.no_grad():
        by_inputs = ours.generate(inputs=ids, adapter_names=names, **GREEDY)
        by_input_ids = ours.generate(input_ids=ids, adapter_names=names, **GREEDY)
        peft_by_inputs = theirs.generate(inputs=ids, adapter_names=names, **GREEDY)
    assert torch.equal(by_inputs, by_input_ids)
    assert torch.equal(by_inputs, peft_by_inputs)


@pytest.mark.parametrize("call", ["forward", "generate"])
def test_row_router_refuses_names_that_do_not_match_the_rows_it_sees(pair, call):
    """Where the caller's batch is unknown (``rows_routed`` around the model itself), a layer
    seeing 4 rows for 2 names refuses: 4 tokens-rows divide evenly, yet the names would lie
    over the wrong rows (rows 1 and 2 took the wrong adapter before)."""
    ours, _ = pair
    ids = tiny_models.input_ids(batch=4, length=5)
    refused = pytest.raises(ValueError, match="names 2 rows, but a layer got a batch of 4 rows")
    with refused, ours.rows_routed(["default", "b"]):
        if call == "forward":
            ours.model(ids)
        else:
            ours.model.generate(ids, **GREEDY)


@pytest.mark.parametrize("options", [dict(num_beams=2), dict(num_beams=3, num_return_sequences=2)])
def test_generate_with_beams_gives_each_row_its_adapter(pair, options):
    """Beams and returned sequences multiply the rows the layers see: still accepted, and
    each row's sequences are those of its adapter alone."""
    ours, _ = pair
    ids = tiny_models.input_ids(batch=3, length=5)
    names = ["b", "default", "__base__"]
    options = GREEDY | options
    with torch.no_grad():
        mixed = ours.generate(ids, adapter_names=names, **options)
    per_row = mixed.shape[0] // len(names)
    assert per_row == options.get("num_return_sequences", 1)
    for row, name in enumerate(names):
        alone = _alone_generate(ours, ids[row : row + 1], name, **options)
        assert torch.equal(mixed[row * per_row : (row + 1) * per_row], alone)


def test_sequences_per_row_reads_arguments_then_generation_configs():
    from lorakit.peft_rows import sequences_per_row

    model = tiny_models.llama()
    assert sequences_per_row(model, (), {}) == 1
    assert sequences_per_row(model, (), {"num_beams": 4, "num_return_sequences": 2}) == 4
    beams = GenerationConfig(num_beams=3)
    assert sequences_per_row(model, (), {"generation_config": beams}) == 3
    assert sequences_per_row(model, (None, beams), {}) == 3  # generate(inputs, config)
    model.generation_config.num_return_sequences = 5
    assert sequences_per_row(model, (), {}) == 5
    assert sequences_per_row(model, (), {"num_return_sequences": 1}) == 1


def test_generate_with_a_positional_beam_config_gives_each_row_its_adapter(pair):
    """generate(ids, GenerationConfig(num_beams=2), adapter_names=...) answered per row before
    the row check; the check missed the positional config and refused it."""
    ours, _ = pair
    ids = tiny_models.input_ids(batch=2, length=4)
    config = GenerationConfig(num_beams=2, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        mixed = ours.generate(ids, config, adapter_names=["default", "b"])
    for row, name in enumerate(["default", "b"]):
        alone = _alone_generate(ours, ids[row : row + 1], name, num_beams=2, max_new_tokens=3)
        assert torch.equal(mixed[row : row + 1], alone)


# ------------------------------------------------- 2. load_adapter into an existing name
def _trained_dir(tmp_path, library, config: dict, name: str = "saved"):
    """A saved adapter of ``config`` with lora_B = 0.3 (a value neither init gives)."""
    model = library.get_peft_model(tiny_models.llama(), library.LoraConfig(**config))
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if "lora_B" in key:
                parameter.fill_(0.3)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("is_trainable", [True, False])
def test_load_adapter_into_an_existing_adapter_reloads_it_like_peft(tmp_path, is_trainable):
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    directory = _trained_dir(tmp_path, lorakit, config)
    ours = get_peft_model(tiny_models.llama(), LoraConfig(**config))
    theirs = peft.get_peft_model(tiny_models.llama(), peft.LoraConfig(**config))
    ours.train(), theirs.train()
    flags = {k: p.requires_grad for k, p in ours.named_parameters()}
    held = dict(ours.named_parameters())
    ours.load_adapter(directory, adapter_name="default", is_trainable=is_trainable)
    theirs.load_adapter(directory, adapter_name="default", is_trainable=is_trainable)
    saved = load_file(directory / "adapter_model.safetensors")
    got = lorakit.get_peft_model_state_dict(ours)
    assert set(got) == set(saved)
    for key, value in saved.items():
        assert torch.equal(got[key], value), key
    ids = tiny_models.input_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
    assert {k: p.requires_grad for k, p in ours.named_parameters()} == flags  # as in PEFT
    assert all(held[k] is p for k, p in ours.named_parameters())  # copied in place
    assert ours.training == theirs.training == is_trainable
    assert list(ours.peft_config) == ["default"] and ours.active_adapters == ["default"]


@pytest.mark.parametrize(
    ("saved", "why"),
    [
        (dict(r=8, lora_alpha=8, target_modules=["q_proj"]), r"shape \(8, 64\).*another rank"),
        (dict(r=4, lora_alpha=16, target_modules=["q_proj"]), "scales it by 4.*adapter by 2"),
        (dict(r=4, lora_alpha=8, target_modules=["v_proj"]), "other tensors"),
        (dict(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True), "other tensors"),
        (dict(r=4, lora_alpha=8, target_modules=["q_proj"], bias="all"), "biases"),
    ],
)
def test_load_adapter_into_an_existing_adapter_refuses_a_file_that_does_not_fit(
    tmp_path, saved, why
):
    directory = _trained_dir(tmp_path, lorakit, saved)
    ours = get_peft_model(
        tiny_models.llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    )
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(AdapterFileError, match=why) as refusal:
        ours.load_adapter(directory, adapter_name="default")
    assert "existing adapter 'default'" in str(refusal.value)
    after = ours.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert list(ours.peft_config) == ["default"]


def test_load_adapter_into_a_merged_adapter_is_refused(tmp_path):
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj"])
    directory = _trained_dir(tmp_path, lorakit, config)
    ours = get_peft_model(tiny_models.llama(), LoraConfig(**config))
    ours.merge_adapter()
    with pytest.raises(ValueError, match=r"merged.*unmerge_adapter"):
        ours.load_adapter(directory, adapter_name="default")


# ------------------------------------------------- 3. modules_to_save of task types
def _bert(task: str):
    sizes = dict(tiny_models.BERT_SIZES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    if task == "SEQ_CLS":
        return tiny_models.bert()
    model_class = BertForTokenClassification if task == "TOKEN_CLS" else BertForQuestionAnswering
    return model_class(BertConfig(**sizes, num_labels=2)).eval()


def _trained_copies(model) -> list[str]:
    return sorted(
        n for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n
    )


@pytest.mark.parametrize("task", ["SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"])
def test_task_type_heads_show_in_modules_to_save_like_peft(tmp_path, task):
    fields = dict(r=4, target_modules=["query", "value"], task_type=task)
    config = LoraConfig(**fields)
    ours = get_peft_model(_bert(task), config)
    theirs = peft.get_peft_model(_bert(task), peft.LoraConfig(**fields))
    # peft 0.22's heads (0.21 had no "pre_classifier": peft_task_heads)
    heads = ["qa_outputs"] if task == "QUESTION_ANS" else ["classifier", "score", "pre_classifier"]
    assert theirs.peft_config["default"].modules_to_save == peft_task_heads(task)
    assert ours.peft_config["default"].modules_to_save == heads
    assert ours.modules_to_save == set(heads)
    if peft_task_heads(task) == heads:
        assert ours.modules_to_save == theirs.modules_to_save
    assert config.modules_to_save is None  # the caller's config is left as it was
    # trained and saved as before: the head's copy, under peft's keys
    assert [n.removeprefix("model.") for n in _trained_copies(ours)] == [
        n.removeprefix("base_model.model.") for n in _trained_copies(theirs)
    ]
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    written = [
        json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "theirs")
    ]
    assert written[0]["modules_to_save"] == heads
    assert written[1]["modules_to_save"] == peft_task_heads(task)
    keys = [set(load_file(tmp_path / d / "adapter_model.safetensors")) for d in ("ours", "theirs")]
    assert keys[0] == keys[1]
    loaded = lorakit.PeftModel.from_pretrained(_bert(task), tmp_path / "ours")
    assert loaded.modules_to_save == set(heads)
    assert (
        loaded.peft_config["default"].modules_to_save == ours.peft_config["default"].modules_to_save
    )


def test_a_recorded_task_config_can_add_another_adapter():
    """peft_config['default'] names both SEQ_CLS heads, BERT has only ``classifier``: adding
    an adapter with it trains that head, as PEFT does, instead of refusing ``score``."""
    ours = get_peft_model(
        tiny_models.bert(), LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS")
    )
    ours.add_adapter("b", ours.peft_config["default"])
    assert ours.peft_config["b"].modules_to_save == ["classifier", "score", "pre_classifier"]
    assert "b" in ours.model.classifier.modules_to_save


# ------------------------------------------------- 4. get/set_peft_model_state_dict
@pytest.mark.parametrize(
    "extra",
    [{}, {"use_dora": True}, {"bias": "lora_only"}, {"modules_to_save": ["lm_head"]}],
    ids=["lora", "dora", "bias", "saved-module"],
)
def test_get_peft_model_state_dict_is_the_file_and_peft_s(tmp_path, extra):
    fields = dict(r=4, target_modules=["q_proj", "v_proj"], **extra)
    ours = get_peft_model(tiny_models.llama(), LoraConfig(**fields))
    tiny_models.randomize_adapters(ours.model, std=0.2)
    theirs = peft.get_peft_model(tiny_models.llama(), peft.LoraConfig(**fields))
    copy_into_peft(ours, theirs)
    got = lorakit.get_peft_model_state_dict(ours)
    expected = peft.get_peft_model_state_dict(theirs)
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    ours.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    saved = canonical_keys(saved)  # (the file spells a DoRA magnitude with ".weight")
    assert set(saved) == set(got) and all(torch.equal(saved[k], got[k]) for k in saved)
    inside = lorakit.get_peft_model_state_dict(ours.model)  # the model inside: the same
    assert set(inside) == set(got) and all(
        inside[k] is not None and torch.equal(inside[k], got[k]) for k in got
    )


def test_get_peft_model_state_dict_takes_the_tensors_of_a_given_state_dict():
    ours = get_peft_model(tiny_models.llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    given = {key: value + 1 for key, value in ours.state_dict().items()}
    got = lorakit.get_peft_model_state_dict(ours, state_dict=given)
    own = lorakit.get_peft_model_state_dict(ours)
    assert set(got) == set(own)
    assert all(torch.equal(got[key], own[key] + 1) for key in own)


def test_set_peft_model_state_dict_returns_peft_s_missing_and_unexpected_keys(pair):
    ours, theirs = pair
    full = {k: v + 0.5 for k, v in peft.get_peft_model_state_dict(theirs, adapter_name="b").items()}
    part = dict(list(full.items())[:3])
    part["base_model.model.nowhere.lora_A.weight"] = torch.zeros(2, 2)
    held = dict(ours.named_parameters())
    result = lorakit.set_peft_model_state_dict(ours, part, adapter_name="b")
    expected = peft.set_peft_model_state_dict(theirs, part, adapter_name="b")
    assert {k.removeprefix("model.") for k in result.missing_keys} == {
        k.removeprefix("base_model.model.") for k in expected.missing_keys
    }
    assert (
        result.unexpected_keys
        == expected.unexpected_keys
        == ["base_model.model.nowhere.lora_A.weight"]
    )
    now = lorakit.get_peft_model_state_dict(ours, adapter_name="b")
    for key in list(part)[:3]:
        assert torch.equal(now[key], part[key]), key
    assert all(held[k] is p for k, p in ours.named_parameters())  # copied in place
    no_prefix = {k.removeprefix("base_model.model."): v * 0 for k, v in full.items()}
    assert not lorakit.set_peft_model_state_dict(ours, no_prefix, "b").unexpected_keys
    assert all(
        v.abs().sum() == 0 for v in lorakit.get_peft_model_state_dict(ours, None, "b").values()
    )


def test_set_peft_model_state_dict_refuses_other_shapes_before_copying_anything():
    ours = get_peft_model(tiny_models.llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    other = get_peft_model(tiny_models.llama(), LoraConfig(r=8, target_modules=["q_proj"]))
    tiny_models.randomize_adapters(other.model)
    before = {k: v.clone() for k, v in lorakit.get_peft_model_state_dict(ours).items()}
    with pytest.raises(ValueError, match=r"\(8, 64\) given, \(4, 64\) in the model"):
        lorakit.set_peft_model_state_dict(ours, lorakit.get_peft_model_state_dict(other))
    assert all(
        torch.equal(v, before[k]) for k, v in lorakit.get_peft_model_state_dict(ours).items()
    )
    with pytest.warns(UserWarning, match="skipped tensors"):
        result = lorakit.set_peft_model_state_dict(
            ours, lorakit.get_peft_model_state_dict(other), ignore_mismatched_sizes=True
        )
    assert "model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in result.missing_keys


def test_state_dict_functions_are_exported_lazily():
    from lorakit import get_peft_model_state_dict, set_peft_model_state_dict

    assert {"get_peft_model_state_dict", "set_peft_model_state_dict"} <= set(lorakit.__all__)
    assert get_peft_model_state_dict.__module__ == "lorakit.peft_state_dict"
    assert set_peft_model_state_dict.__module__ == "lorakit.peft_state_dict"
