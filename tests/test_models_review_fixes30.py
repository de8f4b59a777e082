"""Review fixes (round 30) to ``lorakit.models`` loading: encoders with a causal-LM class, custom
code (``auto_map``), missing body weights under ``task="seq-cls"``, a Hub id's hint, a broken
config.json, a trained head's label count, and weight-only quantization that quantizes no
block layer. Every model is a tiny one saved under ``tmp_path``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    CamembertConfig,
    CamembertForMaskedLM,
    ErnieConfig,
    ErnieForMaskedLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaForSequenceClassification,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForCausalLM,
)

from lorakit import model_checks, models
from lorakit.errors import UserError
from lorakit.quantized import is_quantized
from tests import tiny_models, tiny_tokenizer

ENCODER_SIZES = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=130,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def _save(directory: Path, model: torch.nn.Module) -> Path:
    """``model`` and a tiny tokenizer saved into ``directory`` (returned)."""
    model.save_pretrained(directory)
    tiny_tokenizer.build().save_pretrained(directory)
    return directory


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(config | changes))


def _sees_later_tokens(model: torch.nn.Module) -> bool:
    """Whether position 0's logits change when token 4 changes (bidirectional attention)."""
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    changed = ids.clone()
    changed[0, 4] = 100
    with torch.no_grad():
        first = model(input_ids=ids).logits[0, 0]
        second = model(input_ids=changed).logits[0, 0]
    return not torch.equal(first, second)


# ------------------------------------------------------------------- 1. BERT-like encoders
@pytest.mark.parametrize(
    ("name", "build"),
    [
        (
            "camembert",
            lambda: CamembertForMaskedLM(CamembertConfig(vocab_size=320, **ENCODER_SIZES)),
        ),
        ("ernie", lambda: ErnieForMaskedLM(ErnieConfig(vocab_size=320, **ENCODER_SIZES))),
        # a RobertaForCausalLM saved without is_decoder: its architecture says causal LM
        ("roberta", lambda: RobertaForCausalLM(RobertaConfig(vocab_size=320, **ENCODER_SIZES))),
    ],
)
def test_bert_like_encoders_are_refused_as_causal_lms(tmp_path: Path, name, build) -> None:
    """transformers would load them as *ForCausalLM with is_decoder false: bidirectional."""
    torch.manual_seed(0)
    directory = _save(tmp_path / name, build())
    with pytest.raises(UserError, match=rf"is an encoder \({name}\).*task='seq-cls'.*is_decoder"):
        models.load_model(directory, progress=False)
    _edit_config(directory, is_decoder=True)  # the way out for a real decoder
    model, _ = models.load_model(directory, progress=False)
    assert model.config.is_decoder
    assert not _sees_later_tokens(model)


def test_the_bidirectional_types_are_exactly_the_masked_lm_ones_less_encoder_decoders() -> None:
    """The rule: a masked-LM model type that is not an encoder-decoder (whose causal-LM class is
    its decoder, is_decoder set by the class) is refused; real decoders have no masked-LM
    class."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    types = model_checks.bidirectional_types()
    for model_type in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) & set(
        MODEL_FOR_MASKED_LM_MAPPING_NAMES
    ):
        encoder_decoder = bool(AutoConfig.for_model(model_type).is_encoder_decoder)
        assert (model_type in types) is not encoder_decoder, model_type
    decoders = ("llama", "qwen2", "gpt2", "mistral", "phi3", "gemma", "gemma2", "gpt_neox")
    for model_type in decoders:
        assert model_type not in types
        model_checks.refuse_encoder(Path("d"), {"model_type": model_type})  # no error
    assert {"camembert", "ernie", "xlm-roberta-xl", "bert-generation"} <= types


@pytest.mark.parametrize(
    "build",
    [
        lambda: GPTNeoXForCausalLM(
            GPTNeoXConfig(
                vocab_size=320,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                intermediate_size=64,
            )
        ),
        lambda: Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=320,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=64,
            )
        ),
        tiny_models.gpt2,
    ],
)
def test_real_decoders_still_load_causally(tmp_path: Path, build) -> None:
    """gpt_neox's config says is_decoder false too: it has no masked-LM class, so it loads."""
    torch.manual_seed(0)
    model = build()
    if model.config.vocab_size < 320:
        model.resize_token_embeddings(320)
    directory = _save(tmp_path / "decoder", model)
    loaded, _ = models.load_model(directory, progress=False)
    assert not _sees_later_tokens(loaded)


# ------------------------------------------------------------------------- 2. custom code
def _custom_code_directory(directory: Path, model_type: str) -> Path:
    """A tiny Llama whose config names custom code (auto_map) that writes a marker when run."""
    _save(directory, tiny_models.llama())
    marker = directory / "RAN_CUSTOM_CODE"
    (directory / "configuration_custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig\n"
        f"class CustomConfig(LlamaConfig):\n    model_type = {model_type!r}\n"
    )
    (directory / "modeling_custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaForCausalLM as CustomForCausalLM\n"
    )
    _edit_config(
        directory,
        model_type=model_type,
        auto_map={
            "AutoConfig": "configuration_custom.CustomConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
        },
    )
    return marker


def _no_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args):
        raise AssertionError(f"prompted: {args}")

    monkeypatch.setattr("builtins.input", refuse)


def test_custom_code_is_refused_before_anything_loads(tmp_path, monkeypatch) -> None:
    _no_prompt(monkeypatch)
    marker = _custom_code_directory(tmp_path / "remote", "custom_llm")
    for task in ("causal-lm", "seq-cls"):
        with pytest.raises(UserError, match=r"custom code.*auto_map.*built into transformers"):
            models.load_model(tmp_path / "remote", task=task, progress=False)
    assert not marker.exists()


def test_auto_map_of_a_built_in_type_loads_the_built_in_class(tmp_path, monkeypatch) -> None:
    """transformers ignores auto_map under trust_remote_code=False when the type is built in."""
    _no_prompt(monkeypatch)
    marker = _custom_code_directory(tmp_path / "llama", "llama")
    model, _ = models.load_model(tmp_path / "llama", progress=False)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()


# --------------------------------------------------------- 3. seq-cls: missing body weights
def test_seq_cls_refuses_a_checkpoint_missing_a_body_weight(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer.build()
    directory = tmp_path / "llama"
    tiny_models.save_llama_with_tokenizer(directory, tokenizer)
    model, _ = models.load_model(directory, task="seq-cls", progress=False)  # new head: fine
    reference = load_file(directory / "model.safetensors")
    assert torch.equal(
        model.model.layers[1].mlp.down_proj.weight, reference["model.layers.1.mlp.down_proj.weight"]
    )
    reference.pop("model.layers.1.mlp.down_proj.weight")
    save_file(reference, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"lacks 1 of .*model\.layers\.1\.mlp\.down_proj\.weight"):
        models.load_model(directory, task="seq-cls", progress=False)


# ------------------------------------------------------------------ 4. a Hub id's error
def test_a_hub_id_gets_the_snapshot_download_hint(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        UserError, match=r"unknown model 'owner/name'.*snapshot_download\('owner/name'\)"
    ):
        models.resolve_model("owner/name")
    with pytest.raises(UserError, match=r"unknown model 'gpt2'") as error:
        models.resolve_model("gpt2")
    assert "snapshot_download('gpt2')" in str(error.value)  # a bare Hub id too (round 35)


# ----------------------------------------------------------------- 5. a broken config.json
@pytest.mark.parametrize("text", ["{", "[]", "\xff"])
def test_a_broken_config_json_is_reported_by_name(tmp_path: Path, text) -> None:
    directory = tmp_path / "llama"
    tiny_models.save_llama_with_tokenizer(directory, tiny_tokenizer.build())
    (directory / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(UserError, match=r"config\.json.*model\.save_pretrained") as error:
        models.load_model(directory, progress=False)
    assert "tokenizer" not in str(error.value)


# ------------------------------------------------------------ 6. a trained head's labels
def test_seq_cls_defaults_to_the_trained_heads_label_count(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = tiny_models.llama_config(vocab_size=320, num_labels=3, pad_token_id=0)
    directory = _save(tmp_path / "cls3", LlamaForSequenceClassification(config))
    reference = load_file(directory / "model.safetensors")
    for labels in (None, 3):
        model, _ = models.load_model(directory, task="seq-cls", num_labels=labels, progress=False)
        assert model.config.num_labels == 3
        assert torch.equal(model.score.weight, reference["score.weight"])
    with pytest.raises(UserError, match=r"head with 3 labels; pass num_labels=3"):
        models.load_model(directory, task="seq-cls", num_labels=2, progress=False)
    plain = tmp_path / "plain"
    tiny_models.save_llama_with_tokenizer(plain, tiny_tokenizer.build())
    model, _ = models.load_model(plain, task="seq-cls", progress=False)  # new head: 2
    assert model.score.weight.shape[0] == 2
    model, _ = models.load_model(plain, task="seq-cls", num_labels=5, progress=False)
    assert model.score.weight.shape[0] == 5


# -------------------------------------------------- 7. weight-only formats with no block layer
@pytest.mark.parametrize("quantization", ["int8-rows", "int4-groups"])
@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
def test_weight_only_formats_refuse_a_model_with_no_block_linear(
    tmp_path: Path, quantization, task
) -> None:
    """GPT-2's blocks are Conv1D: nothing would be quantized (int8-rows would even add a copy
    of the tied output layer)."""
    model = tiny_models.gpt2()
    model.resize_token_embeddings(320)
    directory = _save(tmp_path / "gpt2", model)
    with pytest.raises(UserError, match=rf"--quantization {quantization}: no layer of this GPT2"):
        models.load_model(directory, task=task, quantization=quantization, progress=False)


def test_int4_groups_refuses_sizes_that_are_not_multiples_of_32(tmp_path: Path) -> None:
    directory = tmp_path / "llama24"
    tiny_models.save_llama_with_tokenizer(
        directory, tiny_tokenizer.build(), hidden_size=24, intermediate_size=40
    )
    with pytest.raises(UserError, match=r"no layer of this LlamaForCausalLM"):
        models.load_model(directory, quantization="int4-groups", progress=False)
    model, _ = models.load_model(directory, quantization="int8-rows", progress=False)
    assert sum(is_quantized(module) for module in model.modules()) == 2 * 7 + 1
    wide = tmp_path / "llama64"
    tiny_models.save_llama_with_tokenizer(wide, tiny_tokenizer.build())
    model, _ = models.load_model(wide, quantization="int4-groups", progress=False)
    assert sum(is_quantized(module) for module in model.modules()) == 2 * 7 + 1
