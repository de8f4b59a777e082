"""Adapters on transformers' scaled word embeddings (BART's ``embed_scale`` float, Gemma's
tensor buffer): the LoRA branch is scaled as the base lookup is, so unmerged = merged = PEFT;
trainable token rows work with a float scale; and ``lora_bias`` on a layer kind that cannot
take it is refused before the model changes."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn
from transformers.models.bart.modeling_bart import BartScaledWordEmbedding

import lorakit
from lorakit.state import state_of
from tests import tiny_models


class Embedded(nn.Module):
    def __init__(self, scale: float = 4.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = BartScaledWordEmbedding(32, 8, padding_idx=1, embed_scale=scale)
        self.lin = nn.Linear(8, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(ids))


IDS = torch.tensor([[0, 2, 5, 31, 1]])
FIELDS = dict(r=2, lora_alpha=4, target_modules=["emb"], init_lora_weights=False)


def test_the_lora_branch_of_a_scaled_embedding_is_scaled_too():
    ours = lorakit.inject(Embedded(), lorakit.LoraConfig(**FIELDS))
    tiny_models.randomize_adapters(ours, std=0.3)
    layer = ours.emb
    A, B = (p.detach().double() for p in layer.adapter_parameters("default"))
    weight = layer.base_layer.weight.detach().double()
    expected = 4.0 * (weight + layer.scalings["default"] * (B @ A).T)[IDS]  # float64 formula
    with torch.no_grad():
        unmerged = layer(IDS)
        torch.testing.assert_close(unmerged.double(), expected, rtol=1e-6, atol=1e-6)
        lorakit.merge(ours)
        torch.testing.assert_close(layer(IDS), unmerged, rtol=1e-6, atol=1e-6)
        lorakit.unmerge(ours)
    theirs = peft.get_peft_model(Embedded(), peft.LoraConfig(**FIELDS))
    with torch.no_grad():
        for key, parameter in theirs.named_parameters():
            if "lora_embedding" in key:
                parameter.copy_(
                    dict(ours.named_parameters())[key.removeprefix("base_model.model.")]
                )
        torch.testing.assert_close(theirs(IDS), ours(IDS), rtol=1e-6, atol=1e-6)


def test_trainable_token_rows_on_an_embedding_with_a_float_scale():
    config = lorakit.LoraConfig(target_modules=["lin"], trainable_token_indices={"emb": [2, 5]})
    model = lorakit.inject(Embedded(), config)
    (delta,) = [p for name, p in model.named_parameters() if "trainable_tokens_delta" in name]
    with torch.no_grad():
        delta.copy_(torch.arange(16.0).view(2, 8))  # the new values of rows 2 and 5
        out = model.emb(IDS)  # (it raised: 'float' object has no attribute 'to')
    rows = Embedded().emb.weight.detach().clone()
    rows[[2, 5]] = torch.arange(16.0).view(2, 8)
    torch.testing.assert_close(out, 4.0 * rows[IDS])


@pytest.mark.parametrize("target", ["emb", "quantized"])
def test_lora_bias_on_a_layer_without_it_is_refused_and_changes_nothing(target):
    if target == "quantized":
        from tests import quantized_layers

        model = nn.Sequential(
            quantized_layers.QUANTIZERS["gguf-Q4_1"](quantized_layers.float_linear(64, 32))
        )
        targets = ["0"]
    else:
        model, targets = Embedded(), ["lin", "emb"]
    before = {name: type(module) for name, module in model.named_modules()}
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    config = lorakit.LoraConfig(target_modules=targets, lora_bias=True)
    with pytest.raises(ValueError, match=r"lora_bias=True \(a bias on B\) for float nn\.Linear"):
        lorakit.inject(model, config)
    assert state_of(model) is None
    assert {name: type(module) for name, module in model.named_modules()} == before
    assert {name: p.requires_grad for name, p in model.named_parameters()} == trainable


def test_merged_adapter_keeps_the_embed_scale_when_switched_off_like_peft():
    """Merged, then ``disable_adapter()`` / another adapter for one call: the base lookup runs
    the subclass's forward (its ``embed_scale``) on the original weight, as peft does."""
    ours = lorakit.get_peft_model(Embedded(), lorakit.LoraConfig(**FIELDS))
    ours.add_adapter("other", lorakit.LoraConfig(**FIELDS))
    tiny_models.randomize_adapters(ours.model, std=0.3)
    theirs = peft.get_peft_model(Embedded(), peft.LoraConfig(**FIELDS))
    theirs.add_adapter("other", peft.LoraConfig(**FIELDS))
    theirs.load_state_dict(
        {"base_model.model." + k: v for k, v in ours.model.state_dict().items() if "lora_" in k},
        strict=False,
    )
    base = Embedded()(IDS)
    with torch.no_grad():
        with lorakit.use_adapters(ours.model, ["other"]):
            other = ours(IDS)
        ours.merge_adapter()
        theirs.merge_adapter()
        with ours.disable_adapter():
            disabled = ours(IDS)
        with theirs.disable_adapter():
            torch.testing.assert_close(disabled, theirs(IDS), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(disabled, base, rtol=1e-6, atol=1e-6)
        with lorakit.use_adapters(ours.model, ["other"]):
            torch.testing.assert_close(ours(IDS), other, rtol=1e-5, atol=1e-5)
        theirs.unmerge_adapter()
        theirs.set_adapter("other")
        torch.testing.assert_close(other, theirs(IDS), rtol=1e-5, atol=1e-5)


class Doubled(nn.Linear):
    """A linear subclass whose forward is not ``F.linear`` alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_merged_adapter_on_a_linear_subclass_or_hooked_linear_runs_its_forward():
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    fields = dict(r=2, lora_alpha=4, target_modules=["lin"], init_lora_weights=False)
    for hooked in (False, True):
        model = Embedded()
        if hooked:
            model.lin.register_forward_hook(lambda module, args, out: out + 1.0)
        else:
            model.lin.__class__ = Doubled
        expected = model.lin(x)
        ours = lorakit.inject(model, lorakit.LoraConfig(**fields))
        tiny_models.randomize_adapters(ours, std=0.3)
        with torch.no_grad():
            adapted = ours.lin(x)
            lorakit.merge(ours)
            with lorakit.disabled(ours):
                torch.testing.assert_close(ours.lin(x), expected)
            if hooked:  # (a subclass that doubles its output doubles the merged delta too)
                torch.testing.assert_close(ours.lin(x), adapted, rtol=1e-5, atol=1e-5)
