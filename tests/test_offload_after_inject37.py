"""Review 37: a model offloaded AFTER ``inject`` whose ``bias`` mode trains the biases of modules
no adapter wraps (``bias="all"``; ``cpu_offload`` / ``dispatch_model`` of each MLP only).

``inject`` refuses such an adapter where the modules are offloaded already
(``test_offload_review37.py``), and a LoRA layer's forward refuses an offloaded base of its own;
offloaded afterwards, the MLPs' biases were loaded into new tensors at each call, so training ran
without complaint and they never changed (the non-offloaded run moves them: the oracle here). Now
the first training forward is refused, before any computation, with ``inject``'s message naming
the module; inference (``torch.no_grad``), frozen biases and ``bias="none"`` train and compute
as the non-offloaded model does, and a model whose biases do not train gets no hook at all.
"""

from __future__ import annotations

import re

import pytest
import torch
from accelerate import cpu_offload, dispatch_model

import lorakit
from lorakit.offloaded_tensors import trained_bias_refusal
from tests import tiny_models
from tests.offloaded_models import CPU, TOL, assert_close, logits_of

GPT2 = {"r": 4, "target_modules": ["c_attn"], "fan_in_fan_out": True}
C_FC = re.escape("module 'transformer.h.0.mlp.c_fc': the bias of this Conv1D trains")
LLAMA = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
MLPS_ON_DISK = {  # each block's MLP (no target) on "disk"; the rest on the CPU
    **{f"transformer.{name}": "cpu" for name in ("wte", "wpe", "ln_f")},
    **{f"transformer.h.{i}.{part}": "cpu" for i in (0, 1) for part in ("ln_1", "attn", "ln_2")},
    **{f"transformer.h.{i}.mlp": "disk" for i in (0, 1)},
    "lm_head": "cpu",
}
# (model, its first offloaded module with a bias, that module's class)
CASES = {
    "gpt2-cpu_offload": ("gpt2", "transformer.h.0.mlp.c_fc", "Conv1D"),
    "gpt2-dispatch_model": ("gpt2", "transformer.h.0.mlp.c_fc", "Conv1D"),
    "llama-cpu_offload": ("llama", "model.layers.0.mlp.gate_proj", "Linear"),
}


def _adapted(family: str, **overrides) -> torch.nn.Module:
    """The tiny GPT-2, or the tiny Llama with biases everywhere (seed 0), with a random adapter
    on its attention (``overrides``: ``LoraConfig`` fields)."""
    if family == "gpt2":
        base, config = tiny_models.gpt2(seed=0), GPT2
    else:
        torch.manual_seed(0)
        llama_config = tiny_models.llama_config(attention_bias=True, mlp_bias=True)
        base, config = tiny_models.LlamaForCausalLM(llama_config).eval(), LLAMA
    model = lorakit.inject(base, lorakit.LoraConfig(**config, **overrides))
    tiny_models.randomize_adapters(model, std=0.3)
    return model


def _offload_mlps(model: torch.nn.Module, case: str, folder) -> torch.nn.Module:
    """``model``'s MLPs offloaded in place, after ``inject``, the way ``case`` names."""
    if case == "gpt2-dispatch_model":
        dispatch_model(model, device_map=MLPS_ON_DISK, main_device="cpu", offload_dir=folder)
    else:
        blocks = model.transformer.h if case.startswith("gpt2") else model.model.layers
        for block in blocks:
            cpu_offload(block.mlp, execution_device=CPU)
    return model


def _lm_loss(model: torch.nn.Module) -> torch.Tensor:
    ids = tiny_models.input_ids()
    return model(ids, labels=ids).loss


def _mlp_bias(model: torch.nn.Module, path: str) -> torch.Tensor:
    """The bias of the module at ``path`` as its calls see it (an offloaded one: its map's)."""
    module = model.get_submodule(path)
    hook = getattr(module, "_hf_hook", None)
    if module.bias.is_meta and hook is not None:
        return hook.weights_map["bias"].detach().clone()
    return module.bias.detach().clone()


@pytest.mark.parametrize("case", CASES)
def test_the_first_training_forward_is_refused_naming_the_module(case, tmp_path) -> None:
    family, path, kind = CASES[case]
    plain = _adapted(family, bias="all")
    before = _mlp_bias(plain, path)
    tiny_models.sgd_steps(plain, tiny_models.input_ids(), steps=1, lr=0.5)
    assert (_mlp_bias(plain, path) - before).abs().max().item() > 1e-4  # (plain: it trains)
    model = _offload_mlps(_adapted(family, bias="all"), case, tmp_path / "offload")
    factors = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    with pytest.raises(ValueError) as caught:
        _lm_loss(model)
    module = model.get_submodule(path)
    assert str(caught.value) == trained_bias_refusal(module, path, at_inject=False)
    at_inject = trained_bias_refusal(module, path)  # (inject's, where offloaded before)
    shared = at_inject.split("for inference, ")[0]
    assert str(caught.value).startswith(f"module '{path}': the bias of this {kind} trains")
    assert str(caught.value).startswith(shared) and "torch.no_grad()" in str(caught.value)
    assert torch.equal(_mlp_bias(model, path), before)
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], value) for n, value in factors.items())


@pytest.mark.parametrize("case", CASES)
def test_inference_under_no_grad_gives_the_plain_logits(case, tmp_path) -> None:
    family = CASES[case][0]
    want = logits_of(_adapted(family, bias="all"))
    model = _offload_mlps(_adapted(family, bias="all"), case, tmp_path / "offload")
    assert_close(logits_of(model), want)
    with torch.inference_mode():
        assert_close(model(tiny_models.input_ids()).logits, want)


def _trained_factors(model: torch.nn.Module, freeze_biases: bool) -> dict[str, torch.Tensor]:
    if freeze_biases:
        for name, parameter in model.named_parameters():
            if name.endswith("bias") and "lora_" not in name:
                parameter.requires_grad_(False)
    tiny_models.sgd_steps(model, tiny_models.input_ids(), steps=2, lr=0.5)
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize(("bias", "freeze"), [("all", True), ("none", False)])
@pytest.mark.parametrize("case", ["gpt2-dispatch_model", "llama-cpu_offload"])
def test_frozen_biases_and_bias_none_train_as_the_plain_model(case, bias, freeze, tmp_path):
    family = CASES[case][0]
    want = _trained_factors(_adapted(family, bias=bias), freeze)
    model = _offload_mlps(_adapted(family, bias=bias), case, tmp_path / "offload")
    got = _trained_factors(model, freeze)
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert (got[name] - value).abs().max().item() <= TOL, name


def test_no_hook_while_no_bias_trains_and_none_after_unload(tmp_path) -> None:
    model = _adapted("gpt2", bias="none")
    assert not model._forward_pre_hooks  # (nothing to check at a forward)
    model = _offload_mlps(_adapted("gpt2", bias="all"), "gpt2-cpu_offload", tmp_path)
    with pytest.raises(ValueError, match=C_FC):
        _lm_loss(model)
    lorakit.inject(model, lorakit.LoraConfig(**GPT2, bias="none"), adapter_name="plain")
    lorakit.set_active(model, ["plain"])  # (its biases do not train: the forward passes)
    assert torch.isfinite(_lm_loss(model))
    lorakit.set_active(model, ["default"])
    with pytest.raises(ValueError, match=C_FC):
        _lm_loss(model)
    lorakit.unload(model)  # (the plain model: accelerate's, nothing of lorakit's refuses)
    assert torch.isfinite(_lm_loss(model))
