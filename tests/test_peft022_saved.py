"""peft 0.22's ``modules_to_save`` / task-head / token-key rules, with the real ``peft`` as the
oracle under 0.21.2 and 0.22.0 alike:

1. a ``modules_to_save`` entry picks a module whose name is the entry or ends with
   ``"." + entry`` (``"norm"``: Llama's ``model.norm`` only); ``SEQ_CLS`` records
   ``pre_classifier`` among its heads;
2. a file of peft < 0.22 (``peft_version``), whose rule was any plain-string ending, loads as
   its writer meant: ``"norm"`` copies of every layer norm, the token key ``"tokens"`` for
   ``model.embed_tokens`` (a file without ``peft_version`` is read by its tensors); a 0.22
   file with ``"norm"`` loads ``model.norm`` only;
3. lorakit writes such an entry as the full names it picks, which peft reads alike before and
   after 0.22.

Under peft 0.21 the 0.21 files are written by peft itself; under 0.22 they are made by peft
0.22 from the full names 0.21 picked, the config then written as 0.21 writes it (same tensor
keys: they follow the module paths). Expected outputs: the writing peft model's logits.
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch

import lorakit
from lorakit.errors import AdapterFileError
from lorakit.io.older_peft_files import written_with_plain_endings
from lorakit.state import saved_modules
from tests import tiny_models
from tests.peft_versions import peft_saved_names_end_at_a_dot, peft_task_heads

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NORMS = [
    "model.layers.0.input_layernorm",
    "model.layers.0.post_attention_layernorm",
    "model.layers.1.input_layernorm",
    "model.layers.1.post_attention_layernorm",
    "model.norm",
]
"""What peft 0.21 picked with ``modules_to_save=["norm"]`` on the tiny Llama."""
FIELDS = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _quiet(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tiny_models.input_ids()).logits


def _trained_peft(**fields) -> peft.PeftModel:
    """peft's model for ``fields`` with every trainable tensor moved off its start (B, the
    saved copies and token rows included), in eval mode."""
    model = _quiet(lambda: peft.get_peft_model(tiny_models.llama(), peft.LoraConfig(**fields)))
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval()


def _rewrite_config(directory, **changes) -> None:
    path = directory / "adapter_config.json"
    values = json.loads(path.read_text()) | changes
    path.write_text(json.dumps({k: v for k, v in values.items() if v is not None}))


def _peft021_file(directory, entry_fields: dict, as_021: dict) -> torch.Tensor:
    """A file as peft 0.21.2 writes it for ``FIELDS | as_021`` (written by it when installed,
    else by peft 0.22 from ``entry_fields``, the full names 0.21 picked); its logits."""
    if not peft_saved_names_end_at_a_dot():
        model = _trained_peft(**FIELDS, **as_021)
        model.save_pretrained(directory)
        assert json.loads((directory / "adapter_config.json").read_text())["peft_version"] < "0.22"
        return _logits(model)
    model = _trained_peft(**FIELDS, **entry_fields)
    model.save_pretrained(directory)
    _rewrite_config(directory, peft_version="0.21.2", **as_021)
    return _logits(model)


# ---------------------------------------------------------------- 1. the rule and the heads
def test_a_modules_to_save_entry_picks_dotted_name_endings_as_peft_022() -> None:
    ours = lorakit.get_peft_model(
        tiny_models.llama(), lorakit.LoraConfig(**FIELDS, modules_to_save=["norm"])
    )
    assert [name for name, _ in saved_modules(ours.model)] == ["model.norm"]
    theirs = _trained_peft(**FIELDS, modules_to_save=["norm"])
    wrapped = sorted(
        n.removeprefix("base_model.model.")
        for n, m in theirs.named_modules()
        if type(m).__name__ == "ModulesToSaveWrapper"
    )
    assert wrapped == (["model.norm"] if peft_saved_names_end_at_a_dot() else NORMS)
    if peft_saved_names_end_at_a_dot():
        assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_seq_cls_records_pre_classifier_among_its_heads_as_peft_022() -> None:
    fields = dict(r=4, target_modules=["query"], task_type="SEQ_CLS")
    ours = lorakit.get_peft_model(tiny_models.bert(), lorakit.LoraConfig(**fields))
    theirs = _quiet(lambda: peft.get_peft_model(tiny_models.bert(), peft.LoraConfig(**fields)))
    heads = ["classifier", "score", "pre_classifier"]
    assert ours.peft_config["default"].modules_to_save == heads
    assert theirs.peft_config["default"].modules_to_save == peft_task_heads("SEQ_CLS")
    assert peft_task_heads("SEQ_CLS") == heads or not peft_saved_names_end_at_a_dot()


# ---------------------------------------------------------------- 2. files of peft < 0.22
def test_a_peft_021_file_with_a_plain_ending_entry_loads_every_copy_it_holds(tmp_path) -> None:
    expected = _peft021_file(tmp_path, {"modules_to_save": NORMS}, {"modules_to_save": ["norm"]})
    loaded = _quiet(lambda: lorakit.PeftModel.from_pretrained(tiny_models.llama(), tmp_path))
    assert sorted(name for name, _ in saved_modules(loaded.model)) == NORMS
    torch.testing.assert_close(_logits(loaded.eval()), expected, rtol=0, atol=1e-6)
    _rewrite_config(tmp_path, peft_version=None)  # no version (lorakit, peft < 0.18): tensors
    again = _quiet(lambda: lorakit.PeftModel.from_pretrained(tiny_models.llama(), tmp_path))
    torch.testing.assert_close(_logits(again.eval()), expected, rtol=0, atol=1e-6)


def test_a_peft_021_file_with_a_bare_ending_token_key_loads_as_peft_021_applied_it(
    tmp_path,
) -> None:
    full = {"trainable_token_indices": {"model.embed_tokens": [3, 5]}}
    bare = {"trainable_token_indices": {"tokens": [3, 5]}}
    expected = _peft021_file(tmp_path, full, bare)
    loaded = _quiet(lambda: lorakit.PeftModel.from_pretrained(tiny_models.llama(), tmp_path))
    assert loaded.peft_config["default"].trainable_token_indices == {"model.embed_tokens": [3, 5]}
    torch.testing.assert_close(_logits(loaded.eval()), expected, rtol=0, atol=1e-6)
    _rewrite_config(tmp_path, peft_version="0.22.0")  # 0.22's rule: "tokens" names no module
    with pytest.raises(AdapterFileError, match="key 'tokens' matches no module"):
        lorakit.PeftModel.from_pretrained(tiny_models.llama(), tmp_path)


def test_a_peft_022_file_with_norm_loads_model_norm_only(tmp_path) -> None:
    theirs = _trained_peft(**FIELDS, modules_to_save=["model.norm"])
    theirs.save_pretrained(tmp_path)
    _rewrite_config(tmp_path, peft_version="0.22.0", modules_to_save=["norm"])
    loaded = _quiet(lambda: lorakit.PeftModel.from_pretrained(tiny_models.llama(), tmp_path))
    assert [name for name, _ in saved_modules(loaded.model)] == ["model.norm"]
    torch.testing.assert_close(_logits(loaded.eval()), _logits(theirs), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("text", "old"),
    [
        ('{"peft_version": "0.21.2"}', True),
        ('{"peft_version": "0.17.0@abc"}', True),
        ('{"peft_version": "0.22.0"}', False),
        ('{"peft_version": "1.0.0"}', False),
        ('{"peft_version": "0.22.0.dev0@abc"}', None),
        ("{}", None),
    ],
)
def test_the_writers_rule_is_read_from_peft_version(text, old) -> None:
    assert written_with_plain_endings(text) is old


# ---------------------------------------------------------------- 3. files peft reads alike
def test_lorakit_writes_an_entry_as_the_names_it_picks_and_peft_reads_them(tmp_path) -> None:
    ours = lorakit.get_peft_model(
        tiny_models.llama(), lorakit.LoraConfig(**FIELDS, modules_to_save=["norm"])
    )
    tiny_models.randomize_adapters(ours.model, std=0.2)
    with torch.no_grad():
        ours.model.model.norm.modules_to_save["default"].weight.add_(0.5)
    ours.eval().save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["modules_to_save"] == ["model.norm"]
    by_peft = _quiet(lambda: peft.PeftModel.from_pretrained(tiny_models.llama(), tmp_path))
    torch.testing.assert_close(_logits(by_peft.eval()), _logits(ours), rtol=0, atol=1e-6)
    assert not torch.allclose(_logits(ours), _logits(tiny_models.llama().eval()), atol=1e-3)
