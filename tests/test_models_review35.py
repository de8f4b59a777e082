"""Review 35 of how lorakit loads a base model, each checked against transformers'
``from_pretrained``: the float32 parameters a model class keeps (``_keep_in_fp32_modules``,
``_keep_in_fp32_modules_strict``) stay float32 under a quantized load, an adapter saved into a
built-in's folder is refused, a classifier checkpoint loaded as a causal LM is named as one,
an empty spec is refused, and a bare Hub id gets the snapshot_download hint."""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import UserError
from lorakit.models import load_model
from lorakit.quantized import is_quantized
from tests import tiny_models, tiny_tokenizer


def _save_with_tokenizer(model, directory):
    model.save_pretrained(directory)
    tiny_tokenizer.build().save_pretrained(directory)
    return directory


def _float_parameters(model) -> dict[str, torch.Tensor]:
    """Every float parameter by name, less quantized layers' storage (their codes, scales)."""
    found = {}
    for module_name, module in model.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            if is_quantized(module) and name != "bias":
                continue
            if parameter.is_floating_point():
                found[f"{module_name}.{name}" if module_name else name] = parameter
    return found


@pytest.fixture(scope="module")
def rwkv_dir(tmp_path_factory):
    """A tiny RWKV (``_keep_in_fp32_modules = ["time_decay", "time_first"]``), random values in
    its time_decay so that float16 rounds them."""
    from transformers import RwkvConfig, RwkvForCausalLM

    torch.manual_seed(0)
    config = RwkvConfig(
        vocab_size=320,
        hidden_size=32,
        num_hidden_layers=2,
        attention_hidden_size=32,
        intermediate_size=64,
        context_length=64,
    )
    model = RwkvForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "time_decay" in name or "time_first" in name:
                parameter.normal_()
    return _save_with_tokenizer(model, tmp_path_factory.mktemp("rwkv"))


@pytest.mark.parametrize("quantization", ["int8-rows", "int4-groups"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_quantized_rwkv_keeps_the_float32_parameters_from_pretrained_keeps(
    rwkv_dir, quantization, dtype
):
    """At float16 transformers keeps time_decay / time_first in float32 (their float16 rounding
    was off by up to 1.9e-3); at bfloat16 (not strict) it casts them. Every float parameter of
    the quantized load has from_pretrained's dtype, the kept ones the checkpoint's values."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(rwkv_dir, dtype=dtype)
    exact = dict(AutoModelForCausalLM.from_pretrained(rwkv_dir).named_parameters())
    model, _ = load_model(rwkv_dir, dtype=dtype, quantization=quantization, progress=False)
    expected = dict(reference.named_parameters())
    loaded = _float_parameters(model)
    assert set(loaded) < set(expected) and len(loaded) > 10
    for name, parameter in loaded.items():
        assert parameter.dtype == expected[name].dtype, name
    kept = [name for name in loaded if name.endswith(("time_decay", "time_first"))]
    assert len(kept) == 4
    for name in kept:
        if dtype == torch.float16:
            assert loaded[name].dtype == torch.float32
            assert torch.equal(loaded[name], exact[name])  # not rounded to float16
        else:
            assert loaded[name].dtype == torch.bfloat16
        assert torch.equal(loaded[name].float(), expected[name].float())


@pytest.fixture(scope="module")
def dots1_dir(tmp_path_factory):
    """A tiny Dots1 MoE (``_keep_in_fp32_modules_strict = ["e_score_correction_bias",
    "gate.weight"]``: its routers), with a random correction bias."""
    from transformers import Dots1Config, Dots1ForCausalLM

    torch.manual_seed(0)
    config = Dots1Config(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        max_position_embeddings=64,
    )
    model = Dots1ForCausalLM(config)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if "e_score_correction_bias" in name:
                buffer.normal_()
    return _save_with_tokenizer(model, tmp_path_factory.mktemp("dots1"))


@pytest.mark.parametrize("quantization", ["int8-rows", "int4-groups", "nf4"])
def test_a_quantized_moe_at_bfloat16_routes_as_from_pretrained(dots1_dir, quantization):
    """The router weight stays float32 at bfloat16 (strict), as from_pretrained loads it: the
    router's logits on 4000 tokens are from_pretrained's exactly, and so is every token's
    choice of experts (with a bfloat16 router, 9 of 4000 tokens picked other experts)."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16
    reference = AutoModelForCausalLM.from_pretrained(dots1_dir, dtype=dtype)
    model, _ = load_model(dots1_dir, dtype=dtype, quantization=quantization, progress=False)
    expected = dict(reference.named_parameters())
    loaded = _float_parameters(model)
    for name, parameter in loaded.items():
        if name in expected:
            assert parameter.dtype == expected[name].dtype, name
    name = "model.layers.1.mlp.gate.weight"
    assert loaded[name].dtype == torch.float32
    assert torch.equal(loaded[name], expected[name])
    hidden = torch.randn(4000, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        logits, _, indices = model.model.layers[1].mlp.gate(hidden)
        ref_logits, _, ref_indices = reference.model.layers[1].mlp.gate(hidden)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(indices.sort(-1).values, ref_indices.sort(-1).values)


def test_kept_in_float32_matches_as_transformers_does(tiny_llama):
    """transformers' rule: ``_keep_in_fp32_modules`` at float16 only, the strict list at
    float16 and bfloat16, each entry searched anywhere in the name with ``*`` as ``.*``."""
    from lorakit.quantized.loading import kept_in_float32

    tiny_llama._keep_in_fp32_modules = {"norm"}
    tiny_llama._keep_in_fp32_modules_strict = {"layers.*.q_proj.bias"}
    assert kept_in_float32(tiny_llama, torch.float32) is None
    half = kept_in_float32(tiny_llama, torch.float16)
    brain = kept_in_float32(tiny_llama, torch.bfloat16)
    assert half.search("model.layers.0.input_layernorm.weight")
    assert not brain.search("model.layers.0.input_layernorm.weight")
    assert brain.search("model.layers.11.self_attn.q_proj.bias")
    assert not brain.search("model.layers.0.self_attn.k_proj.bias")


def test_an_adapter_saved_into_the_converted_builtin_is_refused(tiny_builtin_model, tmp_path):
    """transformers applied it on every load of the built-in (logits off by 0.46, no word):
    refused, naming the files to delete."""
    import lorakit
    from lorakit.model_specs import resolve_model

    folder = resolve_model("smollm2-135m-instruct")
    base, _ = load_model("smollm2-135m-instruct", progress=False)
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lorakit.inject(base, config)
    lorakit.save_adapter(base, str(folder))
    with pytest.raises(UserError) as caught:
        load_model("smollm2-135m-instruct", progress=False)
    message = str(caught.value)
    assert f"the built-in model smollm2-135m-instruct's folder {folder} holds an adapter" in message
    assert (
        f"Delete these files: {folder / 'adapter_config.json'}, "
        f"{folder / 'adapter_model.safetensors'};"
    ) in message
    (folder / "adapter_config.json").unlink()
    (folder / "adapter_model.safetensors").unlink()
    again, _ = load_model("smollm2-135m-instruct", progress=False)
    assert not any("lora" in name for name, _ in again.named_parameters())


def test_an_adapter_in_the_packaged_builtin_folder_is_refused(monkeypatch, tmp_path):
    from lorakit import model_specs

    monkeypatch.setattr(model_specs, "_package_folder", lambda builtin: tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert model_specs.resolve_model("minilm-l6") == tmp_path / "model"
    (tmp_path / "model" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match=r"the built-in model minilm-l6's folder .* Delete these"):
        model_specs.resolve_model("minilm-l6")


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """An untied LlamaForSequenceClassification with a trained 3-label head."""
    from transformers import LlamaForSequenceClassification

    config = tiny_models.llama_config(tie_word_embeddings=False, num_labels=3, pad_token_id=2)
    model = LlamaForSequenceClassification(config)
    return _save_with_tokenizer(model, tmp_path_factory.mktemp("seqcls"))


def test_a_classifier_checkpoint_loaded_as_a_causal_lm_is_named_so(classifier_dir):
    from transformers import AutoModelForSequenceClassification

    with pytest.raises(UserError) as caught:
        load_model(classifier_dir, progress=False)
    message = str(caught.value)
    assert "is a sequence classifier (LlamaForSequenceClassification)" in message
    assert "no LM head (lm_head.weight" in message
    assert "load_model(path, task='seq-cls')" in message
    assert "--task seq-cls" in message
    assert "save the complete model" not in message
    model, _ = load_model(classifier_dir, task="seq-cls", progress=False)  # the way out works
    reference = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    ids = torch.tensor([[5, 6, 7, 2]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_a_causal_lm_lacking_its_lm_head_is_still_told_to_save_it_again(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM

    config = tiny_models.llama_config(tie_word_embeddings=False)
    directory = _save_with_tokenizer(LlamaForCausalLM(config), tmp_path / "m")
    tensors = load_file(directory / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"lacks 1 of the model's weights \(lm_head.weight\)"):
        load_model(directory, progress=False)


@pytest.mark.parametrize("spec", ["", " ", "\t\n"])
def test_an_empty_spec_is_refused_not_read_as_the_current_directory(spec, model_dir, monkeypatch):
    """``Path("")`` is ".": ``--model ""`` loaded the model lying in the current directory."""
    from lorakit.model_specs import check_model_spec, resolve_model

    monkeypatch.chdir(model_dir)  # a loadable model here
    for call in (resolve_model, check_model_spec, lambda s: load_model(s, progress=False)):
        with pytest.raises(UserError, match=r"the model spec is empty .*\(\"\.\" for the current"):
            call(spec)
    assert (resolve_model(".") / "config.json").is_file()  # the way out


def test_generate_with_an_empty_model_is_refused(model_dir, monkeypatch, capsys):
    from lorakit.cli import main

    monkeypatch.chdir(model_dir)
    assert main(["generate", "hi", "--model", "", "--max-new-tokens", "1"]) == 2
    assert "the model spec is empty" in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["gpt2", "distilgpt2", "t5-small", "bert-base-uncased"])
def test_a_bare_hub_id_gets_the_snapshot_download_hint(spec, tmp_path, monkeypatch):
    from lorakit.model_specs import resolve_model

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as caught:
        resolve_model(spec)
    message = str(caught.value)
    assert message.startswith(f"unknown model '{spec}': not a directory and not a built-in")
    assert f"If '{spec}' is a Hugging Face Hub model id, fetch it first with " in message
    assert f"huggingface_hub.snapshot_download('{spec}')" in message


def test_the_bare_name_hint_is_for_model_specs_only(tmp_path):
    """A missing adapter directory named by one word is a path, not a Hub id (adapters on the
    Hub are owner/name): no hint there; nor for a spec that is no single name token."""
    from lorakit.io.adapter_dirs import hub_id_hint

    assert hub_id_hint("gpt2") == ""
    assert hub_id_hint("gpt2", bare_names=True).startswith(" If 'gpt2' is a Hugging Face")
    for spec in ("./gpt2", "~/gpt2", "my model", ".hidden", "a/b/c"):
        assert hub_id_hint(spec, bare_names=True) == ""
    assert "looks like a Hugging Face Hub repository id" in hub_id_hint("o/n", bare_names=True)
