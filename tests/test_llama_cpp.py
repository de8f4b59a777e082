"""Issue 18 item 4 checked by llama.cpp itself (``llama-cpp-python``; skipped where it is not
installed, see DEVELOPERS.md). The built-in SmolLM2 is exported by ``lorakit export`` as an f32
GGUF base, with exported plain, rsLoRA and rank-pattern adapters; llama.cpp's adapter effect

    effect = logits(base + adapter) - logits(base)        (T, vocab) over one prompt

must equal lorakit's: correlation >= 0.99 and relative error ``|got - want|_F / |want|_F`` below
``RELATIVE_BOUND``. The merged f32 GGUF model's effect must equal the unmerged adapter's likewise.

Both sides run in float32, llama.cpp with its KV cache in f32, so what is left is float32
rounding in another summation order. Measured (llama-cpp-python 0.3.36, 2 threads; effects up
to 4-10 in logits): the base 1.2e-6; plain 4.0e-5, rsLoRA 1.1e-5, rank pattern 2.2e-5, merged
8.6e-6, correlations >= 0.9999999. ``RELATIVE_BOUND`` = 1e-3 leaves 25x for other CPUs' kernels
and stays far below a wrongly scaled file: the rsLoRA adapter with the file alpha llama.cpp's
own converter writes (``lora_alpha``: scale alpha/r instead of alpha/sqrt(r)) gives 0.61
(correlation 0.983; ``test_converter_style_rslora_scale_fails_the_bound``). llama.cpp's default
f16 KV cache rounds K and V to 11 bits: 0.004-0.007 then (docs/gguf.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.models import load_model
from tests import tiny_models
from tests.gguf_helpers import with_trained_copy

pytestmark = [pytest.mark.llama_cpp, pytest.mark.integration, pytest.mark.slow]

llama_cpp = pytest.importorskip("llama_cpp")

MODEL = "smollm2-135m-instruct"
ADAPTERS = {
    "plain": dict(r=8, lora_alpha=16),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True),
    "rank-pattern": dict(r=8, lora_alpha=16, rank_pattern={"v_proj": 4, "down_proj": 2}),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
PROMPT = "<|im_start|>user\nA gorgeous, witty, seductive movie.<|im_end|>\n<|im_start|>assistant\n"
RELATIVE_BOUND = 1e-3
CORRELATION_BOUND = 0.99


class Smollm2:
    """The lorakit model, the prompt's tokens, its logits, the f32 base file and llama.cpp's
    logits on it."""

    def __init__(self, folder) -> None:
        self.model, tokenizer = load_model(MODEL, progress=False)
        self.tokens = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
        self.logits = lorakit_logits(self.model, self.tokens)
        self.base = folder / "base.gguf"
        assert export(MODEL, "--type", "f32", "--output", self.base) == 0
        self.llama_logits = llama_logits(self.base, self.tokens)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Smollm2:
    return Smollm2(tmp_path_factory.mktemp("smollm2-llama-cpp"))


def export(*arguments) -> int:
    """``lorakit export ... --format gguf`` in process."""
    return main(["export", *(str(a) for a in arguments), "--format", "gguf"])


def lorakit_logits(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()


def llama_logits(model_path, tokens: list[int], lora_path=None) -> np.ndarray:
    """(T, vocab) logits of every prompt position, by llama.cpp in f32 (weights as in the file,
    KV cache f32), with the GGUF adapter ``lora_path`` applied at scale 1 when given."""
    llm = llama_cpp.Llama(
        model_path=str(model_path),
        lora_path=None if lora_path is None else str(lora_path),
        n_ctx=64,
        n_batch=64,
        n_threads=2,
        logits_all=True,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        verbose=False,
    )
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def agreement(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """``(relative error |got - want| / |want|, Pearson correlation)`` over every logit."""
    relative = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    correlation = float(np.corrcoef(got.ravel(), want.ravel())[0, 1])
    return relative, correlation


def saved_adapter(smollm2: Smollm2, directory, variant: str) -> np.ndarray:
    """Save a random adapter (B != 0) on the model to ``directory``; returns lorakit's effect.
    The model is restored (``lorakit.unload``)."""
    config = lorakit.LoraConfig(target_modules=TARGETS, **ADAPTERS[variant])
    adapted = lorakit.inject(smollm2.model, config)
    try:
        tiny_models.randomize_adapters(adapted, std=0.02)
        effect = lorakit_logits(adapted, smollm2.tokens) - smollm2.logits
        lorakit.save_adapter(adapted, directory)
    finally:
        lorakit.unload(adapted)
    assert np.abs(effect).max() > 0.1  # the adapter changes the outputs
    return effect


def exported_adapter(smollm2: Smollm2, tmp_path, variant: str) -> tuple[np.ndarray, object]:
    """``(lorakit's effect, the adapter exported to GGUF by the CLI)``."""
    want = saved_adapter(smollm2, tmp_path / "adapter", variant)
    gguf_file = tmp_path / "adapter.gguf"
    assert export(tmp_path / "adapter", "--model", MODEL, "--output", gguf_file) == 0
    return want, gguf_file


def test_llama_cpp_base_equals_lorakit(smollm2) -> None:
    """The exported f32 base, run by llama.cpp, gives lorakit's logits: what the adapter effects
    below are measured against."""
    relative, correlation = agreement(smollm2.llama_logits, smollm2.logits)
    assert relative < 1e-4  # measured 1.2e-6
    assert correlation > 0.9999


@pytest.mark.parametrize("variant", list(ADAPTERS))
def test_llama_cpp_adapter_effect_equals_lorakit(smollm2, tmp_path, variant) -> None:
    want, gguf_file = exported_adapter(smollm2, tmp_path, variant)
    got = llama_logits(smollm2.base, smollm2.tokens, gguf_file) - smollm2.llama_logits
    relative, correlation = agreement(got, want)
    assert correlation >= CORRELATION_BOUND
    assert relative < RELATIVE_BOUND


def test_converter_style_rslora_scale_fails_the_bound(smollm2, tmp_path) -> None:
    """The same rsLoRA file with the alpha llama.cpp's converter writes (the config's
    ``lora_alpha``, so llama.cpp scales by alpha/r = 2 instead of alpha/sqrt(r) = 5.66): its
    effect is about a third of lorakit's, far outside the bound, so the check above can fail."""
    import gguf

    want, gguf_file = exported_adapter(smollm2, tmp_path, "rslora")
    reader = gguf.GGUFReader(gguf_file, "r+")
    field = reader.fields["adapter.lora.alpha"]
    assert field.contents() == pytest.approx(16 * 8**0.5)  # folded: alpha/sqrt(r) * r
    field.parts[field.data[0]][0] = ADAPTERS["rslora"]["lora_alpha"]
    reader.data.flush()
    got = llama_logits(smollm2.base, smollm2.tokens, gguf_file) - smollm2.llama_logits
    relative, _ = agreement(got, want)
    assert relative > 0.5  # measured 0.61


def test_llama_cpp_merged_model_equals_the_unmerged_adapter(smollm2, tmp_path) -> None:
    """``lorakit export MODEL --adapter DIR --type f32``: llama.cpp's logits on the merged file
    minus its logits on the base equal lorakit's unmerged adapter effect."""
    want = saved_adapter(smollm2, tmp_path / "adapter", "rslora")
    merged = tmp_path / "merged.gguf"
    assert (
        export(MODEL, "--adapter", tmp_path / "adapter", "--type", "f32", "--output", merged) == 0
    )
    got = llama_logits(merged, smollm2.tokens) - smollm2.llama_logits
    relative, correlation = agreement(got, want)
    assert correlation >= CORRELATION_BOUND
    assert relative < RELATIVE_BOUND


@pytest.mark.parametrize("module", ["lm_head", "embed_tokens"])
def test_llama_cpp_merged_tied_model_with_a_trained_copy_equals_lorakit(tmp_path, module) -> None:
    """A tied tiny Llama whose adapter trains a ``modules_to_save`` copy of ``lm_head`` (or of
    ``embed_tokens``): merged, the head is no longer the embedding, and the f32 export must
    write it as ``output.weight``, so llama.cpp's logits equal lorakit's unmerged adapter's
    (without it llama.cpp used token_embd as the head: relative error 12 / 192). The merge is
    done in process (``merge_and_unload`` + ``export_model``, what ``lorakit export MODEL
    --adapter DIR`` runs after loading the adapter)."""
    import copy

    from lorakit.export.gguf_model import export_model
    from tests import tiny_tokenizer

    tokenizer = tiny_tokenizer.build()
    tokenizer.pad_token = tokenizer.eos_token
    tiny_models.save_llama_with_tokenizer(
        tmp_path / "model",
        tokenizer,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model, tokenizer = load_model(str(tmp_path / "model"), progress=False)
    adapted = with_trained_copy(model, module)
    tokens = [1, 5, 9, 30, 44, 100, 7]
    want = lorakit_logits(adapted, tokens)
    merged = lorakit.merge_and_unload(copy.deepcopy(adapted))
    export_model(merged, tmp_path / "merged.gguf", "f32", tokenizer=tokenizer)
    relative, correlation = agreement(llama_logits(tmp_path / "merged.gguf", tokens), want)
    assert correlation >= CORRELATION_BOUND
    assert relative < RELATIVE_BOUND  # measured 5.5e-7 (lm_head), 1.7e-7 (embed_tokens)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_llama_cpp_runs_llama_and_mistral_with_a_wider_head_dim(tmp_path, arch) -> None:
    """head_dim * heads != hidden_size (``attention.key_length`` written): llama.cpp's llama
    loader reads it, so these stay exportable and give lorakit's logits (Qwen2's loader does
    not: refused, ``test_gguf_model.py``)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    from lorakit.export.gguf_model import export_model
    from tests import tiny_tokenizer

    tokenizer = tiny_tokenizer.build()
    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }
    config_class, model_class = classes[arch]
    sizes = tiny_models.DECODER_SIZES | {"vocab_size": len(tokenizer), "head_dim": 32}
    torch.manual_seed(0)
    model = model_class(config_class(**sizes)).eval()
    export_model(model, tmp_path / "m.gguf", "f32", tokenizer=tokenizer)
    tokens = [1, 5, 9, 30, 44, 100, 7]
    relative, correlation = agreement(
        llama_logits(tmp_path / "m.gguf", tokens), lorakit_logits(model, tokens)
    )
    assert correlation >= CORRELATION_BOUND
    assert relative < 1e-4


@pytest.mark.parametrize("template", [None, "bos", "both"])
def test_llama_cpp_adds_the_special_tokens_the_tokenizer_adds(tmp_path, template) -> None:
    """A tokenizer that adds BOS through its post-processor (Llama 3's tokenizer.json): llama.cpp
    tokenizing with the file's flags gives the tokenizer's ids, BOS (and EOS) included."""
    from lorakit.export.gguf_model import export_model
    from tests.gguf_helpers import with_post_processor

    tokenizer = with_post_processor(template)
    model = tiny_models.save_llama_with_tokenizer(tmp_path / "hf", tokenizer)
    export_model(model, tmp_path / "m.gguf", "f32", tokenizer=tokenizer)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    try:
        text = "the lazy dog is fine"
        got = llm.tokenize(text.encode(), add_bos=True, special=False)
    finally:
        llm.close()
    want = tokenizer(text)["input_ids"]
    assert (want[0] == tokenizer.bos_token_id) == (template is not None)
    assert got == want
