"""The PEFT-compatible front door (``get_peft_model`` / ``PeftModel``) against the real ``peft``
package: the same calls on two copies of a tiny Llama with identical non-zero adapter weights
give the same counts, printed lines, outputs, merged models and saved files."""

from __future__ import annotations

import peft
import pytest
import torch

import lorakit
from lorakit import LoraConfig, PeftModel, TaskType, get_peft_model
from tests import tiny_models

FIELDS = dict(
    r=4,
    lora_alpha=8,
    target_modules=["q_proj", "v_proj", "down_proj"],
    lora_dropout=0.0,
    bias="none",
    task_type="CAUSAL_LM",
)


def copy_adapter_into_peft(ours: PeftModel, theirs: peft.PeftModel, adapter: str = "default"):
    """Copy our adapter tensors into peft's model (peft's keys = ours + 'base_model.model.')."""
    theirs_state = theirs.state_dict()
    copied = {}
    for key, value in ours.model.state_dict().items():
        if f"lora_A.{adapter}." in key or f"lora_B.{adapter}." in key:
            peft_key = "base_model.model." + key
            assert peft_key in theirs_state, f"{peft_key} missing in peft's model"
            copied[peft_key] = value
    assert copied
    theirs.load_state_dict(copied, strict=False)


@pytest.fixture
def pair():
    ours = get_peft_model(tiny_models.llama(), LoraConfig(**FIELDS))
    tiny_models.randomize_adapters(ours.model, std=0.2)
    theirs = peft.get_peft_model(tiny_models.llama(), peft.LoraConfig(**FIELDS))
    copy_adapter_into_peft(ours, theirs)
    return ours.eval(), theirs.eval()


def test_counts_and_printed_line_match_peft(pair, capsys):
    ours, theirs = pair
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours.print_trainable_parameters()
    theirs.print_trainable_parameters()
    our_line, their_line = capsys.readouterr().out.strip().splitlines()
    assert our_line == their_line
    layers, r = 2, 4  # q (64 -> 64), v (64 -> 32: 2 KV heads of 16), down (96 -> 64)
    trainable = layers * r * ((64 + 64) + (64 + 32) + (96 + 64))
    assert our_line.startswith(f"trainable params: {trainable:,} || all params: ")


def test_forward_with_kwargs_generate_and_attributes(pair):
    ours, theirs = pair
    ids = tiny_models.input_ids()
    with torch.no_grad():
        our_out = ours(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids))
        their_out = theirs(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids))
        base_logits = tiny_models.llama()(input_ids=ids).logits
    torch.testing.assert_close(our_out.logits, their_out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_out.loss, their_out.loss, rtol=1e-5, atol=1e-5)
    assert (our_out.logits - base_logits).abs().max() > 1e-3  # the adapter does something
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **greedy), theirs.generate(input_ids=ids, **greedy))
    assert ours.config is ours.model.config  # attribute access reaches the transformers model
    assert ours.get_input_embeddings() is ours.model.get_input_embeddings()
    assert ours.get_base_model() is ours.model
    assert ours.base_model is ours.model.model  # transformers' meaning: the backbone


def test_disable_adapter_is_exact_even_while_merged(pair):
    ours, theirs = pair
    ids = tiny_models.input_ids()
    with torch.no_grad():
        base = tiny_models.llama()(input_ids=ids).logits
        with ours.disable_adapter():
            assert torch.equal(ours(input_ids=ids).logits, base)
        adapted = ours(input_ids=ids).logits
        ours.merge_adapter()
        with ours.disable_adapter():  # peft would unmerge here; lorakit changes no weight
            assert torch.equal(ours(input_ids=ids).logits, base)
        torch.testing.assert_close(ours(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)
        ours.unmerge_adapter()
        with theirs.disable_adapter():
            torch.testing.assert_close(theirs(input_ids=ids).logits, base)
    fresh = tiny_models.llama().state_dict()
    for key, value in ours.model.state_dict().items():
        if "base_layer" in key:  # exact unmerge: every base weight bit-identical
            assert torch.equal(value, fresh[key.replace("base_layer.", "")])


def test_merge_and_unload_matches_peft(pair):
    ours, theirs = pair
    ids = tiny_models.input_ids()
    # PEFT's arguments, positional as PEFT orders them (progressbar, safe_merge)
    ours_merged = ours.merge_and_unload(True, True)
    theirs_merged = theirs.merge_and_unload(True, True)
    assert type(ours_merged) is type(theirs_merged)
    assert not any(isinstance(m, lorakit.layers.LoraLayer) for m in ours_merged.modules())
    ours_state, theirs_state = ours_merged.state_dict(), theirs_merged.state_dict()
    assert ours_state.keys() == theirs_state.keys()
    for key in ours_state:
        torch.testing.assert_close(ours_state[key], theirs_state[key], rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(
            ours_merged(input_ids=ids).logits, theirs_merged(input_ids=ids).logits
        )


def test_named_adapters_like_peft(pair):
    ours, theirs = pair
    second = LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"], task_type=TaskType.CAUSAL_LM)
    ours.add_adapter("other", second)
    theirs.add_adapter("other", peft.LoraConfig(**{**FIELDS, **second.to_dict()}))
    assert ours.active_adapter == theirs.active_adapter == "default"
    assert ours.active_adapters == theirs.active_adapters == ["default"]
    assert set(ours.peft_config) == set(theirs.peft_config) == {"default", "other"}
    assert ours.peft_config["other"].r == 2
    tiny_models.randomize_adapters(ours.model, seed=7, std=0.2)
    copy_adapter_into_peft(ours, theirs, "default")
    copy_adapter_into_peft(ours, theirs, "other")
    ours.set_adapter("other")
    theirs.set_adapter("other")
    assert ours.active_adapter == "other"
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ids = tiny_models.input_ids()
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )
    ours.delete_adapter("other")
    assert list(ours.peft_config) == ["default"]


def test_autocast_adapter_dtype_and_clear_errors():
    half = tiny_models.llama(dtype=torch.bfloat16)
    kept = get_peft_model(half, LoraConfig(**FIELDS), autocast_adapter_dtype=False)
    assert kept.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == (
        torch.bfloat16
    )
    upcast = get_peft_model(tiny_models.llama(dtype=torch.bfloat16), LoraConfig(**FIELDS))
    assert upcast.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == (
        torch.float32
    )
    with pytest.raises(TypeError, match=r"expected a lorakit\.LoraConfig, got peft"):
        get_peft_model(tiny_models.llama(), peft.LoraConfig(**FIELDS))
    with pytest.raises(TypeError, match="already a lorakit PeftModel"):
        get_peft_model(kept, LoraConfig(**FIELDS))
    with pytest.raises(AttributeError, match="no_such_attribute"):
        _ = kept.no_such_attribute


def test_save_pretrained_layout_loads_in_peft(pair, tmp_path):
    ours, _ = pair
    ours.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"]))
    tiny_models.randomize_adapters(ours.model, seed=5, std=0.2)
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()  # default at the top (PEFT)
    assert (tmp_path / "other" / "adapter_config.json").is_file()  # others in a subdirectory
    ids = tiny_models.input_ids()
    theirs = peft.PeftModel.from_pretrained(tiny_models.llama(), tmp_path).eval()
    theirs.load_adapter(tmp_path / "other", "other")
    with torch.no_grad():
        for name in ("default", "other"):
            ours.set_adapter(name)
            theirs.set_adapter(name)
            torch.testing.assert_close(
                ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5
            )


def test_from_pretrained_reads_peft_files_frozen_or_trainable(tmp_path):
    theirs = peft.get_peft_model(
        tiny_models.llama(), peft.LoraConfig(**FIELDS, init_lora_weights=False)
    ).eval()
    theirs.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no base-model fingerprint"):  # peft writes none
        frozen = PeftModel.from_pretrained(tiny_models.llama(), tmp_path).eval()
    assert frozen.get_nb_trainable_parameters()[0] == 0  # PEFT's inference mode
    assert frozen.active_adapter == "default"
    with pytest.warns(UserWarning, match="no base-model fingerprint"):
        trainable = PeftModel.from_pretrained(tiny_models.llama(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ids = tiny_models.input_ids()
    with torch.no_grad():
        torch.testing.assert_close(
            frozen(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )


def test_load_adapter_keeps_the_active_one_and_refuses_a_wrong_base(pair, tmp_path):
    ours, _ = pair
    ours.save_pretrained(tmp_path)
    ours.load_adapter(tmp_path, "copy")
    assert ours.active_adapter == "default"
    assert set(ours.peft_config) == {"default", "copy"}
    from lorakit.state import lora_layers

    layers = list(lora_layers(ours.model))
    assert len(layers) == 6  # q_proj, v_proj, down_proj in 2 layers
    for name, layer in layers:  # the copy holds the saved (random, non-zero) A and B exactly
        source, copy = layer.adapter_parameters("default"), layer.adapter_parameters("copy")
        assert [tuple(t.shape) for t in copy] == [tuple(t.shape) for t in source], name
        assert all(torch.equal(c, s) for c, s in zip(copy, source, strict=True)), name
        assert source[1].abs().max() > 0.1, name  # B is not its zero init
    assert ours.peft_config["copy"].r == ours.peft_config["default"].r == 4
    with pytest.raises(lorakit.BaseModelMismatchError, match="different base weights"):
        PeftModel.from_pretrained(tiny_models.llama(seed=1), tmp_path)
    with pytest.warns(UserWarning, match="different base weights"):
        PeftModel.from_pretrained(tiny_models.llama(seed=1), tmp_path, allow_base_mismatch=True)


def test_copies_and_save_arguments(pair, tmp_path):
    import copy

    ours, _ = pair
    clone = copy.deepcopy(ours)  # e.g. a frozen reference model for DPO
    ids = tiny_models.input_ids()
    with torch.no_grad():
        assert torch.equal(clone(input_ids=ids).logits, ours(input_ids=ids).logits)
    assert clone.model is not ours.model
    with pytest.raises(ValueError, match="safetensors only"):
        ours.save_pretrained(tmp_path, safe_serialization=False)
    ours.save_pretrained(tmp_path / "not-main", is_main_process=False)
    assert not (tmp_path / "not-main").exists()
