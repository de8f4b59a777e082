"""DoRA (``use_dora=True``) against the real ``peft`` package and float64 formulas: outputs,
gradients, files both ways, merge/unmerge, the row-norm expansion and its cancellation guard."""

from __future__ import annotations

import contextlib
import copy
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lorakit
from lorakit import fast, functional
from lorakit.state import lora_layers
from tests import tiny_models
from tests.cli_runs import demo_settings, train_cli

TARGETS = {"llama": "all-linear", "gpt2": ["c_attn", "c_proj", "c_fc"]}


def _peft_dora(arch: str, dtype=torch.float32, dropout: float = 0.0, seed: int = 5):
    """A PEFT DoRA model on the tiny ``arch`` with random A, B and magnitudes (so f != 1)."""
    base = tiny_models.BUILDERS[arch]().to(dtype)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS[arch], use_dora=True, lora_dropout=dropout
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                noise = torch.randn(parameter.shape, generator=generator, dtype=dtype)
                parameter.copy_(noise * 0.1)
            elif "lora_magnitude_vector" in name:
                scale = 1 + 0.3 * torch.randn(parameter.shape, generator=generator, dtype=dtype)
                parameter.mul_(scale)
    return base, model


def _lorakit_from_peft(base, peft_model, directory):
    peft_model.save_pretrained(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no fingerprint in a peft file
        return lorakit.load_adapter(copy.deepcopy(base), directory)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_outputs_equal_peft_eval_and_train(arch: str, tmp_path) -> None:
    base, theirs = _peft_dora(arch)
    ours = _lorakit_from_peft(base, theirs, tmp_path)
    ids = tiny_models.input_ids()
    for mode in ("eval", "train"):
        getattr(theirs, mode)()
        getattr(ours, mode)()
        expected = theirs(ids).logits
        got = ours(ids).logits
        assert (expected - base(ids).logits).abs().max() > 0.1  # the adapter matters
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradients_equal_peft_in_float64(arch: str, dropout: float, tmp_path) -> None:
    """Without dropout through lorakit's fused path; with dropout through the plain path,
    which draws its masks as peft does (the fused path's masks are checked in test_dora_fast)."""
    base, theirs = _peft_dora(arch, torch.float64, dropout)
    ours = _lorakit_from_peft(base, theirs, tmp_path)
    ids = tiny_models.input_ids()
    grads = []
    for model in (theirs, ours):
        model.train()
        torch.manual_seed(11)  # same dropout masks: both draw them in the same order
        with fast.plain_path() if dropout else contextlib.nullcontext():
            model(ids).logits.pow(2).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    theirs_grads, ours_grads = grads
    assert len(ours_grads) == len(theirs_grads) > 0
    for name, grad in ours_grads.items():
        peft_name = "base_model.model." + name
        assert peft_name in theirs_grads, name
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, theirs_grads[peft_name], atol=1e-10, rtol=0)


def test_peft_file_keys_and_lorakit_file_loads_in_peft(tmp_path) -> None:
    base, theirs = _peft_dora("llama")
    ours = _lorakit_from_peft(base, theirs, tmp_path / "peft")
    lorakit.save_adapter(ours, tmp_path / "ours")
    peft_keys = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    our_tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    magnitude_keys = [k for k in peft_keys if k.endswith(".lora_magnitude_vector")]
    assert len(magnitude_keys) == 14  # 7 linear layers x 2 blocks
    # lorakit writes the magnitudes with ".weight" (transformers' load_adapter reads only that)
    assert set(our_tensors) == {k + ".weight" if k in magnitude_keys else k for k in peft_keys}
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    ids = tiny_models.input_ids()
    torch.testing.assert_close(reloaded(ids).logits, theirs.eval()(ids).logits, atol=1e-5, rtol=0)


def test_new_dora_adapter_starts_at_the_base_model() -> None:
    base = tiny_models.llama()
    model = lorakit.inject(
        copy.deepcopy(base), lorakit.LoraConfig(r=4, target_modules="all-linear", use_dora=True)
    )
    ids = tiny_models.input_ids()
    torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=0, rtol=0)
    layer = dict(lora_layers(model))["model.layers.0.self_attn.q_proj"]
    expected = layer.base_layer.weight.double().norm(dim=1)
    magnitude = layer.lora_magnitude_vector["default"].weight
    torch.testing.assert_close(magnitude.double(), expected, atol=1e-6, rtol=0)
    assert magnitude.requires_grad
    assert len(layer.adapter_parameters("default")) == 3
    assert "DoRA" in repr(layer)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_equals_unmerged_and_unmerge_is_exact(arch: str, tmp_path) -> None:
    base, theirs = _peft_dora(arch)
    ours = _lorakit_from_peft(base, theirs, tmp_path)
    layers = dict(lora_layers(ours))
    originals = {name: layer.base_layer.weight for name, layer in layers.items()}
    saved = {name: weight.detach().clone() for name, weight in originals.items()}
    ids = tiny_models.input_ids()
    unmerged = ours(ids).logits
    lorakit.merge(ours)
    torch.testing.assert_close(ours(ids).logits, unmerged, atol=1e-5, rtol=0)
    for name, layer in layers.items():  # W' = f (W0 + s B A), row by row, in float64
        A, B = (t.double() for t in layer.adapter_parameters("default")[:2])
        W0 = saved[name].double()
        W0 = W0.T if layer.fan_in_fan_out else W0
        full = W0 + layer.scalings["default"] * B @ A
        magnitude = layer.lora_magnitude_vector["default"].weight.double()
        expected = (magnitude / full.norm(dim=1))[:, None] * full
        merged = layer.base_layer.weight.double()
        merged = merged.T if layer.fan_in_fan_out else merged
        torch.testing.assert_close(merged, expected, atol=2e-6, rtol=0)
    lorakit.unmerge(ours)
    for name, layer in layers.items():
        assert layer.base_layer.weight is originals[name]
        assert torch.equal(layer.base_layer.weight, saved[name])
    torch.testing.assert_close(ours(ids).logits, unmerged, atol=0, rtol=0)


def _random_factors(d: int, k: int, r: int, dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    W0 = torch.randn(d, k, generator=generator, dtype=dtype)
    A = torch.randn(r, k, generator=generator, dtype=dtype) * 0.3
    B = torch.randn(d, r, generator=generator, dtype=dtype) * 0.3
    return W0, A, B


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_row_norm_expansion_equals_direct_norm_in_float64(fan_in_fan_out: bool) -> None:
    W0, A, B = _random_factors(24, 40, 5, torch.float64)
    stored = W0.T.contiguous() if fan_in_fan_out else W0
    base_sq = functional.base_row_sq_norms(stored, fan_in_fan_out, torch.float64)
    torch.testing.assert_close(base_sq, (W0 * W0).sum(1), atol=1e-12, rtol=0)
    norms = functional.dora_row_norms(base_sq, stored, A, B, 1.7, fan_in_fan_out)
    expected = torch.linalg.vector_norm(W0 + 1.7 * B @ A, dim=1)
    assert norms.dtype == torch.float64
    torch.testing.assert_close(norms, expected, atol=1e-12, rtol=0)


def test_rows_that_cancel_are_computed_directly() -> None:
    """Row 3 of W0 is ``-s (B A)_3`` plus a tiny remainder: the expansion subtracts two
    numbers of size ~|W0_3|^2 to get ~1e-8 of it, and in float32 that loses every digit."""
    W0, A, B = _random_factors(8, 64, 4, torch.float64, seed=1)
    scale = 2.0
    remainder = torch.randn(64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    W0[3] = -scale * (B[3] @ A) + 1e-4 * remainder
    expected = torch.linalg.vector_norm(W0 + scale * B @ A, dim=1)
    W0_32, A_32, B_32 = W0.float(), A.float(), B.float()
    base_sq = functional.base_row_sq_norms(W0_32)
    norms = functional.dora_row_norms(base_sq, W0_32, A_32, B_32, scale)
    exact_32 = torch.linalg.vector_norm(W0_32 + scale * B_32 @ A_32, dim=1).double()
    others = [i for i in range(8) if i != 3]
    torch.testing.assert_close(norms.double()[others], exact_32[others], atol=0, rtol=1e-6)
    # row 3 keeps the direct float32 norm's precision, a few ulps of ||W0_3|| (its relative
    # error is ~1e-5 either way: the summation order, which the CPU's kernels pick, decides it)
    direct_precision = 4 * torch.finfo(torch.float32).eps * W0[3].norm()
    assert abs(exact_32[3] - expected[3]) < direct_precision
    assert abs(norms[3].double() - expected[3]) < direct_precision
    # without the guard the expansion would be far off on row 3 (this is what is guarded)
    cross = (B_32 * (W0_32 @ A_32.T)).sum(1)
    lora_sq = ((B_32 @ (A_32 @ A_32.T)) * B_32).sum(1) * scale**2
    unguarded = (base_sq + 2 * scale * cross + lora_sq).clamp_min(0).sqrt()
    assert abs(unguarded[3].double() - expected[3]) > 100 * direct_precision


def test_row_norms_are_cached_until_a_factor_changes() -> None:
    model = lorakit.inject(
        tiny_models.llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    )
    tiny_models.randomize_adapters(model)
    model.requires_grad_(False)  # a deployed adapter: nothing trains it
    layer = dict(lora_layers(model))["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.fill_(1.0)
    first = layer.dora_row_norms("default", layer.base_layer.weight)
    assert layer.dora_row_norms("default", layer.base_layer.weight) is first  # cached
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(2.0)  # in place: its version counter moves
    second = layer.dora_row_norms("default", layer.base_layer.weight)
    W0 = layer.base_layer.weight.double()
    A, B = (t.double() for t in layer.adapter_parameters("default")[:2])
    expected = (W0 + layer.scalings["default"] * B @ A).norm(dim=1)
    torch.testing.assert_close(second.double(), expected, atol=1e-5, rtol=0)
    assert (second - first).abs().max() > 1e-3


def _dora_reference(layer, x: torch.Tensor) -> torch.Tensor:
    """``m * (W0 + s B A) x / ||W0 + s B A||_row + b`` in float64 from the layer's tensors now."""
    W0 = layer.base_layer.weight.double()
    A, B, m = (t.detach().double() for t in layer.adapter_parameters("default"))
    weight = W0 + layer.scalings["default"] * B @ A
    bias = layer.base_layer.bias
    out = x.double() @ (m[:, None] * weight / weight.norm(dim=1, keepdim=True)).T
    return out if bias is None else out + bias.double()


def test_training_with_fused_adamw_uses_the_current_factors() -> None:
    """torch's fused AdamW (what ``build_optimizer`` picks) steps A, B and m in place without
    bumping their version counters: the row norms must follow them all the same."""
    from lorakit.train.optim import build_optimizer

    model = lorakit.inject(
        tiny_models.llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    )
    tiny_models.randomize_adapters(model)
    layer = dict(lora_layers(model))["model.layers.0.self_attn.q_proj"]
    optimizer = build_optimizer(model, lr=0.05)
    assert optimizer.defaults["fused"]
    x = torch.randn(6, layer.in_features, generator=torch.Generator().manual_seed(0))
    before = [t.detach().clone() for t in layer.adapter_parameters("default")]
    model.train()
    for _ in range(4):
        optimizer.zero_grad()
        (layer(x) ** 2).mean().backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), _dora_reference(layer, x), atol=1e-5, rtol=0)
    weight = layer.base_layer.weight  # between steps the norms are reused, checked by value
    assert layer.dora_row_norms("default", weight) is layer.dora_row_norms("default", weight)
    after = layer.adapter_parameters("default")
    moved = [(t - t0).abs().max() for t, t0 in zip(after, before, strict=True)]
    assert min(moved) > 1e-2  # A, B and m all stepped: the test is not vacuous


class _DataWritingSGD(torch.optim.Optimizer):
    """Plain SGD that writes through ``.data``: no version counter moves, as in a hand-rolled
    or third-party optimiser that subclasses ``torch.optim.Optimizer``."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-group["lr"])


def test_any_optimizer_step_retires_the_cached_norms_of_trainable_tensors() -> None:
    model = lorakit.inject(
        tiny_models.llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    )
    tiny_models.randomize_adapters(model)
    layer = dict(lora_layers(model))["model.layers.0.self_attn.q_proj"]
    optimizer = _DataWritingSGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(6, layer.in_features, generator=torch.Generator().manual_seed(1))
    versions = [t._version for t in layer.adapter_parameters("default")]
    for _ in range(3):
        model.eval()
        with torch.no_grad():  # norms computed (and cached) between steps
            torch.testing.assert_close(
                layer(x).double(), _dora_reference(layer, x), atol=1e-5, rtol=0
            )
        model.train()
        optimizer.zero_grad()
        (layer(x) ** 2).mean().backward()
        optimizer.step()
    assert [t._version for t in layer.adapter_parameters("default")] == versions  # unseen writes
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), _dora_reference(layer, x), atol=1e-5, rtol=0)


def test_a_hand_written_step_through_data_is_seen() -> None:
    """No optimiser at all: ``p.data -= lr * p.grad`` bumps no version counter, but the backward
    before it changed the gradient the cached norms were stamped with."""
    model = lorakit.inject(
        tiny_models.llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    )
    tiny_models.randomize_adapters(model)
    layer = dict(lora_layers(model))["model.layers.0.self_attn.q_proj"]
    x = torch.randn(6, layer.in_features, generator=torch.Generator().manual_seed(2))
    trained = [p for p in layer.parameters() if p.requires_grad]
    for _ in range(3):
        with torch.no_grad():
            torch.testing.assert_close(
                layer.eval()(x).double(), _dora_reference(layer, x), atol=1e-5, rtol=0
            )
        for parameter in trained:
            parameter.grad = None
        (layer.train()(x) ** 2).mean().backward()
        for parameter in trained:
            parameter.data.add_(parameter.grad, alpha=-0.5)
    with torch.no_grad():
        torch.testing.assert_close(
            layer.eval()(x).double(), _dora_reference(layer, x), atol=1e-5, rtol=0
        )


def test_embeddings_are_refused_before_any_change() -> None:
    model = tiny_models.llama()
    config = lorakit.LoraConfig(target_modules=["q_proj", "embed_tokens"], use_dora=True)
    with pytest.raises(ValueError, match=r"embed_tokens.*Embedding.*DoRA.*nn.Linear"):
        lorakit.inject(model, config)
    assert not any(isinstance(m, lorakit.layers.LoraLayer) for m in model.modules())


def test_inspect_shows_dora(tmp_path) -> None:
    from lorakit.commands.inspect import format_summary
    from lorakit.io.summary import summarize_adapter

    model = lorakit.inject(
        tiny_models.llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    )
    lorakit.save_adapter(model, tmp_path)
    summary = summarize_adapter(tmp_path)
    assert summary["use_dora"] is True and summary["dora_magnitude_parameters"] == 2 * 64
    assert "DoRA:" in format_summary(summary) and "128 parameters" in format_summary(summary)


def test_magnitude_trains_and_is_in_the_optimizer() -> None:
    from lorakit.train.optim import parameter_groups

    model = lorakit.inject(
        tiny_models.gpt2(), lorakit.LoraConfig(r=4, target_modules=["c_attn"], use_dora=True)
    )
    groups = parameter_groups(model)
    magnitudes = [m.weight for _, l in lora_layers(model) for m in l.lora_magnitude_vector.values()]
    assert len(groups.other) == len(magnitudes) == 2
    assert all(any(p is m for p in groups.other) for m in magnitudes)
    model.train()
    model(tiny_models.input_ids()).logits.sum().backward()
    assert all(isinstance(m.grad, torch.Tensor) and m.grad.abs().max() > 0 for m in magnitudes)


@pytest.mark.slow
def test_train_cli_use_dora_writes_a_dora_adapter_peft_loads(tmp_path, model_dir, jsonl) -> None:
    output = tmp_path / "run"
    settings = "--steps 2 --batch-size 4 --lr 1e-2 --r 4 --target-modules q_proj,v_proj --use-dora"
    code = train_cli(model_dir, jsonl, output, *settings.split())
    assert code == 0
    adapter = output / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    tensors = load_file(adapter / "adapter_model.safetensors")
    magnitudes = [k for k in tensors if k.endswith(".lora_magnitude_vector.weight")]
    assert len(magnitudes) == 4  # q_proj and v_proj of two blocks
    base = peft.AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
    ours = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(model_dir).eval(), adapter)
    ids = tiny_models.input_ids(vocab=50)
    torch.testing.assert_close(ours(ids).logits, base(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_demo_with_use_dora_trains_merges_and_says_dora(tmp_path, model_dir, capsys) -> None:
    from lorakit.demo import run_demo

    settings = demo_settings(tmp_path / "demo", model_dir, use_dora=True)
    summary = run_demo(settings)
    assert summary["use_dora"] is True
    assert summary["merged_predictions_agree"] == 8  # the merged DoRA model predicts the same
    assert summary["merged_max_abs_logprob_difference"] < 1e-4
    out = capsys.readouterr().out
    assert "training DoRA r=16" in out and "after DoRA (2 steps" in out
    config = json.loads((tmp_path / "demo" / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True


def test_norms_computed_under_inference_mode_are_not_reused_for_training() -> None:
    """An evaluation under torch.inference_mode, then a training step: the cached norms were
    inference tensors, which a backward cannot save."""
    model = lorakit.inject(
        tiny_models.llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    )
    ids = tiny_models.input_ids()
    with torch.inference_mode():
        model.eval()(ids)
    model.train()(ids).logits.sum().backward()
    magnitudes = [p for n, p in model.named_parameters() if "lora_magnitude_vector" in n]
    assert magnitudes and all(p.grad is not None for p in magnitudes)


def test_decoding_under_inference_mode_reuses_the_norms() -> None:
    """torch.inference_mode (how generate is often run) computes the norms once, as normal
    tensors, and a later training step both reuses and backpropagates through them."""
    model = lorakit.inject(
        tiny_models.llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    )
    tiny_models.randomize_adapters(model)
    layer = dict(lora_layers(model))["model.layers.0.self_attn.q_proj"]
    weight = layer.base_layer.weight
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        first = layer.dora_row_norms("default", weight)
        assert layer.dora_row_norms("default", weight) is first and not first.is_inference()
        out = layer.eval()(x)
    torch.testing.assert_close(out.double(), _dora_reference(layer, x), atol=1e-5, rtol=0)
    assert layer.dora_row_norms("default", weight) is first
    layer.train()(x).sum().backward()
    assert layer.lora_magnitude_vector["default"].weight.grad is not None
