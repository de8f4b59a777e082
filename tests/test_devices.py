"""The same checks on every device torch has here: the CPU always, CUDA where a GPU is present
(issue 23: skipped cleanly without one, so the CPU suite is unchanged; on a GPU machine
``python3 -m pytest -q tests/test_devices.py`` runs them there). Each compares the device's
result with an independent reference: the float64 formula computed on the CPU, transformers'
own ``generate`` with the adapter merged, or the bytes before a merge."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit import fast
from lorakit.serve import AdapterBank, prepare_for_serving
from lorakit.serve.engine import Engine
from lorakit.serve.sampling import SamplingParams
from tests import tiny_models

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"),
    ),
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def _linear_with_adapter(device: torch.device, dtype=torch.float32, dropout=0.0) -> nn.Module:
    """One ``nn.Linear(48, 40)`` with a rank-4 adapter, B non-zero, on ``device``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 40))
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["0"], lora_dropout=dropout, init_lora_weights=False
    )
    lorakit.inject(model, config)
    tiny_models.randomize_adapters(model, std=0.3)
    return model.to(device=device, dtype=dtype)


def _formula(x, layer) -> torch.Tensor:
    """``x W0^T + b + s (x A^T) B^T`` in float64 on the CPU."""
    base, name = layer.base_layer, "default"
    weight, bias = base.weight.detach().double().cpu(), base.bias.detach().double().cpu()
    lora_A = layer.lora_A[name].weight.detach().double().cpu()
    lora_B = layer.lora_B[name].weight.detach().double().cpu()
    x = x.double().cpu()
    return x @ weight.T + bias + layer.scalings[name] * (x @ lora_A.T) @ lora_B.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_path_output_and_gradients_equal_the_float64_formula(device, dtype):
    model = _linear_with_adapter(device, dtype)
    layer = model[0]
    x = torch.randn(3, 5, 48, device=device, dtype=dtype, requires_grad=True)
    out = model(x)
    out.float().square().sum().backward()
    x_ref = x.detach().double().cpu().requires_grad_()
    factors = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    refs = [p.detach().double().cpu().requires_grad_() for p in factors]
    base = layer.base_layer
    expected = (
        x_ref @ base.weight.detach().double().cpu().T
        + base.bias.detach().double().cpu()
        + layer.scalings["default"] * (x_ref @ refs[0].T) @ refs[1].T
    )
    expected.square().sum().backward()
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    assert out.device.type == device.type and out.dtype == dtype
    torch.testing.assert_close(out.double().cpu(), expected, rtol=tolerance, atol=tolerance)
    pairs = [(x.grad, x_ref.grad), *((p.grad, r.grad) for p, r in zip(factors, refs, strict=True))]
    for got, reference in pairs:
        scale = reference.abs().max()
        assert scale > 0
        error = (got.double().cpu() - reference).abs().max() / scale
        assert error < tolerance


def test_dropout_keeps_the_expected_share_and_rescales_on_the_device(device):
    """The fused node's mask on ``device``: about 1 - p of the inputs kept, each scaled by
    1 / (1 - p) (read through the adapter's gradient of A with a unit upstream gradient)."""
    model = _linear_with_adapter(device, dropout=0.25).train()
    layer = model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.zero_()
        layer.lora_B["default"].weight.fill_(1.0)
    x = torch.ones(64, 48, device=device)
    model(x).sum().backward()
    # dL/dA = g^T (x * mask / (1 - p)) with g = s * 1 B = s * d per row: its columns count kept
    grad = layer.lora_A["default"].weight.grad[0]  # (k,): s * d * sum over rows of mask / (1-p)
    scale = layer.scalings["default"] * layer.out_features
    kept_share = (grad / scale * 0.75 / 64).mean().item()
    assert abs(kept_share - 0.75) < 0.03


def test_merge_unmerge_is_exact_and_merged_outputs_match(device):
    model = _linear_with_adapter(device)
    layer = model[0]
    before = layer.base_layer.weight.detach().clone()
    x = torch.randn(4, 48, device=device)
    with torch.no_grad():
        unmerged = model(x)
        for _ in range(3):
            lorakit.merge(model)
            merged = model(x)
            lorakit.unmerge(model)
    assert torch.equal(layer.base_layer.weight, before)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unmerged.double().cpu(), _formula(x, layer), rtol=1e-4, atol=1e-4)


def test_an_adapter_saved_on_the_device_loads_on_the_cpu_with_the_same_outputs(device, tmp_path):
    model = tiny_models.llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    tiny_models.randomize_adapters(model, std=0.1)
    model.to(device).eval()
    ids = tiny_models.input_ids()
    with torch.no_grad():
        expected = model(ids.to(device)).logits.cpu()
    lorakit.save_adapter(model, tmp_path / "adapter")
    loaded = lorakit.load_adapter(tiny_models.llama(), tmp_path / "adapter").eval()
    with torch.no_grad():
        got = loaded(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_engine_tokens_on_the_device_equal_transformers_generate_with_the_adapter_merged(device):
    specs = [
        dict(r=4, lora_alpha=8, target_modules="all-linear"),
        dict(r=2, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    ]
    reference = tiny_models.llama()
    for index, spec in enumerate(specs):
        lorakit.inject(reference, lorakit.LoraConfig(**spec), adapter_name=f"a{index}")
    tiny_models.randomize_adapters(reference, std=0.3)
    model = tiny_models.llama().to(device)
    prepare_for_serving(model)
    bank = AdapterBank(model, max_rank=4, capacity=len(specs))
    for index in range(len(specs)):
        bank.load_from_model(f"a{index}", reference, f"a{index}")
    model.generation_config.eos_token_id = None
    prompts = [[3, 7, 11, 2], [5, 1], [9, 9, 4, 8, 6]]
    with Engine(model, bank, max_batch=4) as engine:
        got = [
            engine.generate(prompt, f"a{i % 2}", SamplingParams(max_tokens=6))[0]
            for i, prompt in enumerate(prompts)
        ]
    for i, prompt in enumerate(prompts):
        adapter = f"a{i % 2}"
        lorakit.merge(reference, [adapter])
        try:
            with lorakit.use_adapters(reference, [adapter]), torch.no_grad():
                out = reference.generate(
                    torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None
                )
        finally:
            lorakit.unmerge(reference)
        assert got[i] == out[0, len(prompt) :].tolist()


def test_a_few_training_steps_on_the_device_lower_the_loss(device, tmp_path):
    from lorakit.train.config import TrainingConfig
    from lorakit.train.loop import train

    torch.manual_seed(0)
    model = tiny_models.llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.to(device)
    ids = torch.randint(3, 64, (8, 12), generator=torch.Generator().manual_seed(1))
    data = [
        {"input_ids": row, "labels": row, "attention_mask": torch.ones_like(row)} for row in ids
    ]

    def collate(rows):
        return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}

    with torch.no_grad():
        before = model(ids.to(device), labels=ids.to(device)).loss.item()
    config = TrainingConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=8,
        batch_size=4,
        lr=1e-2,
        progress=False,
        plot=False,
    )
    result = train(model, data, collate, config)
    with torch.no_grad():
        after = model(ids.to(device), labels=ids.to(device)).loss.item()
    assert all(p.device.type == device.type for p in model.parameters())
    assert after < before
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_plain_path_and_fast_path_agree_on_the_device(device):
    model = _linear_with_adapter(device)
    x = torch.randn(6, 48, device=device)
    with torch.no_grad():
        fused = model(x)
        with fast.plain_path():
            plain = model(x)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
