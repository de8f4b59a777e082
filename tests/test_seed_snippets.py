"""The seed article's code samples run on lorakit with ``peft`` -> ``lorakit`` in the imports.

The samples (tests/seed_snippets.py) are copied verbatim from the seed article. The only other
edits, made by ``adapt``: the Llama-2-7B hub id becomes a tiny random Llama saved in a temporary
directory, and the placeholder paths become temporary directories. Each sample also runs with
the real ``peft`` (the oracle) and both must print the same and compute the same. The
``SFTTrainer`` sample runs in tests/test_trl.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import peft
import torch
from torch import nn

import lorakit
from lorakit.state import lora_layers
from tests import tiny_models
from tests.seed_snippets import CONFIG_SNIPPET, LORA_LINEAR_SNIPPET, MERGE_SNIPPET, adapt, run

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "tiny-llama"
    tiny_models.llama().save_pretrained(directory)
    return directory


def test_lora_linear_snippet_prints_the_seed_numbers():
    torch.manual_seed(0)
    namespace, printed = run(LORA_LINEAR_SNIPPET)
    assert "Total parameters:     137,216" in printed
    assert "Frozen (base W0):     131,072" in printed
    assert "Trainable (A + B):    6,144" in printed
    assert "Compression ratio:    21.3x" in printed
    assert "max|BA| = 0.000000" in printed

    # The same layer in lorakit: same counts, and Delta W = 0 at init.
    holder = nn.Module()
    holder.proj = namespace["base"]
    lorakit.inject(holder, lorakit.LoraConfig(r=8, lora_alpha=8.0, target_modules=["proj"]))
    counts = lorakit.count_parameters(holder)
    assert (counts.trainable, counts.total - counts.trainable) == (6_144, 131_072)
    assert f"{(counts.total - counts.trainable) / counts.trainable:.1f}" == "21.3"
    (_, layer), *others = list(lora_layers(holder))
    assert not others
    assert lorakit.functional.lora_parameter_count(512, 256, 8) == 6_144
    assert torch.count_nonzero(layer.delta_weight("default")) == 0
    assert layer.lora_A["default"].weight.shape == namespace["lora"].A.shape == (8, 256)
    assert layer.lora_B["default"].weight.shape == namespace["lora"].B.shape == (512, 8)


def test_lora_linear_snippet_and_lorakit_layer_compute_the_same():
    torch.manual_seed(0)
    namespace, _ = run(LORA_LINEAR_SNIPPET)
    seed_layer = namespace["LoRALinear"](nn.Linear(256, 512, bias=True), r=8, alpha=16.0)
    with torch.no_grad():
        seed_layer.B.normal_(std=0.05)  # as if trained: B != 0
    holder = nn.Module()
    holder.proj = seed_layer.base_layer
    lorakit.inject(holder, lorakit.LoraConfig(r=8, lora_alpha=16.0, target_modules=["proj"]))
    layer = holder.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(seed_layer.A)
        layer.lora_B["default"].weight.copy_(seed_layer.B)
    x = torch.randn(3, 5, 256, dtype=torch.float64).float()
    with torch.no_grad():
        expected = seed_layer(x)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
        delta = (seed_layer.alpha / seed_layer.r) * seed_layer.B @ seed_layer.A
        torch.testing.assert_close(layer.delta_weight("default"), delta, rtol=1e-5, atol=1e-7)
        assert delta.abs().max() > 1e-3


def test_config_snippet_prints_what_peft_prints(tmp_path):
    paths = {"meta-llama/Llama-2-7b-hf": tiny_llama_dir(tmp_path)}
    ours, our_print = run(adapt(CONFIG_SNIPPET, "lorakit", paths))
    theirs, their_print = run(adapt(CONFIG_SNIPPET, "peft", paths))
    assert isinstance(ours["peft_model"], lorakit.PeftModel)
    assert isinstance(theirs["peft_model"], peft.PeftModel)
    assert our_print == their_print
    layers, r = 2, 16  # tiny Llama: hidden 64, KV 32, MLP 96
    per_layer = r * (2 * (64 + 64) + 2 * (64 + 32) + 2 * (64 + 96) + (96 + 64))
    assert our_print.startswith(f"trainable params: {layers * per_layer:,} || all params: ")
    assert next(ours["model"].parameters()).dtype == torch.float16


def test_all_linear_shorthand_adapts_the_seven_projections_like_peft(tmp_path):
    paths = {"meta-llama/Llama-2-7b-hf": tiny_llama_dir(tmp_path)}
    shorthand = CONFIG_SNIPPET.replace("target_modules=[", 'target_modules="all-linear", _=[')
    shorthand = re.sub(r", _=\[[^\]]*\],", ",", shorthand, flags=re.S)
    assert 'target_modules="all-linear",' in shorthand and "gate_proj" not in shorthand
    ours, our_print = run(adapt(shorthand, "lorakit", paths))
    _, their_print = run(adapt(shorthand, "peft", paths))
    assert our_print == their_print
    adapted = {name.rsplit(".", 1)[-1] for name, _ in lora_layers(ours["model"])}
    assert adapted == set(SEVEN)


def test_merge_snippet_after_save_pretrained_matches_peft(tmp_path):
    base_dir = tiny_llama_dir(tmp_path)
    adapter_dir, merged_dir = tmp_path / "lora-adapter", tmp_path / "merged-model"
    paths = {
        "meta-llama/Llama-2-7b-hf": base_dir,
        "path/to/lora-adapter": adapter_dir,
        "path/to/merged-model": merged_dir,
    }
    trained, _ = run(adapt(CONFIG_SNIPPET, "lorakit", paths))
    tiny_models.randomize_adapters(trained["model"], std=0.2)  # stands in for training
    trained["peft_model"].save_pretrained(str(adapter_dir))  # the SFTTrainer snippet's last line

    input_ids = tiny_models.input_ids(batch=1, length=6)
    ours, _ = run(adapt(MERGE_SNIPPET, "lorakit", paths), input_ids=input_ids)
    peft_paths = {**paths, "path/to/merged-model": tmp_path / "peft-merged"}
    theirs, _ = run(adapt(MERGE_SNIPPET, "peft", peft_paths), input_ids=input_ids)
    assert type(ours["merged_model"]) is type(theirs["merged_model"])
    assert not any(isinstance(m, lorakit.layers.LoraLayer) for m in ours["merged_model"].modules())
    ids = tiny_models.input_ids()
    with torch.no_grad():
        our_logits = ours["merged_model"](input_ids=ids).logits
        their_logits = theirs["merged_model"](input_ids=ids).logits
        base_logits = tiny_models.llama()(input_ids=ids).logits
    torch.testing.assert_close(our_logits, their_logits, rtol=1e-5, atol=1e-5)
    assert (our_logits - base_logits).abs().max() > 1e-3
    assert torch.equal(ours["outputs"], theirs["outputs"])
    assert ours["outputs"].shape[1] > 6

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(merged_dir)  # a plain checkpoint
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, our_logits)
