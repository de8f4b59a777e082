"""Bad and broken adapter files: each a specific, readable AdapterFileError, and the model is
left exactly as it was (structure, every tensor, trainability, adapters)."""

from __future__ import annotations

import json
import pickle
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.errors import AdapterFileError
from lorakit.io import load, load_adapter, read_adapter, save_adapter
from tests import tiny_models

CONFIG = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture
def adapter_dir(tmp_path):
    model = lorakit.inject(tiny_models.llama(), CONFIG)
    tiny_models.randomize_adapters(model, std=0.3)
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def _snapshot(model: torch.nn.Module):
    return (
        [(name, type(module)) for name, module in model.named_modules()],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        dict(lorakit.adapter_configs(model)),
        lorakit.active_adapters(model),
    )


def _assert_same(before, after) -> None:
    assert before[0] == after[0]
    assert before[1].keys() == after[1].keys()
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    assert before[2:] == after[2:]


def _models():
    """A plain model, and one that already has another adapter (on other modules)."""
    with_other = lorakit.inject(
        tiny_models.llama(), lorakit.LoraConfig(r=2, target_modules=["k_proj"]), "other"
    )
    return [tiny_models.llama(), with_other]


def _refused(directory, match: str) -> None:
    for model in _models():
        before = _snapshot(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(AdapterFileError, match=match):
                load_adapter(model, directory)
        _assert_same(before, _snapshot(model))


def _edit_config(directory, **changes) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text()) | changes
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _rewrite_weights(directory, change, keep_config_copy: bool = False) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    if not keep_config_copy:
        metadata.pop("lorakit.adapter_config")
    change(tensors)
    save_file(tensors, path, metadata=metadata)


class _Trap:
    """Unpickling this creates a marker file: proof that a pickle was (not) opened."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_adapter_is_never_unpickled_and_the_error_says_how_to_convert(tmp_path) -> None:
    directory = tmp_path / "old"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
    )
    marker = tmp_path / "UNPICKLED"
    (directory / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Trap(marker)}))
    _refused(directory, r"never unpickles.*weights_only=True.*save_file")
    assert not marker.exists()


@pytest.mark.parametrize("keep", [4, 100, 0.5])
def test_truncated_safetensors(adapter_dir, keep) -> None:
    path = adapter_dir / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    _refused(adapter_dir, "not a valid safetensors file.*truncated or corrupted")


def test_corrupted_safetensors_header(adapter_dir) -> None:
    path = adapter_dir / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"#" * 12
    path.write_bytes(bytes(data))
    _refused(adapter_dir, "header is not JSON")


def test_unparsable_json_config(adapter_dir) -> None:
    (adapter_dir / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')
    _refused(adapter_dir, r"adapter_config.json is not valid JSON")


def test_unknown_peft_type(adapter_dir) -> None:
    _edit_config(adapter_dir, peft_type="PREFIX_TUNING")
    _refused(adapter_dir, r"peft_type='PREFIX_TUNING'.*LoRA adapters only")


def test_unsupported_peft_feature(adapter_dir) -> None:
    _edit_config(adapter_dir, alora_invocation_tokens=[5, 6])
    _refused(adapter_dir, r"alora_invocation_tokens=\[5, 6\].*lorakit cannot load")


def test_lora_bias_config_without_its_bias_tensors(adapter_dir) -> None:
    _edit_config(adapter_dir, lora_bias=True)
    _rewrite_weights(adapter_dir, lambda tensors: None)  # drop lorakit's copy of the config
    _refused(adapter_dir, r"lora_B\.bias")


def test_base_changing_inits_lorakit_lacks_are_refused(adapter_dir) -> None:
    _edit_config(adapter_dir, init_lora_weights="corda")  # PiSSA/OLoRA load: test_init_pissa_olora
    _rewrite_weights(adapter_dir, lambda tensors: None)
    _refused(adapter_dir, r"init_lora_weights='corda'.*changes the base weights")


def test_rank_disagreeing_with_tensor_shapes(adapter_dir) -> None:
    _edit_config(adapter_dir, r=8)
    _rewrite_weights(adapter_dir, lambda tensors: None)  # drop lorakit's copy of the config
    _refused(adapter_dir, r"rank r=8 for model\.layers\.0\.self_attn\.q_proj.*has rank 4")


def test_non_finite_weights(adapter_dir) -> None:
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    _rewrite_weights(adapter_dir, lambda t: t[key].__setitem__((0, 0), float("nan")))
    _refused(adapter_dir, r"layers\.1\.self_attn\.q_proj\.lora_A\.weight holds inf/NaN")


def test_failure_after_injection_rolls_everything_back(adapter_dir, monkeypatch) -> None:
    """Even a failure in the middle of copying (after injection) leaves no trace."""
    model = lorakit.inject(
        tiny_models.bert(),
        lorakit.LoraConfig(r=4, target_modules=["query"], bias="all", task_type="SEQ_CLS"),
    )
    tiny_models.randomize_adapters(model, std=0.3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(getattr(module, "bias", None), torch.nn.Parameter):
                module.bias.add_(0.5)  # trained biases, saved with bias="all"
    save_adapter(model, adapter_dir.parent / "bert")
    calls = []
    real = load.model_tensor

    def failing(*args):
        calls.append(1)
        if len(calls) > 10:  # after the LoRA tensors and some biases were copied
            raise RuntimeError("simulated failure while copying")
        return real(*args)

    monkeypatch.setattr(load, "model_tensor", failing)
    base = tiny_models.bert()
    before = _snapshot(base)
    with pytest.raises(RuntimeError, match="simulated"):
        load_adapter(base, adapter_dir.parent / "bert")
    _assert_same(before, _snapshot(base))
    # Beside another bias-training adapter a bias adapter is refused before any change (as PEFT
    # refuses it: both would train the same base biases).
    other = lorakit.inject(
        tiny_models.bert(), lorakit.LoraConfig(r=2, target_modules=["key"], bias="all"), "other"
    )
    before = _snapshot(other)
    calls.clear()
    with pytest.raises(ValueError, match="bias='none'"):
        load_adapter(other, adapter_dir.parent / "bert")
    assert not calls
    _assert_same(before, _snapshot(other))


def test_unknown_config_keys_are_ignored_with_a_warning(adapter_dir) -> None:
    _edit_config(adapter_dir, shiny_new_option=3)
    _rewrite_weights(adapter_dir, lambda tensors: None)
    model = tiny_models.llama()
    with pytest.warns(UserWarning, match=r"ignoring keys.*shiny_new_option"):
        load_adapter(model, adapter_dir)
    assert lorakit.active_adapters(model) == ("default",)


def test_config_and_weights_from_different_saves_use_the_weights_own_config(tmp_path) -> None:
    """A save interrupted between the two renames: new weights (r=2), old config (r=4)."""
    model = lorakit.inject(
        tiny_models.llama(),
        lorakit.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"]),
    )
    tiny_models.randomize_adapters(model, std=0.3)
    save_adapter(model, tmp_path)
    _edit_config(tmp_path, r=4, lora_alpha=8)
    with pytest.warns(UserWarning, match="does not match the config saved with the weights"):
        adapter = read_adapter(tmp_path)
    assert (adapter.config.r, adapter.config.lora_alpha) == (2, 3)
    _edit_config(tmp_path, r=2, lora_alpha=3, base_model_name_or_path="/models/base")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a hand edit that keeps the numbers: no warning
        assert read_adapter(tmp_path).config.base_model_name_or_path == "/models/base"
