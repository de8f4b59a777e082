"""Fixes from the layers review: ``layer_replication`` on models with ``config.layer_types``
(Qwen2, Gemma2) and its merged save, trainable tokens with embedding weights in the file (a
resized vocabulary), the embedding's lookup options on the LoRA branch, ``lora_bias`` on a base
without bias, and the trainable-token wrapper's ``weight``. Checked against PEFT 0.21 where it
runs, else against a model built without lorakit's replication."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import lorakit
from tests.tiny_models import DECODER_SIZES, llama, llama_config, randomize_adapters

IDS = torch.tensor([[1, 5, 9, 3, 0, 127, 4, 4], [4, 4, 2, 100, 7, 8, 11, 12]])


# ------------------------------------------------------------------ layer_replication, layer_types
def _gemma2(layers: int = 2, layer_types=("sliding_attention", "full_attention")):
    torch.manual_seed(0)
    config = Gemma2Config(
        **(DECODER_SIZES | dict(num_hidden_layers=layers)),
        head_dim=16,
        sliding_window=4,
        layer_types=list(layer_types),
    )
    return Gemma2ForCausalLM(config).eval()


def _qwen2(layers: int = 2, layer_types=None):
    torch.manual_seed(0)
    extra = {} if layer_types is None else {"layer_types": list(layer_types)}
    config = Qwen2Config(**(DECODER_SIZES | dict(num_hidden_layers=layers)), **extra)
    return Qwen2ForCausalLM(config).eval()


BUILDERS = {"gemma2": _gemma2, "qwen2": _qwen2}


def _replicated(kind: str, layer_map):
    model = BUILDERS[kind]()
    config = lorakit.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], layer_replication=layer_map
    )
    lorakit.inject(model, config)
    randomize_adapters(model, seed=3, std=0.2)  # B != 0, each copy its own factors
    return model


def _reference(kind: str, model, indices: list[int], layer_types: list[str]):
    """A plain model of ``len(indices)`` layers (layer n holding original layer indices[n]'s
    weights) with the replicated model's adapters injected without replication."""
    original = BUILDERS[kind]()
    reference = BUILDERS[kind](len(indices), layer_types)
    state = {k: v for k, v in original.state_dict().items() if ".layers." not in k}
    for n, i in enumerate(indices):
        for key, value in original.model.layers[i].state_dict().items():
            state[f"model.layers.{n}.{key}"] = value
    reference.load_state_dict(state)
    config = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    lorakit.inject(reference, config)
    reference.load_state_dict(model.state_dict())  # same keys: the adapters' factors
    return reference


@pytest.mark.parametrize(
    "kind, layer_map",
    [("gemma2", [[0, 2], [1, 2]]), ("gemma2", [[1, 2], [0, 2]]), ("qwen2", [[0, 2], [1, 2]])],
)
def test_replication_replicates_layer_types_and_equals_a_plain_deeper_model(
    kind, layer_map
) -> None:
    model = _replicated(kind, layer_map)
    types = BUILDERS[kind]().config.layer_types
    indices = [i for start, end in layer_map for i in range(start, end)]
    assert model.config.layer_types == [types[i] for i in indices]
    reference = _reference(kind, model, indices, [types[i] for i in indices])
    with torch.no_grad():
        expected = reference(IDS, use_cache=False).logits
        torch.testing.assert_close(model(IDS).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(IDS, use_cache=True).logits, expected, rtol=0, atol=1e-5)
        prompt, step = IDS[:1, :5], IDS[:1, 5:6]
        cache = model(prompt, use_cache=True).past_key_values  # one cached step = no cache
        cached = model(step, past_key_values=cache, use_cache=True).logits[:, -1]
        full = model(IDS[:1, :6], use_cache=False).logits[:, -1]
        torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)
        generated = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
        reference_generated = reference.generate(
            prompt, max_new_tokens=5, do_sample=False, use_cache=True
        )
        assert torch.equal(generated, reference_generated)
    lorakit.unload(model)
    assert model.config.layer_types == types and model.config.num_hidden_layers == 2
    assert len(model.model.layers) == 2


# ------------------------------------------------------------ layer_replication, merged model saved
@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_replicated_merged_model_saves_and_reloads_with_its_outputs(kind, tmp_path) -> None:
    if kind == "llama":
        model = lorakit.inject(
            llama(),
            lorakit.LoraConfig(
                r=2,
                lora_alpha=4,
                target_modules=["q_proj", "v_proj"],
                layer_replication=[[0, 2], [1, 2]],
            ),
        )
        randomize_adapters(model, seed=3, std=0.2)
    else:
        model = _replicated("gemma2", [[0, 2], [1, 2]])
    with torch.no_grad():
        expected = model(IDS).logits
    lorakit.save_merged_model(model, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert len(reloaded.model.layers) == 3 and reloaded.config.num_hidden_layers == 3
    if kind == "gemma2":
        assert reloaded.config.layer_types == [
            "sliding_attention",
            "full_attention",
            "full_attention",
        ]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, expected, rtol=0, atol=1e-5)


def test_merge_and_unload_gives_each_layer_copy_its_own_tensors() -> None:
    model = _replicated("qwen2", [[0, 2], [1, 2]])
    with torch.no_grad():
        expected = model(IDS).logits
    plain = lorakit.merge_and_unload(model)
    pointers = {}
    for name, tensor in [*plain.named_parameters(), *plain.named_buffers()]:
        if ".layers." in name:
            assert tensor.data_ptr() not in pointers, (name, pointers.get(tensor.data_ptr()))
            pointers[tensor.data_ptr()] = name
    assert torch.equal(
        plain.model.layers[1].mlp.up_proj.weight, plain.model.layers[2].mlp.up_proj.weight
    )
    assert lorakit.replication.replicated_map(plain) is None
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS).logits, expected, rtol=0, atol=1e-5)


# ------------------------------------------------ trainable tokens with the embedding in the file
def _resized(seed: int, directory) -> LlamaForCausalLM:
    """The tiny Llama saved in ``directory`` (once), loaded from it and given 2 tokens (rows
    128, 129 drawn from ``seed``): the vocabulary differs from the base directory's."""
    if not (directory / "config.json").is_file():
        llama().save_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    torch.manual_seed(seed)
    model.resize_token_embeddings(130, mean_resizing=False)
    return model


TOKENS = dict(r=2, lora_alpha=4, target_modules=["q_proj"], trainable_token_indices=[128])
TOKEN_IDS = torch.tensor([[1, 128, 5, 129, 7]])


def _tokens_model(directory):
    model = lorakit.inject(_resized(5, directory), lorakit.LoraConfig(**TOKENS))
    randomize_adapters(model, seed=4, std=0.2)
    return model


@pytest.mark.parametrize("save_embedding_layers", [None, True])
def test_resized_vocabulary_with_trainable_tokens_reloads_exactly(
    save_embedding_layers, tmp_path
) -> None:
    model = _tokens_model(tmp_path / "base")
    with torch.no_grad():
        expected = model(TOKEN_IDS).logits
    lorakit.save_adapter(model, tmp_path / "lk", save_embedding_layers=save_embedding_layers)
    keys = load_file(tmp_path / "lk" / "adapter_model.safetensors")
    base_key = "base_model.model.model.embed_tokens.token_adapter.base_layer.weight"
    torch.testing.assert_close(keys[base_key], model.model.embed_tokens.weight, rtol=0, atol=0)
    fresh = lorakit.load_adapter(
        _resized(99, tmp_path / "base"), tmp_path / "lk", activate=True
    )  # row 129 differs
    with torch.no_grad():
        torch.testing.assert_close(fresh(TOKEN_IDS).logits, expected, rtol=0, atol=0)


def test_trainable_tokens_embedding_files_load_both_ways_with_peft(tmp_path) -> None:
    model = _tokens_model(tmp_path / "base")
    with torch.no_grad():
        expected = model(TOKEN_IDS).logits
    lorakit.save_adapter(model, tmp_path / "lk", save_embedding_layers=True)
    in_peft = peft.PeftModel.from_pretrained(
        _resized(99, tmp_path / "base"), tmp_path / "lk"
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(in_peft(TOKEN_IDS).logits, expected, rtol=0, atol=1e-6)
    in_peft.save_pretrained(tmp_path / "peft", save_embedding_layers=True)
    peft_keys = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert set(load_file(tmp_path / "lk" / "adapter_model.safetensors")) == peft_keys
    back = lorakit.load_adapter(_resized(7, tmp_path / "base"), tmp_path / "peft", activate=True)
    with torch.no_grad():
        torch.testing.assert_close(back(TOKEN_IDS).logits, expected, rtol=0, atol=1e-6)


# --------------------------------------------------------------- embedding lookup options on LoRA
def test_embedding_lora_takes_scale_grad_by_freq_as_peft() -> None:
    config = dict(r=4, lora_alpha=8, target_modules=["embed_tokens"], init_lora_weights=False)
    model = llama()
    model.model.embed_tokens.scale_grad_by_freq = True
    lorakit.inject(model, lorakit.LoraConfig(**config))
    reference_base = llama()
    reference_base.model.embed_tokens.scale_grad_by_freq = True
    reference = peft.get_peft_model(reference_base, peft.LoraConfig(**config))
    layer = model.model.embed_tokens
    peft_layer = reference.base_model.model.model.embed_tokens
    with torch.no_grad():
        peft_layer.lora_embedding_A["default"].copy_(layer.lora_embedding_A["default"])
        peft_layer.lora_embedding_B["default"].copy_(layer.lora_embedding_B["default"])
    ids = torch.tensor([[5, 5, 5, 9, 3, 5]])
    model(ids).logits.sum().backward()
    reference(ids).logits.sum().backward()
    grad = layer.lora_embedding_A["default"].grad
    torch.testing.assert_close(
        grad, peft_layer.lora_embedding_A["default"].grad, rtol=1e-5, atol=1e-6
    )
    # float64: column i of A's gradient is the plain lookup's divided by the count of i in ids
    scale, B = layer.scalings["default"], layer.lora_embedding_B["default"].detach().double()
    upstream = torch.randn(6, 64, dtype=torch.float64)
    plain = layer.lora_embedding_A["default"].detach().double().requires_grad_()
    ((plain.T[ids[0]] * scale) @ B.T * upstream).sum().backward()
    counts = torch.bincount(ids[0], minlength=128).clamp(min=1).double()
    scaled = plain.detach().clone().requires_grad_()
    out = lorakit.functional.lora_embedding_forward(
        ids[0], scaled, B, scale, scale_grad_by_freq=True
    )
    (out * upstream).sum().backward()
    torch.testing.assert_close(scaled.grad, plain.grad / counts, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ lora_bias on a bias-less base
def test_lora_bias_on_a_base_without_bias_warns_and_merge_names_the_module() -> None:
    model = llama()
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.self_attn\.q_proj.*has no bias"):
        lorakit.inject(
            model,
            lorakit.LoraConfig(
                r=2, target_modules=["q_proj"], lora_bias=True, init_lora_weights=False
            ),
        )
    with pytest.raises(ValueError, match=r"module 'model\.layers\.\d\.self_attn\.q_proj'"):
        lorakit.merge(model)
    with pytest.raises(ValueError, match=r"module 'model\.layers\.\d\.self_attn\.q_proj'"):
        lorakit.merge_and_unload(model)
    biased = llama_config(attention_bias=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a base with a bias: no warning
        lorakit.inject(
            LlamaForCausalLM(biased),
            lorakit.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True),
        )


# ------------------------------------------------------------- the trainable-token wrapper's weight
def test_trainable_tokens_wrapper_exposes_the_embedding_and_refuses_a_resize() -> None:
    model = llama()
    embedding = model.model.embed_tokens
    lorakit.inject(
        model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 2])
    )
    wrapper = model.get_input_embeddings()
    assert wrapper.weight is embedding.weight
    assert (wrapper.num_embeddings, wrapper.embedding_dim) == (128, 64)
    assert wrapper.padding_idx == embedding.padding_idx
    with pytest.raises(TypeError, match="TrainableTokens"):  # as PEFT: transformers refuses
        model.resize_token_embeddings(130)
    assert model.get_input_embeddings() is wrapper and wrapper.weight.shape == (128, 64)
    reference = peft.get_peft_model(
        llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 2])
    )
    with pytest.raises(TypeError):
        reference.resize_token_embeddings(130)
