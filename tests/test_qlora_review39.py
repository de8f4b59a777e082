"""Review 39 (QLoRA): an adapter trained on a bitsandbytes 4-bit base WITHOUT double
quantization (``BitsAndBytesConfig(load_in_4bit=True)``, PEFT's usual setting; fingerprint
``bnb-nf4`` / ``bnb-fp4``) loads from the CLI: ``--quantization nf4|fp4`` then loads that base
without double quantization, so ``lorakit merge`` / ``eval`` / ``generate`` take it, and the
outputs equal the real peft's on the base the adapter was trained on."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import lorakit
from lorakit import quantized
from lorakit.errors import UserError
from lorakit.io import read_adapter, save_adapter
from lorakit.models import load_model
from tests import tiny_models
from tests.cli_runs import run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOLERANCE = 1e-5


def _bnb_base(directory, quant_type: str, double_quant: bool = False):
    """The tiny Llama in ``directory`` loaded by transformers itself, 4-bit, in training mode
    (no CPU repacking; no dropout in the adapters, so training mode is deterministic)."""
    return tiny_models.bnb_4bit_from(directory, quant_type, double_quant, torch.float32)


@pytest.fixture(scope="module", params=["nf4", "fp4"])
def nodq_adapter(request, model_dir, tmp_path_factory):
    """``(quant type, adapter directory)``: an adapter saved in Python from a base loaded with
    ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=...)`` (no double quant)."""
    quant_type = request.param
    model = _bnb_base(model_dir, quant_type)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    lorakit.inject(model, config)
    tiny_models.randomize_adapters(model, std=0.1)
    directory = tmp_path_factory.mktemp(f"adapter-{quant_type}")
    save_adapter(model, directory)
    assert {e["dtype"] for e in read_adapter(directory).fingerprint.values()} == {
        f"bnb-{quant_type}"
    }
    return quant_type, directory


def _peft_logits(model_dir, quant_type: str, adapter, double_quant: bool = False):
    """The oracle: peft's model of ``adapter`` on transformers' 4-bit load of the base."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(
            _bnb_base(model_dir, quant_type, double_quant), adapter
        ).train()
    with torch.no_grad():
        return model(tiny_models.input_ids()).logits


def test_the_double_quantization_follows_the_adapters_fingerprint(capsys):
    from lorakit.commands._model_options import bnb_double_quantization

    def entries(*formats):
        return {f"m{i}": {"dtype": name} for i, name in enumerate(formats)}

    assert bnb_double_quantization(entries("bnb-nf4", "bnb-nf4"), "nf4") is False
    assert "bnb-nf4 base without double quantization" in capsys.readouterr().err
    assert bnb_double_quantization(entries("bnb-fp4"), "fp4") is False
    assert "bnb-fp4 base without double quantization" in capsys.readouterr().err
    assert bnb_double_quantization(entries("bnb-nf4-dq"), "nf4") is True
    assert bnb_double_quantization(entries("bnb-nf4", "bnb-nf4-dq"), "nf4") is True  # mixed
    assert bnb_double_quantization(entries("bnb-fp4"), "nf4") is True  # another format
    assert bnb_double_quantization(entries("bnb-nf4"), "int8") is True
    assert bnb_double_quantization(entries("bnb-nf4"), None) is True
    assert bnb_double_quantization(None, "nf4") is True  # no fingerprint (a peft file)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_load_model_without_double_quantization_stores_transformers_codes(model_dir, quant_type):
    ours, _ = load_model(
        model_dir, quantization=quant_type, double_quantization=False, progress=False
    )
    theirs = _bnb_base(model_dir, quant_type)
    layers = [(n, m) for n, m in ours.named_modules() if quantized.is_quantized(m)]
    assert len(layers) == 14
    for name, layer in layers:
        assert quantized.describe(layer) == f"bnb-{quant_type}", name
        expected = quantized.storage(theirs.get_submodule(name))
        got = quantized.storage(layer)
        assert got.keys() == expected.keys() == {"codes", "absmax"}, name
        assert all(torch.equal(got[key], expected[key]) for key in got), name


def test_double_quantization_off_is_refused_for_other_formats(model_dir):
    with pytest.raises(UserError, match=r"double_quantization=False applies to .*'int8'"):
        load_model(model_dir, quantization="int8", double_quantization=False, progress=False)


def test_cli_merge_with_the_hinted_option_equals_peft_on_the_base_it_was_trained_on(
    nodq_adapter, model_dir, tmp_path, capsys
):
    quant_type, adapter = nodq_adapter
    argv = ["merge", "--model", model_dir, "--adapter", adapter, "--output", tmp_path / "m"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and f"pass --quantization {quant_type}." in err  # the hint names it
    assert not (tmp_path / "m").exists()
    code, out, err = run_cli(capsys, *argv, "--quantization", quant_type)
    assert code == 0, err
    assert f"trained on a bnb-{quant_type} base without double quantization" in err
    assert "merged model" in out
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    with torch.no_grad():
        got = merged(tiny_models.input_ids()).logits
    expected = _peft_logits(model_dir, quant_type, adapter)
    torch.testing.assert_close(got, expected, rtol=0, atol=TOLERANCE)
    # the double-quantized base is another base: its outputs are told apart at this tolerance
    other = _peft_logits(model_dir, quant_type, adapter, double_quant=True)
    assert (other - expected).abs().max() > 10 * TOLERANCE


def test_cli_eval_and_generate_with_the_hinted_option_equal_the_merged_model(
    nodq_adapter, model_dir, jsonl, tmp_path, capsys
):
    quant_type, adapter = nodq_adapter
    merged = tmp_path / "merged"
    merge = ["merge", "--model", model_dir, "--adapter", adapter, "--output", merged]
    assert run_cli(capsys, *merge, "--quantization", quant_type)[0] == 0
    on_base = ["--model", model_dir, "--adapter", adapter, "--quantization", quant_type]
    data = ["--data", jsonl, "--limit", "6"]
    code, out, err = run_cli(capsys, "eval", *on_base, *data)
    assert code == 0, err
    assert "warning" not in err and "without double quantization" in err
    code, merged_out, _ = run_cli(capsys, "eval", "--model", merged, *data)
    assert code == 0
    got, expected = json.loads(out), json.loads(merged_out)
    assert got["examples"] == expected["examples"] == 6
    assert got["loss"] == pytest.approx(expected["loss"], abs=TOLERANCE)
    generate = ["generate", "Review: good film", "--max-new-tokens", "6", "--raw"]
    code, text, err = run_cli(capsys, *generate, *on_base)
    assert code == 0, err
    assert (text, 0) == (run_cli(capsys, *generate, "--model", merged)[1], code)


def _gradients(model, ids):
    """(dL/d input embeddings, {adapter key: dL/d tensor}) of the language-model loss."""
    embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=embeddings, labels=ids).loss.backward()
    grads = {
        key.removeprefix("base_model.model."): p.grad
        for key, p in model.named_parameters()
        if p.requires_grad
    }
    return embeddings.grad, grads


@pytest.mark.parametrize(
    ("compute_dtype", "ab_tolerance", "input_tolerance"),
    [(torch.float32, 1e-6, 2e-6), (torch.float16, 1e-4, 1e-3)],
)
def test_gradients_equal_peft_exactly_on_the_plain_path_and_within_rounding_fused(
    tmp_path, compute_dtype, ab_tolerance, input_tolerance
):
    """docs/quantized.md, "Parity with PEFT": all seven projections adapted on an NF4 (double
    quantization) Llama: the plain path's gradients equal PEFT's bit for bit; the fused node's
    within the compute dtype's rounding (measured: float32 1.0e-7 A/B, 3.6e-7 input; float16
    1.2e-5 A/B, 1.7e-4 input)."""
    tiny_models.llama().save_pretrained(tmp_path)

    def base():
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_pretrained(
                tmp_path, quantization_config=config, device_map="cpu", dtype=torch.float32
            ).train()

    fields = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    ours = lorakit.inject(base(), lorakit.LoraConfig(**fields))
    tiny_models.randomize_adapters(ours, std=0.1)
    theirs = peft.get_peft_model(base(), peft.LoraConfig(**fields))
    values = dict(ours.named_parameters())
    with torch.no_grad():
        for key, parameter in theirs.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(values[key.removeprefix("base_model.model.")])
    ids = tiny_models.input_ids()
    their_input, their_grads = _gradients(theirs, ids)
    fused_input, fused_grads = _gradients(ours, ids)
    ours.zero_grad(set_to_none=True)
    with lorakit.fast.plain_path():
        plain_input, plain_grads = _gradients(ours, ids)
    assert their_grads.keys() == fused_grads.keys() == plain_grads.keys()
    assert len(their_grads) == 28 and their_input.abs().max() > 0
    assert torch.equal(plain_input, their_input)
    assert all(torch.equal(plain_grads[key], their_grads[key]) for key in their_grads)
    torch.testing.assert_close(fused_input, their_input, rtol=0, atol=input_tolerance)
    for key, grad in fused_grads.items():
        torch.testing.assert_close(grad, their_grads[key], rtol=0, atol=ab_tolerance)
