"""PEFT's selection and file rules that lorakit follows, with the real ``peft`` as the oracle:
``modules_to_save`` picked by a dotted name suffix (SEQ_CLS heads included; peft 0.22's rule),
a full module name in ``target_modules`` adapted whatever ``layers_to_transform`` says, the
adapter name not picking a subdirectory on load (``subfolder`` does), ``save_embedding_layers="auto"``, and
PiSSA / OLoRA files saved without conversion (the init reruns on load)."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import DistilBertConfig, DistilBertForSequenceClassification

import lorakit
from lorakit.errors import AdapterFileError
from lorakit.state import lora_layers, saved_modules
from tests import tiny_models
from tests.peft_versions import peft_saved_names_end_at_a_dot

LLAMA_FIELDS = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _distilbert(seed: int = 0) -> DistilBertForSequenceClassification:
    torch.manual_seed(seed)
    config = DistilBertConfig(
        vocab_size=128,
        dim=32,
        n_layers=1,
        n_heads=2,
        hidden_dim=48,
        max_position_embeddings=32,
        dropout=0.0,
        attention_dropout=0.0,
        seq_classif_dropout=0.0,
    )
    return DistilBertForSequenceClassification(config).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _peft(base, **fields):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, peft.LoraConfig(**fields))


def _peft_load(base, directory, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, directory, **options)


def _lorakit_load(base, directory, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's files carry no base fingerprint
        return lorakit.PeftModel.from_pretrained(base, directory, **options)


def _peft_wrapped(model) -> list[str]:
    return sorted(
        name.removeprefix("base_model.model.")
        for name, module in model.named_modules()
        if type(module).__name__ == "ModulesToSaveWrapper"
    )


def _randomize_peft(model, seed: int = 5, std: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * std)


CASES = {
    "distilbert_seq_cls": (
        _distilbert,
        dict(r=2, lora_alpha=4, target_modules=["q_lin", "v_lin"], task_type="SEQ_CLS"),
    ),
    "llama_norm": (tiny_models.llama, dict(**LLAMA_FIELDS, modules_to_save=["norm"])),
}


# What each case's modules_to_save picks by peft 0.22's rule, lorakit's (peft 0.21's plain-string
# endings also picked every *_layernorm for "norm"; its file still loads as written).
PICKED = {"distilbert_seq_cls": ["classifier", "pre_classifier"], "llama_norm": ["model.norm"]}


@pytest.mark.parametrize("case", sorted(CASES))
def test_modules_to_save_picks_peft_dotted_suffixes_and_files_move_both_ways(case, tmp_path):
    build, fields = CASES[case]
    theirs = _peft(build(), **copy.deepcopy(fields))
    ours = lorakit.get_peft_model(build(), lorakit.LoraConfig(**copy.deepcopy(fields)))
    assert [name for name, _ in sorted(saved_modules(ours.model))] == PICKED[case]
    if peft_saved_names_end_at_a_dot() or case == "distilbert_seq_cls":
        assert _peft_wrapped(theirs) == PICKED[case]
    ids = tiny_models.input_ids(length=8)
    _randomize_peft(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = _lorakit_load(build(), tmp_path / "theirs")
    torch.testing.assert_close(_logits(loaded, ids), _logits(theirs, ids), rtol=0, atol=1e-6)
    tiny_models.randomize_adapters(ours.model)
    for _, wrapper in saved_modules(ours.model):
        with torch.no_grad():
            for parameter in wrapper.modules_to_save["default"].parameters():
                parameter.add_(0.1)
    ours.eval()
    ours.save_pretrained(tmp_path / "ours")
    back = _peft_load(build(), tmp_path / "ours")
    torch.testing.assert_close(_logits(back, ids), _logits(ours, ids), rtol=0, atol=1e-6)


def test_a_full_name_in_target_modules_ignores_layers_to_transform(tmp_path):
    fields = dict(
        r=4,
        lora_alpha=8,
        target_modules=["model.layers.0.self_attn.q_proj", "v_proj"],
        layers_to_transform=[1],
    )
    theirs = _peft(tiny_models.llama(), **copy.deepcopy(fields))
    ours = lorakit.get_peft_model(tiny_models.llama(), lorakit.LoraConfig(**fields))
    expected = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert [name for name, _ in lora_layers(ours.model)] == expected
    assert sorted(theirs.targeted_module_names) == expected
    _randomize_peft(theirs)
    theirs.save_pretrained(tmp_path)
    loaded = _lorakit_load(tiny_models.llama(), tmp_path)
    ids = tiny_models.input_ids()
    torch.testing.assert_close(_logits(loaded, ids), _logits(theirs, ids), rtol=0, atol=1e-6)


def _two_adapters(tmp_path):
    """A directory holding "default" (r=4) and, in ``other/``, "other" (r=2)."""
    model = lorakit.get_peft_model(tiny_models.llama(), lorakit.LoraConfig(**LLAMA_FIELDS))
    model.add_adapter("other", lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    tiny_models.randomize_adapters(model.model)
    model.save_pretrained(tmp_path)
    return tmp_path


def test_adapter_name_does_not_pick_a_subdirectory_but_subfolder_does(tmp_path):
    directory = _two_adapters(tmp_path)
    for options, rank in ((dict(), 4), (dict(subfolder="other"), 2)):
        theirs = _peft_load(tiny_models.llama(), directory, adapter_name="other", **options)
        ours = _lorakit_load(tiny_models.llama(), directory, adapter_name="other", **options)
        assert ours.peft_config["other"].r == theirs.peft_config["other"].r == rank
        ids = tiny_models.input_ids()
        torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), rtol=0, atol=1e-6)
    ours = _lorakit_load(tiny_models.llama(), directory)
    ours.load_adapter(directory, "other", subfolder="other")
    assert ours.peft_config["other"].r == 2


def test_where_peft_finds_no_adapter_the_named_subdirectory_is_read(tmp_path):
    """Only where PEFT would find nothing (no adapter at the root) is ``DIR/<name>`` taken."""
    directory = _two_adapters(tmp_path / "root") / "other"
    (directory.parent / "adapter_config.json").unlink()
    model = lorakit.load_adapter(tiny_models.llama(), directory.parent, "other")
    assert lorakit.adapter_configs(model)["other"].r == 2
    with pytest.raises(AdapterFileError, match="nor in") as refused:
        lorakit.load_adapter(tiny_models.llama(), directory.parent, "third")
    assert f"adapters in subdirectories ({directory}" in str(refused.value)  # what to pass
    assert "adapter_name=<name>" in str(refused.value)


@pytest.mark.parametrize(
    "target_modules", [["q_proj", "v_proj"], ["q_proj", "embed_tokens"], ".*embed_tokens"]
)
def test_save_embedding_layers_auto_saves_what_peft_saves(target_modules, tmp_path):
    fields = dict(r=2, lora_alpha=4, target_modules=target_modules)
    theirs = _peft(tiny_models.llama(), **copy.deepcopy(fields))
    ours = lorakit.get_peft_model(tiny_models.llama(), lorakit.LoraConfig(**fields))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "theirs", save_embedding_layers="auto")
    ours.save_pretrained(tmp_path / "ours", save_embedding_layers="auto")
    theirs_keys = set(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    ours_keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert ours_keys == theirs_keys


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_pissa_olora_file_reruns_the_init_on_the_original_base(init, tmp_path):
    theirs = _peft(tiny_models.llama(), **LLAMA_FIELDS, init_lora_weights=init)
    _randomize_peft(theirs, std=0.01)
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    ids = tiny_models.input_ids()
    expected = _logits(_peft_load(tiny_models.llama(), tmp_path), ids)
    torch.testing.assert_close(_logits(theirs, ids), expected, rtol=0, atol=1e-6)
    ours = _lorakit_load(tiny_models.llama(), tmp_path)
    torch.testing.assert_close(_logits(ours, ids), expected, rtol=0, atol=1e-6)


def test_a_randomised_pissa_file_is_refused_before_any_change(tmp_path):
    theirs = _peft(tiny_models.llama(), **LLAMA_FIELDS, init_lora_weights="pissa_niter_2")
    theirs.save_pretrained(tmp_path)
    model = tiny_models.llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(AdapterFileError, match="path_initial_model_for_weight_conversion"):
        _lorakit_load(model, tmp_path)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_all_linear_leaves_the_modules_copied_whole_and_the_file_loads_both_ways(tmp_path):
    """DistilBERT SEQ_CLS with all-linear: ``pre_classifier`` is copied whole (PEFT's suffix
    rule), so no LoRA goes inside it (a file with LoRA in it and no weight loaded nowhere)."""
    model = lorakit.inject(
        _distilbert(), lorakit.LoraConfig(task_type="SEQ_CLS", r=2, target_modules="all-linear")
    )
    tiny_models.randomize_adapters(model, std=0.3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(0.1)
    assert not any("pre_classifier" in name for name, _ in lora_layers(model))
    ids = torch.tensor([[1, 5, 9, 3]])
    expected = model(ids).logits
    lorakit.save_adapter(model, tmp_path)
    reloaded = lorakit.load_adapter(_distilbert(), tmp_path)
    torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=1e-6)
    theirs = _peft_load(_distilbert(), tmp_path)
    torch.testing.assert_close(theirs(ids).logits, expected, rtol=0, atol=1e-6)
