"""Issue 18 item 4 without llama.cpp at hand, on the built-in SmolLM2: the base exported as an
f32 GGUF plus exported adapters (plain, rsLoRA, rank pattern). The reference applies
llama.cpp's formula to the files in float64 (``W + (alpha / r) B A`` per adapted GGUF tensor,
r = lora_b's ne[0]) and rebuilds the model through transformers' GGUF loader (its own inverse of
llama.cpp's q/k permutation); its adapter effect (logits with the adapter minus without) must
equal lorakit's. The merged GGUF model must equal the unmerged adapter likewise. The same
comparison against llama.cpp itself is left for a session that builds it (docs/gguf.md)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lorakit
from lorakit.export.gguf_adapter import export_adapter
from lorakit.export.gguf_model import export_model
from lorakit.models import load_model
from tests import tiny_models
from tests.gguf_helpers import reader_fields, reader_tensors, transformers_row_order

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ADAPTERS = {
    "plain": dict(r=8, lora_alpha=16),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True),
    "rank-pattern": dict(r=8, lora_alpha=16, rank_pattern={"v_proj": 4, "down_proj": 2}),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """``(lorakit model, its logits, transformers' model rebuilt from the f32 base.gguf)``."""
    from transformers import AutoModelForCausalLM

    model, _ = load_model("smollm2-135m-instruct", progress=False)
    folder = tmp_path_factory.mktemp("smollm2-gguf")
    export_model(model, folder / "base.gguf", "f32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rebuilt = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file="base.gguf", dtype=torch.float32
        ).eval()
    (folder / "base.gguf").unlink()  # 540 MB
    return model, logits(model), rebuilt


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tiny_models.input_ids(vocab=49152, length=16)).logits.double()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def adapted_in_place(model, variant: str):
    """``model`` with a random adapter (B != 0) injected; ``lorakit.unload`` restores it."""
    adapted = lorakit.inject(model, lorakit.LoraConfig(target_modules=TARGETS, **ADAPTERS[variant]))
    tiny_models.randomize_adapters(adapted, std=0.02)
    return adapted


@pytest.mark.parametrize("variant", list(ADAPTERS))
def test_llama_cpp_formula_on_the_files_equals_lorakit_effect(smollm2, tmp_path, variant) -> None:
    """The rebuilt model's weights are the base file's rows (transformers' order); the file's
    ``(alpha / r) B A`` is added in float64 after mapping its GGUF rows back likewise."""
    model, base_logits, rebuilt = smollm2
    adapted = adapted_in_place(model, variant)
    try:
        want = logits(adapted) - base_logits
        lorakit.save_adapter(adapted, tmp_path / "adapter")
    finally:
        lorakit.unload(adapted)
    done = export_adapter(tmp_path / "adapter", model, tmp_path / "a.gguf")
    arrays = reader_tensors(done.path)
    alpha = reader_fields(done.path)["adapter.lora.alpha"]
    originals = {m: rebuilt.get_submodule(m).weight.detach().clone() for m in done.modules}
    try:
        with torch.no_grad():
            for module, name in done.modules.items():
                lora_a, lora_b = arrays[name + ".lora_a"], arrays[name + ".lora_b"]
                delta = (alpha / lora_b.shape[1]) * lora_b @ lora_a  # r = lora_b's ne[0]
                if name.split(".")[-2] in ("attn_q", "attn_k"):
                    delta = transformers_row_order(delta, name, model.config)
                weight = originals[module].double() + torch.from_numpy(delta)
                rebuilt.get_submodule(module).weight.copy_(weight)
            got = logits(rebuilt) - base_logits
    finally:
        with torch.no_grad():
            for module, weight in originals.items():
                rebuilt.get_submodule(module).weight.copy_(weight)
    assert relative_error(got, want) < 1e-4
    assert want.abs().max() > 0.1  # the adapter changes the outputs


def test_rebuilt_base_equals_the_model(smollm2) -> None:
    _, base_logits, rebuilt = smollm2
    assert relative_error(logits(rebuilt), base_logits) < 1e-6


def test_merged_gguf_model_equals_the_unmerged_adapter(smollm2, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model, base_logits, _ = smollm2
    adapted = adapted_in_place(copy.deepcopy(model), "rslora")
    want = logits(adapted) - base_logits
    export_model(lorakit.merge_and_unload(adapted), tmp_path / "merged.gguf", "f32")
    del adapted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file="merged.gguf", dtype=torch.float32
        ).eval()
    assert relative_error(logits(merged) - base_logits, want) < 1e-4
