"""``--dtype`` of ``lorakit eval``, ``generate`` and ``serve``: the base loads in that dtype, the
adapter stays float32 beside a 16-bit base, and the outputs are the model's in that dtype."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM

import lorakit
from lorakit import cli
from lorakit.commands import generate as generate_command
from lorakit.commands import serve
from lorakit.commands.eval import load_model_and_adapter
from lorakit.io import load_adapter, save_adapter
from tests import tiny_models

TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, model_dir):
    """An r=4 adapter with non-zero B on ``model_dir``'s tiny Llama."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    tiny_models.randomize_adapters(model, std=0.3)
    directory = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(model, directory)
    return directory


def _reference_logits(model_dir, adapter_dir, ids: torch.Tensor) -> torch.Tensor:
    """The adapted model's logits in float64 (the exact value both dtypes round)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    load_adapter(model, adapter_dir, activate=True)
    with torch.no_grad():
        return model(ids).logits


def test_load_model_and_adapter_loads_the_base_in_the_dtype_and_the_adapter_in_float32(
    model_dir, adapter_dir
):
    ids = torch.tensor([[5, 9, 14, 3, 27, 8]])
    exact = _reference_logits(model_dir, adapter_dir, ids)
    errors = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model, _ = load_model_and_adapter(str(model_dir), str(adapter_dir), dtype=name)
        layer = model.model.layers[0].self_attn.q_proj
        assert layer.base_layer.weight.dtype == dtype
        assert model.model.embed_tokens.weight.dtype == dtype
        assert layer.lora_A["default"].weight.dtype == torch.float32
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.dtype == dtype
        errors[name] = (logits.double() - exact).abs().max().item()
    scale = exact.abs().max().item()
    assert errors["float32"] < 1e-5 * scale
    # bfloat16 rounding (8 bits of mantissa), not a lost adapter: without it the error is larger.
    assert 1e-4 * scale < errors["bfloat16"] < 0.05 * scale
    with lorakit.disabled(model), torch.no_grad():
        unadapted = (model(ids).logits.double() - exact).abs().max().item()
    assert unadapted > 4 * errors["bfloat16"]


def test_eval_dtype_changes_the_loss_by_bfloat16_rounding_only(
    capsys, model_dir, adapter_dir, jsonl
):
    losses = {}
    for name in ("float32", "bfloat16"):
        argv = ["eval", "--model", model_dir, "--adapter", adapter_dir, "--data", jsonl]
        assert cli.main([str(a) for a in [*argv, "--dtype", name]]) == 0
        losses[name] = json.loads(capsys.readouterr().out)["loss"]
    assert losses["bfloat16"] != losses["float32"]
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.02)


def test_generate_runs_the_model_in_the_dtype(capsys, monkeypatch, model_dir, adapter_dir):
    seen = []
    original = generate_command.engine_greedy

    def recording(model, prompt_ids, max_new_tokens):
        seen.append(model.model.embed_tokens.weight.dtype)
        return original(model, prompt_ids, max_new_tokens)

    monkeypatch.setattr(generate_command, "engine_greedy", recording)
    argv = ["generate", "good film", "--model", model_dir, "--adapter", adapter_dir]
    assert cli.main([str(a) for a in [*argv, "--max-new-tokens", "3", "--dtype", "bfloat16"]]) == 0
    assert seen == [torch.bfloat16] and capsys.readouterr().out.strip()


def test_serve_dtype_serves_a_bfloat16_base_with_a_float32_bank(tmp_path, model_dir, adapter_dir):
    shutil.copytree(adapter_dir, tmp_path / "adapters" / "mine")
    argv = ["serve", "--model", model_dir, "--adapters", tmp_path / "adapters"]
    args = cli.build_parser().parse_args([str(a) for a in [*argv, "--dtype", "bfloat16"]])
    app = serve.build(args)
    engine = app.state.engine
    assert engine.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert engine.bank.dtype == torch.float32  # adapters keep float32 beside a 16-bit base
    with TestClient(app) as client:
        body = {"model": "mine", "prompt": "good film", "max_tokens": 4, "temperature": 0}
        response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 4


def test_an_unknown_dtype_is_refused_by_name(capsys, model_dir):
    assert cli.main(["eval", "--data", "x.jsonl", "--dtype", "float8"]) == 2
    err = capsys.readouterr().err
    assert "argument --dtype: invalid choice: 'float8'" in err and "'bfloat16'" in err


@pytest.mark.parametrize("quantization", ["int8-rows", "int4-groups", "nf4"])
def test_a_quantized_base_has_the_same_codes_in_every_dtype(tmp_path, model_dir, quantization):
    """The codes come from the float32 checkpoint whatever --dtype, so an adapter trained on
    the float32-loaded quantized base is served on its bfloat16 load (its fingerprint holds)."""
    from lorakit import quantized
    from lorakit.models import load_model
    from lorakit.quantized import storage

    trained, _ = load_model(str(model_dir), quantization=quantization)
    lorakit.inject(trained, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    tiny_models.randomize_adapters(trained, std=0.3)
    save_adapter(trained, tmp_path / "adapter")
    served, _ = load_model_and_adapter(
        str(model_dir), str(tmp_path / "adapter"), quantization=quantization, dtype="bfloat16"
    )
    assert served.model.embed_tokens.weight.dtype == torch.bfloat16
    stored = {
        id(tensor)
        for module in served.modules()
        if quantized.is_quantized(module)
        for tensor in quantized.storage(module).values()
    }
    left = [
        name
        for name, parameter in served.named_parameters()
        if parameter.is_floating_point()
        and id(parameter) not in stored
        and parameter.dtype != torch.bfloat16
        and "lora_" not in name
    ]
    assert left == []  # nothing but quantized storage and the adapter stays float32
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        ours = served.model.layers[0].get_submodule(name).base_layer
        theirs = trained.model.layers[0].get_submodule(name).base_layer
        mine, original = storage(ours), storage(theirs)
        assert mine.keys() == original.keys()
        for key in mine:
            assert torch.equal(mine[key], original[key]), (name, key)
    ids = torch.tensor([[5, 9, 14, 3, 27, 8]])
    with torch.no_grad():
        expected, got = trained(ids).logits, served(ids).logits
        with lorakit.disabled(trained):
            unadapted = trained(ids).logits
    assert got.dtype == torch.bfloat16
    error = (got.float() - expected).abs().max()
    assert error < 0.25 * (expected - unadapted).abs().max(), error


def test_train_dtype_trains_a_float32_adapter_on_a_bfloat16_base(
    tmp_path, monkeypatch, model_dir, jsonl
):
    """``lorakit train --dtype bfloat16``: the base loads in bfloat16, the adapter (and so its
    optimizer state) is float32 and trains, the run records the dtype, and the adapter loads
    onto the float32 model without a base-mismatch (the fingerprint holds within bf16)."""
    import warnings

    from lorakit.models import load_model
    from tests.cli_runs import train_cli

    seen = {}

    def loading(*args, **kwargs):
        model, tokenizer = load_model(*args, **kwargs)
        seen["dtype"] = model.model.embed_tokens.weight.dtype
        return model, tokenizer

    monkeypatch.setattr("lorakit.models.load_model", loading)
    settings = ("--steps", "3", "--batch-size", "4", "--lr", "1e-2", "--dtype", "bfloat16")
    assert train_cli(model_dir, jsonl, tmp_path / "run", *settings, "--r", "4") == 0
    assert seen == {"dtype": torch.bfloat16}
    recorded = json.loads((tmp_path / "run" / "train_settings.json").read_text())
    assert recorded["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(model, tmp_path / "run" / "adapter", activate=True)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert layer.lora_B["default"].weight.abs().max() > 0  # B moved from its zero start


def test_a_resume_in_another_dtype_is_refused_naming_dtype(tmp_path, capsys, model_dir, jsonl):
    """An exact resume needs the base in the checkpoint's dtype (the fingerprint alone accepts
    a bf16 base within bf16's rounding)."""
    from tests.cli_runs import train_cli

    settings = ("--steps", "4", "--batch-size", "4", "--r", "2", "--checkpoint-every", "2")
    assert train_cli(model_dir, jsonl, tmp_path / "o", *settings, "--dtype", "bfloat16") == 0
    capsys.readouterr()
    assert train_cli(model_dir, jsonl, tmp_path / "o", *settings, "--resume") == 2
    assert "--dtype float32 (the checkpoint's: bfloat16)" in capsys.readouterr().err
    settings_file = tmp_path / "o" / "train_settings.json"
    assert json.loads(settings_file.read_text())["dtype"] == "bfloat16"  # the run's, kept


def test_training_in_float16_is_refused_with_the_reason(capsys, model_dir, jsonl, tmp_path):
    from tests.cli_runs import train_cli

    assert train_cli(model_dir, jsonl, tmp_path / "o", "--dtype", "float16") == 2
    err = capsys.readouterr().err
    assert "--dtype float16 is not trained" in err and "loss scaling" in err
    assert "bfloat16" in err and not (tmp_path / "o").exists()


def test_trainable_token_rows_are_float32_beside_a_bfloat16_embedding():
    """As PEFT keeps them: in bfloat16 most small updates of a row would round away."""
    model = tiny_models.llama().to(torch.bfloat16)
    config = lorakit.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 2, 3])
    lorakit.inject(model, config)
    rows = [p for n, p in model.named_parameters() if "trainable_tokens" in n or "token" in n]
    rows = [p for p in rows if p.requires_grad]
    assert rows and all(p.dtype == torch.float32 for p in rows)
    before = [p.detach().clone() for p in rows]
    optimizer = torch.optim.AdamW(rows, lr=1e-5, weight_decay=0.0)
    model(torch.tensor([[1, 2, 3, 4]])).logits.float().sum().backward()
    optimizer.step()
    for row, old in zip(rows, before, strict=True):
        assert (row.detach() != old).float().mean() > 0.99  # every value moved by ~1e-5
    ids = torch.tensor([[1, 2, 3, 9]])
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("quantization", ["int8-rows", "int4-groups"])
def test_cast_unquantized_casts_every_float_parameter_but_the_quantized_storage(quantization):
    """Qwen2's q/k/v carry biases: after quantizing, --dtype casts them with the rest, as
    ``from_pretrained(dtype=)`` would have loaded them; codes and scales keep their dtypes."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lorakit.quantized.loading import cast_unquantized, quantize_loaded

    config = Qwen2Config(
        **(tiny_models.DECODER_SIZES | {"hidden_size": 64, "intermediate_size": 128})
    )
    model = Qwen2ForCausalLM(config).eval()
    quantize_loaded(model, quantization, None)
    stored = _storage_dtypes(model)
    cast_unquantized(model, torch.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.bias.dtype == torch.bfloat16
    floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
    assert floats == {torch.bfloat16}
    assert _storage_dtypes(model) == stored  # the kernels' codes and scales untouched


def _storage_dtypes(model) -> dict[tuple[str, str], torch.dtype]:
    from lorakit import quantized

    return {
        (module_name, name): tensor.dtype
        for module_name, module in model.named_modules()
        if quantized.is_quantized(module)
        for name, tensor in quantized.storage(module).items()
    }
