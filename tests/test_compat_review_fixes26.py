"""Review fixes (round 26) in PEFT file compatibility and combining, checked against real peft:

- ``rank_pattern`` / ``alpha_pattern`` keys that match only ``target_parameters`` paths keep
  their given order when sorting would change a first match, so the file loads back;
- ``combine`` carries the full base weights PEFT's ``save_embedding_layers`` writes (equal in
  every input) and refuses different ones, and trainable token rows get their own message;
- loading a PEFT adapter on a layer kind lorakit does not adapt (``nn.Conv1d`` / ``nn.Conv2d``,
  DoRA on an embedding) is an ``AdapterFileError`` naming the file and the module, with the model
  left unchanged.
"""

from __future__ import annotations

import json
import re

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit.errors import AdapterFileError, BaseModelMismatchError, UserError
from lorakit.state import state_of
from tests import tiny_models

BASE_KEY = "base_model.model.model.embed_tokens.base_layer.weight"


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# --------------------------------------------------------------- patterns on parameter paths
EXPERT_PATTERNS = dict(
    rank_pattern={"mlp.experts.down_proj": 2, r"layers\.0\.mlp\.experts\.down_proj": 6},
    alpha_pattern={"mlp.experts.down_proj": 4, r"layers\.0\.mlp\.experts\.down_proj": 24},
)


def test_parameter_path_patterns_keep_order_and_load_back_in_lorakit_and_peft(tmp_path):
    config = lorakit.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj"],
        target_parameters=["mlp.experts.down_proj"],
        **EXPERT_PATTERNS,
    )
    model = tiny_models.mixtral()
    lorakit.inject(model, config)
    tiny_models.randomize_adapters(model, std=0.2)
    lorakit.save_adapter(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    for field_name, pattern in EXPERT_PATTERNS.items():  # sorted, layer 0 would take key 2
        assert list(written[field_name].items()) == list(pattern.items())
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    layer0 = tensors["base_model.model.model.layers.0.mlp.experts.lora_A.weight"]
    assert layer0.shape == (2 * 4, 48)  # the first key given wins: r = 2 for each of 4 experts
    ids = tiny_models.input_ids(vocab=64)
    expected = _logits(model, ids)
    reloaded = lorakit.load_adapter(tiny_models.mixtral(), tmp_path)
    torch.testing.assert_close(_logits(reloaded, ids), expected, rtol=0, atol=1e-5)
    from_peft = peft.PeftModel.from_pretrained(tiny_models.mixtral(), tmp_path).eval()
    torch.testing.assert_close(_logits(from_peft, ids), expected, rtol=0, atol=1e-5)
    assert (expected - _logits(tiny_models.mixtral(), ids)).abs().max() > 1e-3  # B != 0


# ------------------------------------------------------------ combining with base weights
def _peft_dir(tmp_path, name, seed, base_seed=0, **config):
    model = peft.get_peft_model(tiny_models.llama(base_seed), peft.LoraConfig(**config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    directory = tmp_path / name
    model.save_pretrained(directory)
    return directory


def _embedding_dirs(tmp_path, base_seeds=(0, 0)):
    first = _peft_dir(
        tmp_path,
        "a",
        1,
        base_seeds[0],
        r=4,
        lora_alpha=8,
        target_modules=["embed_tokens", "q_proj"],
    )
    second = _peft_dir(
        tmp_path, "b", 2, base_seeds[1], r=2, lora_alpha=4, target_modules=["embed_tokens"]
    )
    assert BASE_KEY in load_file(first / "adapter_model.safetensors")  # peft's default save
    return first, second


def test_combine_peft_embedding_adapters_equals_peft_add_weighted_adapter(tmp_path):
    first, second = _embedding_dirs(tmp_path)
    combined = lorakit.combine([first, second], [0.5, 0.7], method="cat")
    out = combined.save(tmp_path / "mix")
    tensors = load_file(out / "adapter_model.safetensors")
    torch.testing.assert_close(tensors[BASE_KEY], tiny_models.llama().model.embed_tokens.weight)
    reference = peft.PeftModel.from_pretrained(tiny_models.llama(), first)
    reference.load_adapter(second, "b")
    reference.add_weighted_adapter(["default", "b"], [0.5, 0.7], "mix", combination_type="cat")
    reference.set_adapter("mix")
    ids = tiny_models.input_ids()
    expected = _logits(reference.eval(), ids)
    from_peft = peft.PeftModel.from_pretrained(tiny_models.llama(), out).eval()
    torch.testing.assert_close(_logits(from_peft, ids), expected, rtol=0, atol=1e-5)
    from_lorakit = lorakit.load_adapter(tiny_models.llama(), out)
    torch.testing.assert_close(_logits(from_lorakit, ids), expected, rtol=0, atol=1e-5)
    assert (expected - _logits(tiny_models.llama(), ids)).abs().max() > 1e-3  # B != 0


def test_combine_lorakit_saved_embedding_layers_carries_them(tmp_path):
    directories = []
    for seed in (1, 2):
        model = tiny_models.llama()
        lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["embed_tokens", "v_proj"]))
        tiny_models.randomize_adapters(model, seed=seed, std=0.2)
        directories.append(tmp_path / str(seed))
        lorakit.save_adapter(model, directories[-1], save_embedding_layers=True)
    saved = load_file(directories[0] / "adapter_model.safetensors")
    assert "base_model.model.lm_head.weight" in saved
    combined = lorakit.combine(directories, [1.0, -0.5], method="svd", rank=8)
    out = combined.save(tmp_path / "mix")
    tensors = load_file(out / "adapter_model.safetensors")
    for key in (BASE_KEY, "base_model.model.lm_head.weight"):
        torch.testing.assert_close(tensors[key], saved[key], rtol=0, atol=0)
    on_model = tiny_models.llama()
    for name, directory in zip(("a", "b"), directories, strict=True):
        lorakit.load_adapter(on_model, directory, name)
    reference = lorakit.combine(["a", "b"], [1.0, -0.5], method="svd", rank=8, model=on_model)
    reference.add_to(on_model, "mix")
    lorakit.set_active(on_model, ["mix"])
    ids = tiny_models.input_ids()
    loaded = lorakit.load_adapter(tiny_models.llama(), out)
    torch.testing.assert_close(_logits(loaded, ids), _logits(on_model, ids), rtol=0, atol=1e-5)


def test_combine_refuses_different_base_weights_naming_both(tmp_path):
    first, second = _embedding_dirs(tmp_path, base_seeds=(0, 1))
    with pytest.raises(BaseModelMismatchError) as caught:
        lorakit.combine([first, second])
    message = str(caught.value)
    assert str(first) in message and str(second) in message
    assert "model.embed_tokens" in message


def test_add_to_refuses_a_model_with_other_base_weights(tmp_path):
    first, second = _embedding_dirs(tmp_path)
    combined = lorakit.combine([first, second])
    with pytest.raises(BaseModelMismatchError, match=re.escape("'model.embed_tokens'")):
        combined.add_to(tiny_models.llama(seed=5), "mix")
    model = tiny_models.llama()
    combined.add_to(model, "mix")  # the same base: fine
    assert "mix" in lorakit.adapter_configs(model)


def test_combine_trainable_tokens_has_its_own_message(tmp_path):
    directory = _peft_dir(
        tmp_path, "t", 1, r=4, target_modules=["q_proj"], trainable_token_indices=[3]
    )
    with pytest.raises(UserError, match=r"^trainable_token_indices cannot be combined: ") as caught:
        lorakit.combine([directory, directory])
    assert "trainable_tokens_delta" in str(caught.value)


# ------------------------------------------------------------- layer kinds lorakit lacks
class _Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.conv1d = nn.Conv1d(3, 8, 3)
        self.lin = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.conv(x).mean((2, 3)))


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor], kinds: dict) -> None:
    assert state_of(model) is None
    assert {name: type(m) for name, m in model.named_modules()} == kinds
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], value) for key, value in before.items())


@pytest.mark.parametrize(
    ("targets", "module", "kind"),
    [(["lin", "conv"], "conv", "Conv2d"), (["conv1d"], "conv1d", "Conv1d")],
)
def test_load_peft_adapter_on_conv_is_a_file_error(tmp_path, targets, module, kind):
    peft.get_peft_model(_Convs(), peft.LoraConfig(r=2, target_modules=targets)).save_pretrained(
        tmp_path
    )
    model = _Convs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(AdapterFileError) as caught:
        lorakit.load_adapter(model, tmp_path)
    message = str(caught.value)
    assert str(tmp_path) in message and f"'{module}'" in message and kind in message
    _assert_unchanged(model, before, kinds)


def test_load_peft_dora_on_embedding_is_a_file_error(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"], use_dora=True)
    peft.get_peft_model(tiny_models.llama(), config).save_pretrained(tmp_path)
    model = tiny_models.llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(AdapterFileError) as caught:
        lorakit.load_adapter(model, tmp_path)
    message = str(caught.value)
    assert str(tmp_path) in message and "'model.embed_tokens'" in message
    assert "embedding" in message.lower() and "DoRA" in message
    _assert_unchanged(model, before, kinds)
