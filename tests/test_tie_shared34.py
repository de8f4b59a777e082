"""Two tie defects on tiny random transformers-5 models (no download), PEFT 0.21.2 as oracle.

1. ``layer_replication`` on a model with tied input/output embeddings: the layer copies share
   their base tensors, which ``merge_and_unload`` (and ``unload(keep_saved=...)``) took for
   ties, so a merge into a copy cleared ``tie_word_embeddings`` and cloned ``lm_head`` although
   no embedding changed. Now the tie is kept (one tensor, flag True), the file holds the
   embedding once, and ``from_pretrained`` of it gives the logits of the unmerged model; a merge
   into the embedding itself still unties it.
2. LoRA on T5's or BART's ``shared`` embedding: the transformers-5 forward calls the separate
   ``encoder``/``decoder.embed_tokens`` modules that hold ``shared.weight``, so the adapter does
   nothing, in PEFT too (silently). lorakit now warns once at inject (``UnusedTargetWarning``),
   naming the module and the ones to target instead; the adapter and its file stay PEFT's.
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

import lorakit
from lorakit.errors import UnusedTargetWarning
from lorakit.replication import tied_parameter_ids
from tests import tiny_models

LAYER_MAP = [[0, 2], [1, 2]]  # layers 0, 1 -> 0, 1, 1
VOCAB = tiny_models.SEQ2SEQ_VOCAB


def _tied_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = tiny_models.llama_config(tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval()


def _noised(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Every trainable tensor (LoRA factors, B included; ``modules_to_save`` copies) moved."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * std)
    return model


def _replicated(targets: list[str], saved: list[str] | None = None):
    config = lorakit.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=targets,
        modules_to_save=saved,
        layer_replication=LAYER_MAP,
    )
    return _noised(lorakit.get_peft_model(_tied_llama(), config))


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(model: torch.nn.Module, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**(inputs or {"input_ids": _ids()})).logits


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    error = (got - want).abs().max().item()
    assert error <= 1e-5, error


def _assert_tied(model: torch.nn.Module) -> None:
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight is model.get_input_embeddings().weight


@pytest.mark.parametrize(
    ("targets", "saved"),
    [(["q_proj", "v_proj"], None), (["q_proj"], ["post_attention_layernorm"])],
)
def test_replicated_merge_keeps_the_tied_embeddings_and_reloads(tmp_path, targets, saved):
    model = _replicated(targets, saved)
    want = _logits(model)
    assert not torch.equal(want, _logits(_tied_llama()))  # (the adapters count)
    merged = model.merge_and_unload()
    _assert_tied(merged)
    assert len(merged.model.layers) == 3
    _assert_close(_logits(merged), want)
    merged.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "model.safetensors")
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # saved once
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    _assert_tied(reloaded)
    _assert_close(_logits(reloaded), want)


def test_replicated_merge_into_the_embedding_still_unties_it(tmp_path):
    """The control: LoRA merged into ``embed_tokens`` changes one of the tied weights, so the
    head keeps the original embedding (its own tensor) and the flag is cleared."""
    model = _replicated(["q_proj", "embed_tokens"])
    want = _logits(model)
    merged = model.merge_and_unload()
    assert merged.config.tie_word_embeddings is False
    assert merged.lm_head.weight is not merged.get_input_embeddings().weight
    _assert_close(_logits(merged), want)
    merged.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    _assert_close(_logits(reloaded), want)


def test_replicated_unload_keeping_saved_copies_keeps_the_tie():
    """``unload(keep_saved=...)`` puts trained copies of a layer norm (held by both copies of
    layer 1) in place: no tie is broken, so the flag and the one head tensor stay."""
    model = _replicated(["q_proj"], ["post_attention_layernorm"])
    plain = lorakit.unload(model, keep_saved=["default"])
    _assert_tied(plain)
    assert len(plain.model.layers) == 2  # (the original layer list is back)


def test_tied_parameter_ids_leave_out_what_only_layer_copies_share():
    model = lorakit.inject(_tied_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    plain_ids = tied_parameter_ids(model)
    assert plain_ids == {id(model.lm_head.weight)}
    model = lorakit.inject(
        _tied_llama(),
        lorakit.LoraConfig(r=2, target_modules=["q_proj"], layer_replication=[[0, 2], [0, 1]]),
    )
    layers = model.model.layers
    shared = layers[0].self_attn.q_proj.base_layer.weight
    assert layers[2].self_attn.q_proj.base_layer.weight is shared  # (copies of layer 0)
    ids = tied_parameter_ids(model)
    assert ids == {id(model.lm_head.weight)}
    assert id(shared) not in ids and id(layers[1].mlp.up_proj.weight) not in ids


# --- 2. LoRA on T5's / BART's ``shared`` --------------------------------------------------


_t5, _bart = tiny_models.t5, tiny_models.bart


BUILDERS = {"t5": _t5, "bart": _bart}
SHARED = {"t5": "shared", "bart": "model.shared"}
PREFIX = {"t5": "", "bart": "model."}


def _fsmt() -> transformers.FSMTForConditionalGeneration:
    """Tied FSMT: decoder.embed_tokens is the tie source of encoder.embed_tokens, and the
    forward calls both (no `shared`)."""
    torch.manual_seed(0)
    config = transformers.FSMTConfig(
        langs=["en", "de"],
        src_vocab_size=VOCAB,
        tgt_vocab_size=VOCAB,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return transformers.FSMTForConditionalGeneration(config).eval()


def _seq2seq_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(3, VOCAB, (2, 7), generator=generator),
        "decoder_input_ids": torch.randint(3, VOCAB, (2, 5), generator=generator),
    }


def _injected(kind: str, targets: list[str]):
    """``(lorakit model, its UnusedTargetWarnings)`` of LoRA on ``targets``, noised."""
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="SEQ_2_SEQ_LM")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = lorakit.get_peft_model(BUILDERS[kind](), config)
    found = [w for w in caught if issubclass(w.category, UnusedTargetWarning)]
    return _noised(model, std=0.5), found


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_lora_on_shared_does_nothing_as_in_peft_and_warns_once(kind):
    model, found = _injected(kind, ["shared"])
    assert len(found) == 1
    message = str(found[0].message)
    prefix = PREFIX[kind]
    for name in (SHARED[kind], f"{prefix}encoder.embed_tokens", f"{prefix}decoder.embed_tokens"):
        assert repr(name) in message
    assert "'embed_tokens'" in message  # (the list entry that targets both)
    inputs = _seq2seq_inputs()
    base = _logits(BUILDERS[kind](), **inputs)
    assert torch.equal(_logits(model, **inputs), base)  # the forward never calls ``shared``
    reference = peft.get_peft_model(
        BUILDERS[kind](),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["shared"], task_type="SEQ_2_SEQ_LM"),
    )
    _noised(reference, std=0.5)
    assert torch.equal(_logits(reference, **inputs), base)  # PEFT: the same no-op


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_a_list_with_shared_warns_once_naming_shared_only(kind):
    attention = {"t5": "q", "bart": "q_proj"}[kind]
    _, found = _injected(kind, [attention, "shared"])
    assert len(found) == 1
    message = str(found[0].message)
    assert repr(SHARED[kind]) in message and repr(attention) not in message


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_the_saved_file_of_a_shared_adapter_is_peft_s(tmp_path, kind):
    model, _ = _injected(kind, ["shared"])
    lorakit.save_adapter(model, tmp_path / "ours")
    reference = peft.get_peft_model(
        BUILDERS[kind](),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["shared"], task_type="SEQ_2_SEQ_LM"),
    )
    reference.save_pretrained(tmp_path / "peft")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    lora = {key for key in theirs if "lora_" in key}
    assert lora and lora <= set(ours)
    assert {key: ours[key].shape for key in lora} == {key: theirs[key].shape for key in lora}


@pytest.mark.parametrize(
    ("build", "targets", "task"),
    [
        (_t5, ["q", "embed_tokens"], "SEQ_2_SEQ_LM"),
        (_bart, ["encoder.embed_tokens"], "SEQ_2_SEQ_LM"),
        (tiny_models.gpt2, ["wte"], "CAUSAL_LM"),
        (_tied_llama, ["embed_tokens", "lm_head"], "CAUSAL_LM"),
        (_fsmt, ["model.decoder.embed_tokens"], "SEQ_2_SEQ_LM"),  # (a tie source it calls)
    ],
)
def test_embeddings_the_forward_calls_give_no_warning(build, targets, task):
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = lorakit.get_peft_model(build(), config)
    assert not [w for w in caught if issubclass(w.category, UnusedTargetWarning)]
    _noised(model, std=0.5)
    inputs = {"input_ids": _ids() % VOCAB}
    if task == "SEQ_2_SEQ_LM":
        inputs = _seq2seq_inputs()
    assert not torch.equal(_logits(model, **inputs), _logits(build(), **inputs))  # (it runs)
