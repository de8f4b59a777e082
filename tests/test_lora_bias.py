"""``lora_bias=True`` (PEFT's trainable bias on lora_B): ``h = W0 x + bias0 + s (B A x + b)``.

Checked against the real ``peft`` (files both ways, logits within 1e-5), against the formula,
through merge/unmerge (exact), training (the fast path's gradient equals the plain one's), the
PEFT-compatible front door and ``lorakit inspect``.
"""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from transformers import LlamaForCausalLM

import lorakit
from lorakit.cli import main
from lorakit.errors import AdapterFileError, UserError
from lorakit.export.gguf_adapter import export_adapter
from lorakit.io import load_adapter, read_adapter, save_adapter
from lorakit.io.summary import summarize_adapter
from lorakit.serve.checks import lora_pairs
from tests import tiny_models

TOLERANCE = 1e-5
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def _llama_with_biases(seed: int = 0) -> LlamaForCausalLM:
    """The tiny Llama with biases on attention and MLP projections (lora_bias merges into them)."""
    torch.manual_seed(seed)
    config = tiny_models.llama_config(attention_bias=True, mlp_bias=True)
    return LlamaForCausalLM(config).eval()


BUILDERS = {"llama": _llama_with_biases, "gpt2": tiny_models.gpt2}


def _fields(arch: str) -> dict:
    return dict(
        r=4, lora_alpha=8, target_modules=TARGETS[arch], lora_bias=True, init_lora_weights=False
    )


def _perturb(model: torch.nn.Module, seed: int = 7) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(tiny_models.input_ids()).logits.float()


def _peft(model: torch.nn.Module, **fields) -> peft.PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(**fields))


def _lora_biases(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.endswith(".lora_B.default.bias")}


def test_injected_adapter_has_a_trainable_zero_bias_on_B_per_layer():
    model = lorakit.inject(_llama_with_biases(), lorakit.LoraConfig(**_fields("llama")))
    biases = _lora_biases(model)
    assert len(biases) == 2 * 3  # 2 layers x 3 targets
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.lora_bias_of("default").shape == (64,)
    assert all(b.requires_grad for b in biases.values())
    fresh = lorakit.inject(
        _llama_with_biases(), lorakit.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True)
    )
    assert all(torch.count_nonzero(b) == 0 for b in _lora_biases(fresh).values())


def test_branch_adds_scaled_bias_to_the_formula():
    model = lorakit.inject(_llama_with_biases(), lorakit.LoraConfig(**_fields("llama")))
    _perturb(model)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    x = torch.randn(3, 64, dtype=torch.float64)
    base = layer.base_layer
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    b, s = layer.lora_bias_of("default").double(), layer.scalings["default"]
    expected = x @ base.weight.double().T + base.bias.double() + s * (x @ A.T @ B.T + b)
    with torch.no_grad():
        got = layer(x.float()).double()
    assert (got - expected).abs().max().item() < 1e-4
    assert s * b.abs().max().item() > 1e-2  # the bias really contributes


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lorakit_file_loads_in_peft_with_identical_logits(arch, tmp_path):
    ours = lorakit.inject(BUILDERS[arch](), lorakit.LoraConfig(**_fields(arch)))
    _perturb(ours)
    save_adapter(ours, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["lora_bias"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(BUILDERS[arch](), tmp_path)
    ours_logits, base_logits = _logits(ours), _logits(BUILDERS[arch]())
    assert (ours_logits - _logits(theirs)).abs().max().item() <= TOLERANCE
    assert (ours_logits - base_logits).abs().max().item() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_file_loads_in_lorakit_with_identical_logits(arch, tmp_path):
    theirs = _peft(BUILDERS[arch](), **_fields(arch))
    _perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = BUILDERS[arch]()
    load_adapter(ours, tmp_path)
    assert (_logits(ours) - _logits(theirs)).abs().max().item() <= TOLERANCE
    # the bias alone matters: zero it in peft and the outputs move
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if name.endswith("lora_B.default.bias"):
                parameter.zero_()
    assert (_logits(ours) - _logits(theirs)).abs().max().item() > 1e-4


def test_merge_adds_the_bias_and_unmerge_is_exact():
    model = lorakit.inject(_llama_with_biases(), lorakit.LoraConfig(**_fields("llama")))
    _perturb(model)
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    bias_before, weight_before = layer.base_layer.bias, layer.base_layer.weight
    saved_bias = bias_before.detach().clone()
    unmerged, keys = _logits(model), set(model.state_dict())
    lorakit.merge(model)
    assert set(model.state_dict()) == keys  # the kept original bias is no parameter
    expected = saved_bias + layer.scalings["default"] * layer.lora_bias_of("default").detach()
    assert torch.allclose(layer.base_layer.bias, expected, atol=1e-6)
    assert (_logits(model) - unmerged).abs().max().item() <= TOLERANCE
    with lorakit.disabled(model):  # merged, yet the base output exactly: original W0 and bias0
        assert torch.equal(_logits(model), _logits(_llama_with_biases()))
    lorakit.unmerge(model)
    assert layer.base_layer.bias is bias_before and layer.base_layer.weight is weight_before
    assert torch.equal(layer.base_layer.bias, saved_bias)
    assert torch.equal(_logits(model), unmerged)


def test_merged_model_equals_peft_merge_and_unload():
    theirs = _peft(_llama_with_biases(), **_fields("llama"))
    _perturb(theirs)
    ours = _llama_with_biases()
    lorakit.inject(ours, lorakit.LoraConfig(**_fields("llama")))
    with torch.no_grad():
        ours_params = dict(ours.named_parameters())
        for name, parameter in theirs.named_parameters():
            if "lora_" in name:
                ours_params[name.removeprefix("base_model.model.")].copy_(parameter)
    merged_theirs = theirs.merge_and_unload()
    merged_ours = lorakit.merge_and_unload(ours)
    for name, tensor in merged_theirs.state_dict().items():
        assert torch.allclose(merged_ours.state_dict()[name], tensor, atol=1e-6), name


def test_merge_without_a_base_bias_is_refused_and_changes_nothing():
    model = lorakit.inject(
        tiny_models.llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True)
    )
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    weight = layer.base_layer.weight
    with pytest.raises(ValueError, match="has no bias"):
        lorakit.merge(model)
    assert layer.base_layer.weight is weight and layer.merged_adapters == ()


def test_training_reaches_the_bias_and_fast_path_gradients_equal_the_plain_ones():
    """The fast path folds ``s b`` into the base bias of one fused call; its gradients are
    those of the plain formula (``lorakit.functional.lora_forward``)."""
    grads = {}
    for fast_enabled in (True, False):
        model = lorakit.inject(_llama_with_biases(), lorakit.LoraConfig(**_fields("llama")))
        _perturb(model)
        model.train()
        layer = model.get_submodule("model.layers.0.self_attn.q_proj")
        if not fast_enabled:
            layer.fast_adapters = lambda *args: None  # force the plain formula
        x = torch.randn(2, 5, 64)
        out = layer(x)
        (out**2).mean().backward()
        grads[fast_enabled] = (out.detach(), layer.lora_bias_of("default").grad.clone())
    assert torch.allclose(grads[True][0], grads[False][0], atol=1e-5)
    assert torch.allclose(grads[True][1], grads[False][1], atol=1e-6)
    assert grads[True][1].abs().max().item() > 0


def test_a_few_training_steps_change_the_bias_and_lower_the_loss():
    model = lorakit.inject(_llama_with_biases(), lorakit.LoraConfig(**_fields("llama")))
    model.train()
    ids = tiny_models.input_ids()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    biases = {n: p.detach().clone() for n, p in _lora_biases(model).items()}
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(p, biases[n]) for n, p in _lora_biases(model).items())


def test_front_door_get_peft_model_saves_what_peft_loads(tmp_path):
    ours = lorakit.get_peft_model(_llama_with_biases(), lorakit.LoraConfig(**_fields("llama")))
    _perturb(ours)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_llama_with_biases(), tmp_path)
    assert (_logits(ours) - _logits(theirs)).abs().max().item() <= TOLERANCE
    again = lorakit.PeftModel.from_pretrained(_llama_with_biases(), tmp_path)
    assert (_logits(again) - _logits(theirs)).abs().max().item() <= TOLERANCE


def test_inspect_reports_lora_bias(tmp_path, capsys):
    model = lorakit.inject(_llama_with_biases(), lorakit.LoraConfig(**_fields("llama")))
    save_adapter(model, tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    assert "none + a bias on lora_B (lora_bias)" in capsys.readouterr().out
    summary = summarize_adapter(tmp_path)
    assert summary["lora_bias"] is True
    assert summary["adapted_modules"] == 6
    assert summary["other_parameters"] == 2 * (64 + 32 + 64)  # the biases on B: q, v, down


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (dict(use_dora=True), "lora_bias"),
        (dict(init_lora_weights="gaussian"), "lora_bias"),
    ],
)
def test_config_refuses_what_peft_refuses(fields, match):
    with pytest.raises(ValueError, match=match):
        lorakit.LoraConfig(target_modules=["q_proj"], lora_bias=True, **fields)


def test_embedding_layers_refuse_lora_bias_as_peft_does():
    model = tiny_models.llama()
    with pytest.raises(ValueError, match=r"'model.embed_tokens' is a Embedding: .*lora_bias=True"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["embed_tokens"], lora_bias=True))
    assert lorakit.adapter_configs(model) == {}


def _saved(tmp_path, name="adapter"):
    model = lorakit.inject(_llama_with_biases(), lorakit.LoraConfig(**_fields("llama")))
    _perturb(model)
    save_adapter(model, tmp_path / name)
    return model, tmp_path / name


def test_combine_refuses_lora_bias_from_files_and_from_a_model(tmp_path):
    model, directory = _saved(tmp_path)
    with pytest.raises(
        UserError, match=r"lora_B\.bias, a bias on lora_B \(lora_bias=True\).*merge"
    ):
        lorakit.combine([directory, directory], [0.5, 0.5], method="cat")
    with pytest.raises(UserError, match="lora_bias=True"):
        lorakit.combine(["default", "default"], [0.5, 0.5], method="cat", model=model)


def test_gguf_export_refuses_the_bias_on_B_naming_it(tmp_path):
    _, directory = _saved(tmp_path)
    with pytest.raises(UserError, match=r"q_proj\.lora_B\.bias: a bias on lora_B"):
        export_adapter(directory, _llama_with_biases(), tmp_path / "a.gguf")


def test_serving_bank_refuses_the_bias_on_B(tmp_path):
    _, directory = _saved(tmp_path)
    adapter = read_adapter(directory)
    with pytest.raises(AdapterFileError, match=r"lora_B\.bias.*is not a LoRA linear weight"):
        lora_pairs("a", adapter.config, adapter.tensors, {}, max_rank=8)


def test_set_active_freezes_the_bias_of_an_inactive_adapter():
    model = lorakit.inject(_llama_with_biases(), lorakit.LoraConfig(**_fields("llama")))
    lorakit.inject(model, lorakit.LoraConfig(**_fields("llama")), "other")
    lorakit.set_active(model, ["other"])
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert not layer.lora_bias_of("default").requires_grad
    assert layer.lora_bias_of("other").requires_grad


@pytest.mark.parametrize("init", [True, False])
def test_same_seed_gives_peft_factors_and_bias(init):
    """PEFT's ``nn.Linear(r, d, bias=True)`` draws B's bias right after B's weight, before
    ``init_lora_weights=True`` redraws A: the same seed must give the same A, B and bias."""
    fields = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_bias=True)
    original = _llama_with_biases()
    torch.manual_seed(11)
    ours = lorakit.inject(
        copy.deepcopy(original), lorakit.LoraConfig(**fields, init_lora_weights=init)
    )
    torch.manual_seed(11)
    theirs = peft.get_peft_model(
        copy.deepcopy(original), peft.LoraConfig(**fields, init_lora_weights=init)
    )
    reference = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items()}
    lora = {k: v for k, v in ours.state_dict().items() if ".lora_" in k}
    assert any(k.endswith("lora_B.default.bias") for k in lora)
    for key, value in lora.items():
        assert torch.equal(value, reference[key]), key
