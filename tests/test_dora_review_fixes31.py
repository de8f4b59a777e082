"""Session 31's DoRA review fixes.

- A new DoRA adapter held in 16 bits starts at the base model bit for bit: its magnitude is
  ``m = n`` rounded to bf16 / fp16, and ``f = m / n`` divides by ``n`` rounded the same way
  (``functional.dora_divisor``), in every path (plain, fast inference, fast training, merge,
  serving bank); PEFT's ``autocast_adapter_dtype=False`` model gives the base too.
- ``AdapterBank.load_from_model`` files a ``lora_bias`` bias under its own key (refused as a
  bias), never as DoRA's magnitude.
- A file holding DoRA magnitudes under a ``use_dora=false`` config is refused by saying so.
"""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import lorakit
from lorakit import fast, functional
from lorakit.errors import AdapterFileError
from lorakit.serve import AdapterBank, prepare_for_serving
from lorakit.serve.stacks import dora_slot_factors
from lorakit.state import lora_layers
from tests import tiny_models

HALF = [torch.bfloat16, torch.float16]
DORA = dict(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True)


def _counted(function, calls: list):
    def wrapper(*args, **kwargs):
        calls.append(function.__name__)
        return function(*args, **kwargs)

    return wrapper


def _fresh(model_dtype: torch.dtype, adapter_dtype: torch.dtype):
    """The tiny Llama in ``model_dtype`` and a copy with a new (default init) DoRA adapter
    held in ``adapter_dtype``."""
    base = tiny_models.llama(dtype=model_dtype)
    adapted = lorakit.inject(
        copy.deepcopy(base), lorakit.LoraConfig(**DORA), adapter_dtype=adapter_dtype
    )
    for _, layer in lora_layers(adapted):
        assert layer.lora_magnitude_vector["default"].weight.dtype == adapter_dtype
    return base, adapted


# ------------------------------------------------------------------ a new 16-bit adapter is f = 1


@pytest.mark.parametrize("dtype", HALF)
def test_a_new_16bit_dora_factor_is_one_exactly(dtype) -> None:
    """Before the fix f = round(n) / n: up to 3.8e-3 (bf16) and 3.9e-4 (fp16) away from 1."""
    _, adapted = _fresh(dtype, dtype)
    for path, layer in lora_layers(adapted):
        factor = layer.dora_factor("default", layer.original_weight)
        assert factor.dtype == torch.float32, path
        assert torch.equal(factor, torch.ones_like(factor)), path


@pytest.mark.parametrize(
    ("model_dtype", "adapter_dtype"),
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.float32, torch.bfloat16),
    ],
)
def test_a_new_16bit_dora_adapter_leaves_the_output_bit_for_bit(
    model_dtype, adapter_dtype, monkeypatch
) -> None:
    """Plain path, fast inference, fast training forward and the merged model: each equals the
    base model's logits exactly (before: 3.9e-3 off in bf16, 3.7e-4 in fp16)."""
    base, adapted = _fresh(model_dtype, adapter_dtype)
    ids = tiny_models.input_ids(2, 7)
    with torch.no_grad():
        want = base(ids).logits
    calls: list = []
    monkeypatch.setattr(fast, "dora_linear_inference", _counted(fast.dora_linear_inference, calls))
    monkeypatch.setattr(fast, "fused_dora_linear", _counted(fast.fused_dora_linear, calls))
    with torch.no_grad(), fast.plain_path():
        assert torch.equal(adapted(ids).logits, want)
    assert not calls
    with torch.no_grad():
        assert torch.equal(adapted(ids).logits, want)
    if model_dtype == adapter_dtype:  # a 16-bit model with its own-dtype adapter: fused
        assert "dora_linear_inference" in calls
        calls.clear()
        adapted.train()  # dropout 0: the fused training node
        assert torch.equal(adapted(ids).logits.detach(), want)
        assert "fused_dora_linear" in calls
        adapted.eval()
    lorakit.merge(adapted)
    for path, layer in lora_layers(adapted):
        assert torch.equal(layer.base_layer.weight, base.get_submodule(path).weight), path
    with torch.no_grad():
        assert torch.equal(adapted(ids).logits, want)


def test_get_peft_model_without_autocast_equals_peft_and_the_base() -> None:
    """``get_peft_model(..., autocast_adapter_dtype=False)`` on a bf16 model: bf16 adapters.
    PEFT's model is the base exactly; lorakit's too (before: 3.9e-3 off, argmax moved)."""
    base = tiny_models.llama(dtype=torch.bfloat16)
    ids = tiny_models.input_ids(2, 7)
    ours = lorakit.get_peft_model(
        copy.deepcopy(base), lorakit.LoraConfig(**DORA), autocast_adapter_dtype=False
    ).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(**DORA), autocast_adapter_dtype=False
        ).eval()
    with torch.no_grad():
        want, got, peft_out = base(ids).logits, ours(ids).logits, theirs(ids).logits
    assert torch.equal(peft_out, want)
    assert torch.equal(got, peft_out)


# ------------------------------------------------------------------ the rounded divisor


def test_the_divisor_is_n_rounded_to_a_16bit_m_and_gradients_flow() -> None:
    """``f = m / round(n)`` in float32; ``df/dm = 1 / round(n)``; float32 and float64
    magnitudes divide by ``n`` itself (unchanged)."""
    norms = torch.tensor([1.00390, 3.1, 0.7071, 257.3])  # 1.0039 rounds to 1 in bf16
    magnitude = norms.to(torch.bfloat16).requires_grad_(True)
    factor = functional.dora_factor(magnitude, norms)
    assert factor.dtype == torch.float32
    assert torch.equal(factor, torch.ones(4))  # m / n would be 0.9961 on the first row
    factor.sum().backward()
    divisor = norms.to(torch.bfloat16).float()
    assert torch.equal(magnitude.grad, (1 / divisor).to(torch.bfloat16))
    assert torch.equal(functional.dora_divisor(magnitude, norms), divisor)
    for dtype in (torch.float32, torch.float64):
        wide = norms.to(dtype)
        assert torch.equal(functional.dora_divisor(wide, wide), wide)
        assert torch.equal(functional.dora_factor(wide * 1.5, wide), wide * 1.5 / wide)


def test_the_fused_nodes_magnitude_gradient_divides_by_the_rounded_norms() -> None:
    """``FusedDoraLinear``'s ``dL/dm`` equals autograd through ``dora_factor`` for a bf16 m
    with float64 activations: both divide by n rounded to bf16. The norms are chosen just
    below 1 + 2^-8 times a power of two (rounded down by 3.9e-3 relative), where dividing by
    the unrounded n moves the bf16 gradient by about one unit in the last place."""
    generator = torch.Generator().manual_seed(0)
    x, weight = (
        torch.randn(*s, generator=generator, dtype=torch.float64) for s in ((5, 6), (4, 6))
    )
    lora_A, lora_B = (
        torch.randn(*s, generator=generator, dtype=torch.float64) for s in ((2, 6), (4, 2))
    )
    probe = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    norms = torch.tensor([1.0039, 2.0078, 4.0156, 0.50195], dtype=torch.float64)
    start = (norms * torch.tensor([1.3, 0.7, 1.1, 0.9], dtype=torch.float64)).to(torch.bfloat16)
    fused_m, plain_m = start.clone().requires_grad_(True), start.clone().requires_grad_(True)
    out = fast.FusedDoraLinear.apply(
        x, weight, None, lora_A, lora_B, fused_m, norms, 1.5, 0, 0, False
    )
    (out * probe).sum().backward()
    factor = functional.dora_factor(plain_m, norms)  # float64
    base = x @ weight.T
    want = base + (factor - 1) * base + factor * (1.5 * (x @ lora_A.T) @ lora_B.T)
    (want * probe).sum().backward()
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    assert torch.equal(fused_m.grad, plain_m.grad)


def test_fast_and_plain_magnitude_gradients_agree_in_bf16() -> None:
    """The fused node's ``dL/dm`` divides by the same rounded ``n`` as its forward (and the
    plain path's autograd): both within bf16 rounding of each other, and non-zero."""
    _, adapted = _fresh(torch.bfloat16, torch.bfloat16)
    tiny_models.randomize_adapters(adapted, std=0.2)
    adapted.train()
    ids = tiny_models.input_ids(2, 7)
    grads = []
    for context in (fast.plain_path, torch.enable_grad):
        adapted.zero_grad(set_to_none=True)
        with context():
            adapted(ids).logits.float().square().mean().backward()
        grads.append(
            torch.cat(
                [
                    layer.lora_magnitude_vector["default"].weight.grad.float()
                    for _, layer in lora_layers(adapted)
                ]
            )
        )
    plain, fused = grads
    assert plain.abs().max() > 0
    torch.testing.assert_close(fused, plain, rtol=0.05, atol=0.02 * plain.abs().max().item())


# ------------------------------------------------------------------ serving bank


@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16])
def test_a_banks_new_bf16_dora_adapter_has_gain_zero(bank_dtype) -> None:
    """``dora_slot_factors`` for a new bf16 adapter: ``f - 1 = 0`` and ``f B = B = 0`` exactly
    (before: the gain was up to 3.8e-3), so a served row is the base row."""
    _, reference = _fresh(torch.float32, torch.bfloat16)
    served = tiny_models.llama()
    prepare_for_serving(served, "all-linear")
    bank = AdapterBank(served, max_rank=8, capacity=1, dtype=bank_dtype)
    stacks = bank._stacks
    for path, layer in lora_layers(reference):
        lora_A, lora_B, magnitude = layer.adapter_parameters("default")
        assert magnitude.dtype == torch.bfloat16
        scaled_B, gain = dora_slot_factors(
            stacks[path], lora_A.detach(), lora_B.detach(), magnitude.detach(), 2.0
        )
        assert torch.equal(gain, torch.zeros_like(gain)), path
        assert torch.equal(scaled_B, torch.zeros_like(scaled_B)), path


def test_load_from_model_refuses_a_lora_bias_as_a_bias() -> None:
    """Before: the bias on B was filed as ``.lora_magnitude_vector`` and refused as 'a trained
    copy of a module'."""
    reference = tiny_models.llama()
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], lora_bias=True, init_lora_weights=False
    )
    lorakit.inject(reference, config, adapter_name="lb")
    model = tiny_models.llama()
    prepare_for_serving(model, ["q_proj"])
    bank = AdapterBank(model, max_rank=4, capacity=2)
    with pytest.raises(AdapterFileError) as error:
        bank.load_from_model("lb", reference, "lb")
    message = str(error.value)
    assert "q_proj.lora_B.bias" in message and "lora_bias" in message
    assert "magnitude" not in message and "trained copy of a module" not in message


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (
            {"modules_to_save": ["lm_head"]},
            "lm_head.weight' is not a LoRA linear weight: it is a trained copy of a module",
        ),
        ({"bias": "all"}, "bias' is not a LoRA linear weight: it is a bias"),
    ],
)
def test_load_from_model_refuses_what_a_file_of_the_adapter_would_be_refused_for(extra, named):
    """load_from_model took only the LoRA layers' tensors: an adapter with a saved module or
    trained base biases was served without them, another model than the adapter's. It now
    takes what a save writes (io.save.adapter_file_entries), and the bank refuses those
    tensors by name as from a file."""
    torch.manual_seed(0)
    reference = LlamaForCausalLM(tiny_models.llama_config(attention_bias=True)).eval()
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], **extra)
    lorakit.inject(reference, config, adapter_name="x")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_models.llama_config(attention_bias=True)).eval()
    prepare_for_serving(model, ["q_proj"])
    bank = AdapterBank(model, max_rank=4, capacity=2)
    with pytest.raises(AdapterFileError, match="is not a LoRA linear weight") as error:
        bank.load_from_model("x", reference, "x")
    assert named in str(error.value)
    assert "x" not in bank


def test_load_from_model_still_takes_a_dora_adapters_magnitude() -> None:
    reference = tiny_models.llama()
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    lorakit.inject(reference, config, adapter_name="d")
    tiny_models.randomize_adapters(reference, std=0.2)
    model = tiny_models.llama()
    prepare_for_serving(model, ["q_proj"])
    bank = AdapterBank(model, max_rank=4, capacity=2)
    bank.load_from_model("d", reference, "d")
    assert all(stack.dora_slots == {bank.slot_of("d")} for stack in bank._stacks.values())


# ------------------------------------------------------------------ a DoRA file, use_dora=false


def test_magnitudes_in_a_use_dora_false_config_are_named_as_such(tmp_path) -> None:
    base = tiny_models.llama()
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    adapted = lorakit.inject(copy.deepcopy(base), config)
    lorakit.save_adapter(adapted, tmp_path)
    settings = json.loads((tmp_path / "adapter_config.json").read_text())
    assert settings["use_dora"] is True
    settings["use_dora"] = False
    (tmp_path / "adapter_config.json").write_text(json.dumps(settings))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert any(key.endswith(".lora_magnitude_vector.weight") for key in tensors)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(AdapterFileError) as error:
            lorakit.load_adapter(copy.deepcopy(base), tmp_path)
    message = str(error.value)
    assert "lora_magnitude_vector" in message and "use_dora=false" in message
    assert '"use_dora": true' in message
    assert "fit no module" not in message and "architecture" not in message
