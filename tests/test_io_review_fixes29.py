"""Review fixes (round 29) of ``lorakit.io`` loading.

1. An adapter loads onto a model where another adapter is merged into the same modules: the
   base fingerprint is compared with the layer's ORIGINAL weight ``W0`` (what a save
   fingerprints), not with the merged ``W0 + s B A`` the wrapped ``nn.Linear`` holds; a merged
   model whose original base differs is still refused.
2. The conversion command in the refusal of an ``adapter_model.bin`` survives any path: quotes,
   ``$(...)`` and backticks in it are neither syntax nor shell code.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.errors import AdapterFileError, BaseModelMismatchError
from lorakit.io import load_adapter, save_adapter
from lorakit.quantized import int8_rows
from lorakit.state import lora_layers
from tests import tiny_models

TARGETS = ["q_proj", "v_proj"]
Q_PROJ = "model.layers.0.self_attn.q_proj"


def _two_adapters(base: torch.nn.Module, directory) -> torch.nn.Module:
    """``base`` with adapters "default" (r 4) and "B" (r 2) on ``TARGETS``, random non-zero
    factors, both active; saved to ``directory`` and ``directory/B``."""
    model = lorakit.inject(base, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    lorakit.inject(model, lorakit.LoraConfig(r=2, lora_alpha=6, target_modules=TARGETS), "B")
    tiny_models.randomize_adapters(model, std=0.3)
    save_adapter(model, directory)
    save_adapter(model, directory, "B")
    lorakit.set_active(model, ["default", "B"])
    return model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(tiny_models.input_ids()).logits


def _load_b_without_warnings(model: torch.nn.Module, directory) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "loaded anyway" nor "cannot verify" warning either
        load_adapter(model, directory, "B", subfolder="B")


def test_an_adapter_loads_onto_a_model_with_another_adapter_merged_into_its_modules(tmp_path):
    reference = _two_adapters(tiny_models.llama(), tmp_path / "adapters")
    want = _logits(reference)
    model = load_adapter(tiny_models.llama(), tmp_path / "adapters")
    lorakit.merge(model, ["default"])
    layer = model.get_submodule(Q_PROJ)
    W0 = tiny_models.llama().get_submodule(Q_PROJ).weight.detach()
    assert layer.merged_adapters == ("default",) and not torch.equal(layer.base_layer.weight, W0)

    _load_b_without_warnings(model, tmp_path / "adapters")
    lorakit.set_active(model, ["default", "B"])
    assert layer.merged_adapters == ("default",)  # the load left the merge alone
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=1e-5)

    # The layer's output against the float64 formula x W0^T + sum_a s_a (x A_a^T) B_a^T.
    assert layer.base_layer.bias is None
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    expected = x.double() @ W0.double().T
    for name in ("default", "B"):
        A, B = (p.detach().double() for p in layer.adapter_parameters(name))
        expected = expected + layer.scalings[name] * (x.double() @ A.T) @ B.T
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), expected, rtol=0, atol=1e-5)
    lorakit.unmerge(model)
    assert torch.equal(layer.base_layer.weight, W0)  # the original Parameter, bit-identical


def test_a_merged_model_whose_original_base_differs_is_still_refused(tmp_path):
    _two_adapters(tiny_models.llama(), tmp_path / "adapters")
    with pytest.warns(UserWarning, match="loaded anyway"):
        other = load_adapter(
            tiny_models.llama(seed=1), tmp_path / "adapters", allow_base_mismatch=True
        )
    lorakit.merge(other, ["default"])
    with pytest.raises(BaseModelMismatchError, match="trained on different base weights"):
        load_adapter(other, tmp_path / "adapters", "B", subfolder="B")

    # The merged weights made equal to the adapter's base, the original ones still another
    # model's: refused (the original weights are what the adapter must fit).
    base = tiny_models.llama()
    with torch.no_grad():
        for path, layer in lora_layers(other):
            layer.base_layer.weight.copy_(base.get_submodule(path).weight)
    with pytest.raises(BaseModelMismatchError, match=r"module '.*' does not match"):
        load_adapter(other, tmp_path / "adapters", "B", subfolder="B")
    assert list(lorakit.adapter_configs(other)) == ["default"]  # left unchanged


def test_a_quantized_base_with_a_merged_adapter_takes_another_and_refuses_another_base(tmp_path):
    def quantized(seed: int) -> torch.nn.Module:
        model = tiny_models.llama(seed)
        int8_rows.quantize_linears(model)
        return model

    want = _logits(_two_adapters(quantized(0), tmp_path / "adapters"))
    model = load_adapter(quantized(0), tmp_path / "adapters")
    lorakit.merge(model, ["default"])
    _load_b_without_warnings(model, tmp_path / "adapters")
    lorakit.set_active(model, ["default", "B"])
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=1e-4)

    with pytest.warns(UserWarning, match="loaded anyway"):
        other = load_adapter(quantized(1), tmp_path / "adapters", allow_base_mismatch=True)
    lorakit.merge(other, ["default"])
    with pytest.raises(BaseModelMismatchError, match="sampled weights differ"):
        load_adapter(other, tmp_path / "adapters", "B", subfolder="B")


HOSTILE_NAME = 'Bob\'s "adapter" $(touch PWNED) `touch PWNED2` $HOME'


def test_the_pickle_conversion_command_survives_quotes_and_shell_syntax_in_the_path(tmp_path):
    reference = lorakit.inject(
        tiny_models.llama(), lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    )
    tiny_models.randomize_adapters(reference, std=0.3)
    directory = tmp_path / HOSTILE_NAME
    save_adapter(reference, directory)
    weights = directory / "adapter_model.safetensors"
    tensors = load_file(weights)
    torch.save(tensors, directory / "adapter_model.bin")
    weights.unlink()

    with pytest.raises(AdapterFileError, match="never unpickles") as refused:
        load_adapter(tiny_models.llama(), directory)
    command = str(refused.value).split("convert it once to safetensors with: ", 1)[1]
    words = shlex.split(command)
    assert words[:2] == ["python", "-c"]
    assert words[3:] == [str(directory / "adapter_model.bin"), str(weights)]  # exactly the paths

    runnable = shlex.quote(sys.executable) + command.removeprefix("python")
    result = subprocess.run(
        runnable, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert not list(tmp_path.rglob("PWNED*"))  # nothing in the path ran
    converted = load_file(weights)
    assert converted.keys() == tensors.keys()
    assert all(torch.equal(converted[key], tensors[key]) for key in tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the converted file has no fingerprint
        loaded = load_adapter(tiny_models.llama(), directory)
    torch.testing.assert_close(_logits(loaded), _logits(reference), rtol=0, atol=0)
    assert json.loads((directory / "adapter_config.json").read_text())["r"] == 4
