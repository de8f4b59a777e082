"""Session 39's io review fixes (oracles: peft 0.22, transformers 5's ``load_adapter``, the old
files' bytes).

- F1: DoRA magnitudes are written ``<path>.lora_magnitude_vector.weight``. transformers 5's
  ``load_adapter`` maps PEFT's spelling (no ``.weight``) to no parameter and leaves the
  magnitudes at their initial values (logits 0.2 off on a tiny Llama); peft >= 0.12 and lorakit
  read both spellings, and so does lorakit's ``set_peft_model_state_dict`` now, as peft's does.
- F2: a save whose rename fails at any step (the last one, onto ``adapter_config.json``,
  included) leaves the old adapter's two files byte-identical; where they cannot be put back,
  the error names the hidden file holding each.
- F3: ``inspect``'s ``parameters`` leaves out the ``<head>.modules_to_save.*`` /
  ``<head>.original_module.*`` copies that peft writes and loading ignores: peft's trainable count.
"""

from __future__ import annotations

import errno
import json
import os
import re
import warnings
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.errors import UserError
from lorakit.io import load_adapter, save_adapter
from lorakit.io.read import read_adapter
from lorakit.io.summary import summarize_adapter
from tests import tiny_models

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
DORA_TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "c_fc"],
    "bert": ["query", "value"],
}


def _dora(arch: str, seed: int = 3) -> torch.nn.Module:
    """A lorakit DoRA adapter on a tiny ``arch``, every trainable tensor perturbed."""
    fields = dict(r=4, lora_alpha=8, target_modules=DORA_TARGETS[arch], use_dora=True)
    if arch == "bert":
        fields["task_type"] = "SEQ_CLS"
    model = lorakit.inject(tiny_models.BUILDERS[arch](), lorakit.LoraConfig(**fields))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(tiny_models.input_ids()).logits.double()


# ------------------------------------------------------------------------------------- F1
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_a_lorakit_dora_file_loads_right_in_transformers_and_peft(arch, tmp_path) -> None:
    ours = _dora(arch)
    save_adapter(ours, tmp_path)
    expected = _logits(ours)
    plain = tiny_models.BUILDERS[arch]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain.load_adapter(str(tmp_path))  # transformers 5 (with peft 0.22)
        theirs = peft.PeftModel.from_pretrained(tiny_models.BUILDERS[arch](), tmp_path)
    assert (_logits(tiny_models.BUILDERS[arch]()) - expected).abs().max() > 1e-2  # (not base)
    torch.testing.assert_close(_logits(plain), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(theirs), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        _logits(load_adapter(tiny_models.BUILDERS[arch](), tmp_path)), expected
    )


def test_magnitudes_are_written_with_weight_and_held_in_peft_spelling(tmp_path) -> None:
    """In the file ``.lora_magnitude_vector.weight``; in memory (``read_adapter``,
    ``get_peft_model_state_dict``) PEFT's keys, those of peft's own function."""
    ours = _dora("llama")
    save_adapter(ours, tmp_path)
    written = [k for k in load_file(tmp_path / WEIGHTS) if "lora_magnitude_vector" in k]
    assert len(written) == 6 and all(k.endswith(".lora_magnitude_vector.weight") for k in written)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=DORA_TARGETS["llama"], use_dora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_models.llama(), config)
    peft_keys = set(peft.get_peft_model_state_dict(theirs))
    assert set(lorakit.get_peft_model_state_dict(ours)) == peft_keys
    assert set(read_adapter(tmp_path).tensors) == peft_keys
    assert {k.removesuffix(".weight") for k in written} <= peft_keys


@pytest.mark.parametrize("spelling", ["peft", "weight"])
def test_set_peft_model_state_dict_reads_both_spellings_as_peft_does(spelling) -> None:
    ours = _dora("llama", seed=5)
    state = {k: v.clone() for k, v in lorakit.get_peft_model_state_dict(ours).items()}
    if spelling == "weight":
        state = {(k + ".weight" if k.endswith("vector") else k): v for k, v in state.items()}
    fields = dict(r=4, lora_alpha=8, target_modules=DORA_TARGETS["llama"], use_dora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_models.llama(), peft.LoraConfig(**fields))
        peft_result = peft.set_peft_model_state_dict(theirs, state)
    fresh = lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(**fields))
    result = lorakit.set_peft_model_state_dict(fresh, state)
    assert peft_result.unexpected_keys == [] and result.unexpected_keys == []
    torch.testing.assert_close(_logits(theirs), _logits(ours), rtol=0, atol=1e-5)  # the oracle
    torch.testing.assert_close(_logits(fresh), _logits(ours), rtol=0, atol=0)


def test_readers_of_lorakit_files_take_the_written_spelling(tmp_path) -> None:
    """inspect and the serving bank read the new spelling."""
    from lorakit.serve import AdapterBank, prepare_for_serving, routed

    ours = _dora("llama")
    save_adapter(ours, tmp_path / "a")
    summary = summarize_adapter(tmp_path / "a")
    assert summary["dora_magnitude_parameters"] == 2 * (64 + 32 + 64)  # q, v, down x 2 blocks
    assert summary["parameters"] == sum(p.numel() for p in ours.parameters() if p.requires_grad)
    adapter = read_adapter(tmp_path / "a")
    model = tiny_models.llama()
    prepare_for_serving(model, DORA_TARGETS["llama"])
    bank = AdapterBank(model, max_rank=4, capacity=1)
    slot = bank.load("dora", adapter.config, adapter.tensors)
    ids = tiny_models.input_ids()
    with torch.no_grad(), routed(bank, torch.full(ids.shape, slot)):
        served = model(ids).logits.double()
    torch.testing.assert_close(served, _logits(ours), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- F2
def _adapted(alpha: float, seed: int) -> torch.nn.Module:
    config = lorakit.LoraConfig(
        r=4, lora_alpha=alpha, target_modules=["q_proj"], init_lora_weights=False
    )
    torch.manual_seed(seed)
    return lorakit.inject(tiny_models.llama(), config)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _failing_replace(monkeypatch, fail_at: set[int]) -> list[str]:
    """``os.replace`` raising EIO at its calls numbered ``fail_at`` (1: the old config moved
    aside, 2: the weights renamed in, 3: the config renamed in, 4+: putting back)."""
    real, calls = os.replace, []

    def replace(source, destination):
        calls.append(Path(destination).name)
        if len(calls) in fail_at:
            raise OSError(errno.EIO, "Input/output error")
        return real(source, destination)

    monkeypatch.setattr(os, "replace", replace)
    return calls


@pytest.mark.parametrize("step", [1, 2, 3])
@pytest.mark.parametrize("links", [True, False])
def test_a_failed_rename_at_any_step_leaves_the_old_files_byte_identical(
    tmp_path, monkeypatch, step, links
) -> None:
    """``links=False``: a file system without hard links (the old weights kept as a copy)."""
    save_adapter(_adapted(alpha=8, seed=1), tmp_path)
    before = _files(tmp_path)
    if not links:
        monkeypatch.setattr(os, "link", _refuse_link)
    calls = _failing_replace(monkeypatch, {step})
    expected = f"cannot save the adapter in {re.escape(str(tmp_path))}: Input/output error; fix"
    with pytest.raises(UserError, match=expected):
        save_adapter(_adapted(alpha=32, seed=5), tmp_path)
    monkeypatch.undo()
    assert len(calls) >= step and _files(tmp_path) == before  # (no hidden file left either)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "save interrupted" warning: the old pair whole)
        loaded = load_adapter(tiny_models.llama(), tmp_path)
    assert lorakit.adapter_configs(loaded)["default"].lora_alpha == 8


def _refuse_link(source, destination, *args, **kwargs):
    raise OSError(errno.EPERM, "Operation not permitted")


def test_a_failed_last_rename_into_a_new_directory_leaves_no_half_adapter(
    tmp_path, monkeypatch
) -> None:
    _failing_replace(monkeypatch, {2})  # (no old config to move aside: 1 weights, 2 config)
    with pytest.raises(UserError, match="Input/output error"):
        save_adapter(_adapted(alpha=32, seed=5), tmp_path / "new")
    monkeypatch.undo()
    assert list((tmp_path / "new").iterdir()) == []


def test_where_the_old_files_cannot_be_put_back_the_error_names_them(tmp_path, monkeypatch):
    """The config's rename fails and so does every rename after it: the message says what the
    directory holds and where each old file is; renaming those back gives the old bytes."""
    save_adapter(_adapted(alpha=8, seed=1), tmp_path)
    before = _files(tmp_path)
    _failing_replace(monkeypatch, set(range(3, 10)))
    with pytest.raises(UserError) as caught:
        save_adapter(_adapted(alpha=32, seed=5), tmp_path)
    monkeypatch.undo()
    message = str(caught.value)
    assert "putting the old files back failed too" in message
    kept = dict(re.findall(r"(\S+) is [^;]*?; its old one is (\S+?\.tmp)", message))
    assert set(kept) == {WEIGHTS, CONFIG}
    assert (tmp_path / WEIGHTS).read_bytes() != before[WEIGHTS] and not (tmp_path / CONFIG).exists()
    for name, hidden in kept.items():
        os.replace(hidden, tmp_path / name)  # what the message says to do
    assert {k: v for k, v in _files(tmp_path).items() if not k.startswith(".")} == before


def test_without_a_copy_of_the_old_weights_the_error_says_they_are_lost(tmp_path, monkeypatch):
    save_adapter(_adapted(alpha=8, seed=1), tmp_path)
    monkeypatch.setattr(os, "link", _refuse_link)
    monkeypatch.setattr("shutil.copyfile", _refuse_link)
    _failing_replace(monkeypatch, {3})
    with pytest.raises(UserError) as caught:
        save_adapter(_adapted(alpha=32, seed=5), tmp_path)
    monkeypatch.undo()
    assert f"{WEIGHTS} is the new file; its old one is lost (no copy)" in str(caught.value)
    assert json.loads((tmp_path / CONFIG).read_text())["lora_alpha"] == 8  # (put back)


# ------------------------------------------------------------------------------------- F3
@pytest.mark.parametrize(
    ("arch", "fields", "save"),
    [
        ("bert", dict(target_modules=["query"], bias="all", task_type="SEQ_CLS"), {}),
        (
            "llama",
            dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
            dict(save_embedding_layers=True),
        ),
        ("gpt2", dict(target_modules=["c_attn"], bias="all"), {}),
    ],
)
def test_inspect_counts_peft_trainable_parameters(tmp_path, arch, fields, save) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            tiny_models.BUILDERS[arch](), peft.LoraConfig(r=4, lora_alpha=8, **fields)
        )
        theirs.save_pretrained(tmp_path / "peft", **save)
    trainable = theirs.get_nb_trainable_parameters()[0]
    summary = summarize_adapter(tmp_path / "peft")
    assert summary["parameters"] == trainable
    in_file = sum(t.numel() for t in load_file(tmp_path / "peft" / WEIGHTS).values())
    assert summary["file_parameters"] == in_file
    ours = lorakit.inject(tiny_models.BUILDERS[arch](), lorakit.LoraConfig(r=4, **fields))
    save_adapter(ours, tmp_path / "ours")
    assert summarize_adapter(tmp_path / "ours")["parameters"] == trainable
    reloaded = load_adapter(tiny_models.BUILDERS[arch](), tmp_path / "peft")
    assert sum(p.numel() for p in reloaded.parameters() if p.requires_grad) == trainable
