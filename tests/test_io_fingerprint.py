"""The base-model fingerprint: stored where peft still loads the file, checked on load."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.errors import AdapterFileError, BaseModelMismatchError
from lorakit.io import base_verdicts, fingerprint, load_adapter, read_adapter, save_adapter
from tests import tiny_models

QV = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _saved(tmp_path, base=None, config=QV):
    model = lorakit.inject(base if base is not None else tiny_models.llama(), config)
    tiny_models.randomize_adapters(model, std=0.3)
    save_adapter(model, tmp_path)
    return model


def _logits(model):
    with torch.no_grad():
        return model(tiny_models.input_ids()).logits


def test_fingerprint_lives_in_the_header_and_peft_still_loads_the_file(tmp_path) -> None:
    ours = _saved(tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as handle:
        stored = json.loads(handle.metadata()[fingerprint.METADATA_KEY])
    assert sorted(stored["modules"]) == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_models.llama(), tmp_path)
    assert (_logits(ours) - _logits(theirs)).abs().max().item() <= 1e-5


def test_same_shapes_different_weights_is_refused_naming_module_and_override(tmp_path) -> None:
    _saved(tmp_path)
    other = tiny_models.llama(seed=1)  # same architecture, another checkpoint
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(BaseModelMismatchError) as caught:
        load_adapter(other, tmp_path)
    message = str(caught.value)
    assert "'model.layers.0.self_attn.q_proj'" in message
    assert "allow_base_mismatch=True" in message
    assert not lorakit.adapter_configs(other)
    assert before.keys() == other.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    with pytest.warns(UserWarning, match="loaded anyway") as caught:
        load_adapter(other, tmp_path, allow_base_mismatch=True)
    assert caught[0].filename == __file__  # the warning points at the caller's line
    assert lorakit.active_adapters(other) == ("default",)


def test_a_small_change_to_one_adapted_weight_is_caught_and_named(tmp_path) -> None:
    _saved(tmp_path)
    tuned = tiny_models.llama()
    with torch.no_grad():  # a "fine-tuned" base: tiny changes, one module only
        weight = tuned.model.layers[1].self_attn.v_proj.weight
        weight.add_(1e-4 * torch.randn_like(weight))
    with pytest.raises(BaseModelMismatchError, match=r"'model\.layers\.1\.self_attn\.v_proj'"):
        load_adapter(tuned, tmp_path)


@pytest.mark.parametrize(
    ("saved_dtype", "loaded_dtype"),
    [
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float16),
        (torch.float16, torch.bfloat16),
    ],
)
def test_the_same_checkpoint_in_another_dtype_matches(saved_dtype, loaded_dtype, tmp_path) -> None:
    _saved(tmp_path, base=tiny_models.llama().to(saved_dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no mismatch warning either
        load_adapter(tiny_models.llama().to(loaded_dtype), tmp_path)
    with pytest.raises(BaseModelMismatchError):
        load_adapter(tiny_models.llama(seed=1).to(loaded_dtype), tmp_path)


def test_fingerprint_is_taken_from_the_original_weights_of_a_merged_model(tmp_path) -> None:
    model = lorakit.inject(tiny_models.llama(), QV)
    tiny_models.randomize_adapters(model, std=0.3)
    save_adapter(model, tmp_path / "unmerged")
    lorakit.merge(model)
    save_adapter(model, tmp_path / "merged")
    assert (
        read_adapter(tmp_path / "merged").fingerprint
        == read_adapter(tmp_path / "unmerged").fingerprint
    )
    load_adapter(tiny_models.llama(), tmp_path / "merged")  # accepted on the original base
    with pytest.raises(BaseModelMismatchError):  # a model with the adapter merged is another base
        load_adapter(lorakit.merge_and_unload(model), tmp_path / "merged", "again")


def test_the_fingerprint_catches_a_different_checkpoint_at_every_module() -> None:
    """Property of the sampling: every module of an independently initialised model differs."""
    one, two = tiny_models.llama(seed=0), tiny_models.llama(seed=1)
    names = [n for n, m in one.named_modules() if isinstance(m, torch.nn.Linear)]
    stored = fingerprint.compute(one, names)
    assert all(fingerprint.first_mismatch(one, stored, [n]) is None for n in names)
    assert all(fingerprint.first_mismatch(two, stored, [n]) is not None for n in names)


def _rewrite(path, change) -> None:
    tensors = load_file(path)
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    change(tensors)
    save_file(tensors, path, metadata=metadata)


def test_missing_unexpected_and_misshapen_tensors_are_errors_naming_keys(tmp_path) -> None:
    _saved(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    original = weights.read_bytes()

    _rewrite(weights, lambda t: t.pop(key))
    with pytest.raises(
        AdapterFileError, match=r"lacks tensors.*layers\.1\.self_attn\.v_proj\.lora_B"
    ):
        load_adapter(tiny_models.llama(), tmp_path)

    weights.write_bytes(original)
    extra = "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"
    _rewrite(weights, lambda t: t.update({extra: torch.ones(4, 64)}))
    with pytest.raises(AdapterFileError, match=r"fit no module.*mlp\.up_proj\.lora_A"):
        load_adapter(tiny_models.llama(), tmp_path)

    weights.write_bytes(original)
    _rewrite(weights, lambda t: t.update({key: torch.ones(33, 4)}))
    with pytest.raises(AdapterFileError, match=r"v_proj.lora_B.weight has shape \[33, 4\]"):
        load_adapter(tiny_models.llama(), tmp_path)


def test_peft_files_without_fingerprint_load_with_a_note(tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            tiny_models.llama(), peft.LoraConfig(r=2, target_modules=["q_proj"])
        )
        theirs.save_pretrained(tmp_path)
    assert read_adapter(tmp_path).fingerprint is None
    with pytest.warns(UserWarning, match="cannot verify it was trained on this base"):
        load_adapter(tiny_models.llama(seed=1), tmp_path)


@pytest.mark.integration
def test_smollm2_adapter_round_trip_and_fingerprint_cost(tmp_path) -> None:
    """The real 135M model: the fingerprint of all 210 linear layers is a fixed 64 samples per
    module whatever its size (its cost does not grow with the model: 5-15 ms measured for all
    210 after a process's first call, on 2 shared cores; no timing asserted here), the config lists PEFT's condensed
    suffixes, and the adapter reloads onto a fresh copy."""
    import base64
    import copy

    from lorakit.models import load_model

    model, _ = load_model()
    fresh = copy.deepcopy(model)
    lorakit.inject(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    tiny_models.randomize_adapters(model, std=0.02)
    names = [name for name, _ in lorakit.state.lora_layers(model)]
    stored = fingerprint.compute(model, names)
    assert len(stored) == 210
    sizes = {len(base64.b64decode(entry["values"])) for entry in stored.values()}
    assert sizes == {4 * fingerprint.SAMPLES}  # 64 float32 samples, for 576x576 and 1536x576
    save_adapter(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert written == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    load_adapter(fresh, tmp_path)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


def test_loading_and_serving_refuse_another_base_with_one_message(tmp_path, caplog) -> None:
    from lorakit.serve.registry import check_base

    _saved(tmp_path)
    other = tiny_models.llama(seed=1)
    with pytest.raises(BaseModelMismatchError) as loading:
        load_adapter(other, tmp_path)
    with pytest.raises(BaseModelMismatchError) as serving:
        check_base(other, read_adapter(tmp_path), allow_base_mismatch=False)
    # the same finding, each path with its own remedy
    found = str(loading.value).split(" Load it onto")[0]
    assert found.endswith(
        "does not match the fingerprint saved with the adapter (sampled weights differ)."
    )
    assert str(serving.value) == (
        f"{found} Serve it with its own base model, or start the server with --allow-base-mismatch."
    )
    with caplog.at_level("WARNING", logger="lorakit.serve.registry"):
        check_base(other, read_adapter(tmp_path), allow_base_mismatch=True)
    assert caplog.messages == [f"{found} Serving it anyway (--allow-base-mismatch)."]


def test_refuse_other_base_checks_nothing_without_a_fingerprint_and_passes_the_right_base(
    tmp_path,
) -> None:
    model = _saved(tmp_path)
    stored = read_adapter(tmp_path).fingerprint
    names = sorted(stored)
    refuse = base_verdicts.refuse_other_base
    assert refuse(model, stored, tmp_path, names, allow_mismatch=False, remedy="-") is None
    other = tiny_models.llama(seed=1)
    assert refuse(other, None, tmp_path, names, allow_mismatch=False, remedy="-") is None
    message = refuse(other, stored, tmp_path, names, allow_mismatch=True, remedy="do X.")
    assert message is not None and message.startswith(f"adapter {tmp_path} was trained on")
    with pytest.raises(BaseModelMismatchError, match=r"\)\. do X\.$"):
        refuse(other, stored, tmp_path, names, allow_mismatch=False, remedy="do X.")
