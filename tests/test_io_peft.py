"""Adapter files against the real ``peft`` package (the oracle), both directions, and against
transformers' own ``model.load_adapter``.

(a) lorakit saves -> ``peft.PeftModel.from_pretrained`` -> same logits as lorakit's model.
(b) peft saves (rank/alpha patterns, rsLoRA, bias modes, modules_to_save, embeddings, BF16/F16
    files) -> ``lorakit.io.load_adapter`` -> same logits as peft's model.
Every trainable tensor (LoRA A and B, trained biases, saved modules) is perturbed with noise
first, so no tensor can be dropped or mis-mapped without the logits changing.
"""

from __future__ import annotations

import functools
import json
import warnings

import peft
import pytest
import torch
import transformers

import lorakit
from lorakit.io import load_adapter, save_adapter
from tests import tiny_models

QV = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}
EMBEDDING = {"llama": "embed_tokens", "gpt2": "wte", "bert": "word_embeddings"}
SAVED = {"llama": ["lm_head"], "gpt2": ["ln_f"], "bert": ["pooler.dense"]}
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}
TOLERANCE = 1e-5

CONFIGS = {
    "qv": lambda arch: dict(r=4, lora_alpha=8, target_modules=QV[arch]),
    "all-linear-patterns": lambda arch: dict(
        r=4,
        lora_alpha=16,
        target_modules="all-linear",
        rank_pattern={QV[arch][0]: 2},
        alpha_pattern={QV[arch][-1]: 3},
    ),
    "rslora": lambda arch: dict(r=8, lora_alpha=4, use_rslora=True, target_modules=QV[arch]),
    "bias-all": lambda arch: dict(r=4, lora_alpha=8, target_modules=QV[arch], bias="all"),
    "bias-lora-only": lambda arch: dict(
        r=4, lora_alpha=8, target_modules=QV[arch], bias="lora_only"
    ),
    "modules-to-save": lambda arch: dict(
        r=4, lora_alpha=8, target_modules=QV[arch], modules_to_save=SAVED[arch]
    ),
    "embedding": lambda arch: dict(r=4, lora_alpha=8, target_modules=[EMBEDDING[arch], *QV[arch]]),
}
ARCHS = ["llama", "gpt2", "bert"]
MATRIX = [name for name in CONFIGS if name != "qv"]  # "qv" is inside every other config


def _fields(arch: str, config_name: str) -> dict:
    return CONFIGS[config_name](arch) | {"task_type": TASK[arch], "init_lora_weights": False}


def _perturb_trainable(model: torch.nn.Module, seed: int = 7) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.requires_grad:
                noise = torch.randn(parameter.shape, generator=generator) * 0.2
                parameter.add_(noise.to(parameter.dtype))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(tiny_models.input_ids()).logits.float()


@functools.cache
def _base_logits(arch: str) -> torch.Tensor:
    return _logits(tiny_models.BUILDERS[arch]())


def _assert_same_and_not_base(ours: torch.Tensor, theirs: torch.Tensor, arch: str) -> None:
    assert (ours - theirs).abs().max().item() <= TOLERANCE
    base = _base_logits(arch)
    assert (ours - base).abs().max().item() > 1e-3  # the adapter really changes the outputs


@pytest.mark.parametrize("config_name", MATRIX)
@pytest.mark.parametrize("arch", ARCHS)
def test_lorakit_file_loads_in_peft_with_identical_logits(arch, config_name, tmp_path) -> None:
    ours = lorakit.inject(
        tiny_models.BUILDERS[arch](), lorakit.LoraConfig(**_fields(arch, config_name))
    )
    _perturb_trainable(ours)
    save_adapter(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_models.BUILDERS[arch](), tmp_path)
    _assert_same_and_not_base(_logits(ours.eval()), _logits(theirs.eval()), arch)


@pytest.mark.parametrize("config_name", MATRIX)
@pytest.mark.parametrize("arch", ARCHS)
def test_peft_file_loads_in_lorakit_with_identical_logits(arch, config_name, tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            tiny_models.BUILDERS[arch](), peft.LoraConfig(**_fields(arch, config_name))
        )
        _perturb_trainable(theirs)
        theirs.save_pretrained(tmp_path)
    ours = tiny_models.BUILDERS[arch]()
    with pytest.warns(UserWarning, match="no base-model fingerprint"):
        load_adapter(ours, tmp_path)
    _assert_same_and_not_base(_logits(ours), _logits(theirs.eval()), arch)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_peft_half_precision_files_load_like_peft_loads_them(dtype, tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = peft.get_peft_model(
            tiny_models.llama(dtype=dtype),
            peft.LoraConfig(**_fields("llama", "all-linear-patterns")),
            autocast_adapter_dtype=False,
        )
        half.save_pretrained(tmp_path)
        theirs = peft.PeftModel.from_pretrained(tiny_models.llama(), tmp_path)
    stored = lorakit.io.read_adapter(tmp_path).tensors
    assert {t.dtype for t in stored.values()} == {dtype}
    ours = tiny_models.llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_adapter(ours, tmp_path)
    _assert_same_and_not_base(_logits(ours), _logits(theirs.eval()), "llama")


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_load_adapter_accepts_a_lorakit_file(arch, tmp_path) -> None:
    ours = lorakit.inject(tiny_models.BUILDERS[arch](), lorakit.LoraConfig(**_fields(arch, "qv")))
    _perturb_trainable(ours)
    save_adapter(ours, tmp_path)
    plain = tiny_models.BUILDERS[arch]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain.load_adapter(str(tmp_path))
    _assert_same_and_not_base(_logits(ours), _logits(plain), arch)


def test_peft_saves_of_a_lorakit_loaded_adapter_round_trip(tmp_path) -> None:
    """peft file -> lorakit -> lorakit file -> peft: still peft's numbers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            tiny_models.gpt2(), peft.LoraConfig(**_fields("gpt2", "all-linear-patterns"))
        )
        theirs.save_pretrained(tmp_path / "peft")
        ours = tiny_models.gpt2()
        load_adapter(ours, tmp_path / "peft")
        save_adapter(ours, tmp_path / "lorakit")
        again = peft.PeftModel.from_pretrained(tiny_models.gpt2(), tmp_path / "lorakit")
    _assert_same_and_not_base(_logits(again.eval()), _logits(theirs.eval()), "gpt2")


def _three_layer_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def test_all_linear_with_20_or_more_targets_is_written_as_peft_writes_it(tmp_path) -> None:
    """21 targets: peft condenses them to the shortest distinguishing suffixes."""
    import json

    fields = dict(r=2, lora_alpha=4, target_modules="all-linear", task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(_three_layer_llama(), peft.LoraConfig(**fields)).save_pretrained(
            tmp_path / "peft"
        )
    save_adapter(
        lorakit.inject(_three_layer_llama(), lorakit.LoraConfig(**fields)), tmp_path / "ours"
    )
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_modules"]
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["target_modules"]
    assert ours == sorted(theirs)
    assert "q_proj" in ours and "lm_head" not in ours


def test_overlapping_patterns_keep_their_order_so_every_reader_resolves_the_same(tmp_path):
    """Pattern keys are regexes and the first match wins (lorakit and PEFT alike): for
    ``layers.1...q_proj`` "q_proj" (r=2) comes first; sorted, the layer regex (r=4) would win
    and the file would no longer describe its own tensors."""
    patterns = {"q_proj": 2, r"layers\.1\..*": 4}
    config = lorakit.LoraConfig(
        r=3,
        lora_alpha=6,
        target_modules="all-linear",
        init_lora_weights=False,
        rank_pattern=patterns,
        alpha_pattern={"q_proj": 5, r"layers\.1\..*": 7},
    )
    ours = lorakit.inject(tiny_models.llama(), config)
    _perturb_trainable(ours)
    save_adapter(ours, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert list(written["rank_pattern"]) == list(patterns)  # not sorted: order is meaning
    reloaded = tiny_models.llama()
    load_adapter(reloaded, tmp_path)
    assert dict(lorakit.state.lora_layers(reloaded))["model.layers.1.self_attn.q_proj"].ranks == {
        "default": 2
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_models.llama(), tmp_path)
    _assert_same_and_not_base(_logits(ours.eval()), _logits(reloaded), "llama")
    _assert_same_and_not_base(_logits(ours), _logits(theirs.eval()), "llama")


def test_patterns_that_do_not_overlap_are_written_sorted(tmp_path):
    config = lorakit.LoraConfig(
        r=3, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2, "q_proj": 4}
    )
    save_adapter(lorakit.inject(tiny_models.llama(), config), tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert list(written["rank_pattern"]) == ["q_proj", "v_proj"]


def _tied_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(tiny_models.llama_config(tie_word_embeddings=True)).eval()


@pytest.mark.parametrize("save_embedding_layers", [None, True])
@pytest.mark.parametrize("saved", ["lm_head", "embed_tokens"])
def test_a_saved_copy_of_a_tied_embedding_is_loaded_as_the_copy(
    saved, save_embedding_layers, tmp_path
) -> None:
    """On a tied model the file key of a ``modules_to_save`` copy of lm_head / embed_tokens is
    also that embedding's base-weight key (a resized vocabulary): it holds the trained copy,
    and loading it must leave the tied original as it was (it was written over it)."""
    fields = dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=[saved])
    ours = lorakit.inject(_tied_llama(), lorakit.LoraConfig(**fields, init_lora_weights=False))
    _perturb_trainable(ours)
    save_adapter(ours, tmp_path, save_embedding_layers=save_embedding_layers)
    loaded = load_adapter(_tied_llama(), tmp_path)
    expected = _logits(ours.eval())
    torch.testing.assert_close(_logits(loaded), expected, atol=TOLERANCE, rtol=0)
    original = loaded.get_input_embeddings()
    original = getattr(original, "original_module", original)
    assert torch.equal(original.weight, _tied_llama().model.embed_tokens.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_tied_llama(), tmp_path)
    torch.testing.assert_close(_logits(theirs.eval()), expected, atol=TOLERANCE, rtol=0)
