"""Fixes from the 39th review of merging, checked against the real ``peft`` package, a float64
formula and the file system:

1. Trainable-token rows holding inf/NaN (or a float32 row beyond a float16 embedding's range)
   were written into the embedding by ``merge_and_unload``, ``PeftModel.merge_and_unload
   (safe_merge=True)`` and ``save_merged_model``; peft 0.22's ``safe_merge`` refuses them. They
   are now refused before any change, as a non-finite LoRA merge is.
2. ``merge_and_unload(float_dtype=...)`` after an earlier ``lorakit.merge`` cast the merged
   (already rounded) weight: rounded twice. It now computes from the original weight, bit for
   bit as the direct path.
3. ``merge_and_unload(adapter_names=[a, b])`` with ``modules_to_save`` copies of one module in
   both kept the first; peft 0.22 refuses it, and so does lorakit now (one named: its copy).
4. A failed ``save_merged_model`` into a new nested output left the empty parents it made.
"""

from __future__ import annotations

import errno

import peft
import pytest
import torch
import transformers.modeling_utils as modeling_utils
from torch import nn
from transformers import LlamaForCausalLM

import lorakit
from lorakit.io import save_merged_model
from lorakit.io.save_errors import SaveError
from lorakit.state import lora_layers
from tests import tiny_models
from tests.peft_versions import peft_at_least

TOKENS = dict(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[3, 4])
DELTA = "trainable_tokens_delta"


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, state: dict, modules: dict) -> None:
    """Same module objects at the same names, every tensor bit-identical (NaN included)."""
    assert dict(model.named_modules()) == modules
    now = model.state_dict()
    assert set(now) == set(state)
    for name, tensor in state.items():
        assert tensor.dtype == now[name].dtype
        assert torch.equal(tensor.view(torch.uint8), now[name].detach().view(torch.uint8)), name


def _set_token_value(model: nn.Module, row: int, value: float) -> None:
    """Element ``[row, 0]`` of every adapter's trainable-token rows set to ``value``."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if DELTA in name:
                parameter[row, 0] = value


# ------------------------------------------------------------ 1. non-finite token rows
def _peft_refuses_nan_rows() -> None:
    """The oracle: peft's ``merge_and_unload(safe_merge=True)`` refuses a NaN token row."""
    fields = TOKENS | dict(init_lora_weights=False)
    theirs = peft.get_peft_model(tiny_models.llama(), peft.LoraConfig(**fields))
    _set_token_value(theirs, 0, float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        theirs.merge_and_unload(safe_merge=True)


def _by_function(model, tmp_path):
    return lorakit.merge_and_unload(model)


def _by_merge(model, tmp_path):
    return lorakit.merge(model)


def _by_method(model, tmp_path):
    return model.merge_and_unload(safe_merge=True)


def _by_save(model, tmp_path):
    return save_merged_model(model, tmp_path / "merged")


@pytest.mark.parametrize(
    "merge_it",
    [_by_function, _by_merge, _by_method, _by_save],
    ids=["merge_and_unload", "merge", "PeftModel.merge_and_unload", "save_merged_model"],
)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_token_rows_are_refused_and_change_nothing(merge_it, value, tmp_path):
    _peft_refuses_nan_rows()
    fields = TOKENS | dict(init_lora_weights=False)
    model = lorakit.get_peft_model(tiny_models.llama(), lorakit.LoraConfig(**fields))
    _set_token_value(model, 0, value)
    state, modules = _state(model), dict(model.named_modules())
    match = r"adapter 'default' holds trainable-token rows \[3\] of embedding 'model.embed_tokens'"
    with pytest.raises(ValueError, match=match):
        merge_it(model, tmp_path)
    _assert_unchanged(model, state, modules)
    assert not (tmp_path / "merged").exists()


def _fp16_tokens(row_value: float) -> nn.Module:
    model = lorakit.inject(tiny_models.llama(dtype=torch.float16), lorakit.LoraConfig(**TOKENS))
    _set_token_value(model, 1, row_value)
    return model


def test_a_float32_row_beyond_float16_is_refused_as_a_lora_overflow_is():
    too_large = 1e6
    assert too_large > torch.finfo(torch.float16).max  # (so float16 turns it into inf)
    model = _fp16_tokens(too_large)
    assert next(p for n, p in model.named_parameters() if DELTA in n).dtype == torch.float32
    state, modules = _state(model), dict(model.named_modules())
    with pytest.raises(ValueError, match=r"rows \[4\] .* not finite in float16"):
        lorakit.merge_and_unload(model)
    _assert_unchanged(model, state, modules)


def test_a_row_that_float_dtype_would_overflow_is_refused_before_any_change():
    model = lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(**TOKENS))
    tiny_models.randomize_adapters(model, std=0.2)
    _set_token_value(model, 0, 1e6)
    state, modules = _state(model), dict(model.named_modules())
    with pytest.raises(ValueError, match=r"rows \[3\] .* not finite in float16"):
        lorakit.merge_and_unload(model, float_dtype=torch.float16)
    _assert_unchanged(model, state, modules)
    plain = lorakit.merge_and_unload(model)  # float32 holds it: merged, as peft merges it
    assert plain.model.embed_tokens.weight[3, 0].item() == 1e6


def test_finite_rows_still_merge_as_peft_merges_them():
    """The refusal leaves finite rows alone: the merged embedding equals peft 0.22's."""
    fields = TOKENS | dict(init_lora_weights=False)
    theirs = peft.get_peft_model(tiny_models.llama(), peft.LoraConfig(**fields))
    ours = lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(**fields))
    rows = torch.randn(2, theirs.get_input_embeddings().weight.shape[1]) * 3
    for model in (theirs, ours):
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if DELTA in n).copy_(rows)
        assert sum(DELTA in n for n, _ in model.named_parameters()) == 1
    expected = theirs.merge_and_unload(safe_merge=True).model.embed_tokens.weight
    merged = lorakit.merge_and_unload(ours).model.embed_tokens.weight
    assert torch.equal(merged, expected)
    assert torch.equal(merged[[3, 4]], rows)


# ------------------------------------------- 2. float_dtype after an earlier merge
def _bf16_two_adapters(**fields) -> nn.Module:
    """A bfloat16 tiny Llama (attention biases for ``lora_bias``) with random adapters
    "default" (active) and "b"."""
    torch.manual_seed(0)
    config = tiny_models.llama_config(attention_bias=bool(fields.get("lora_bias")))
    base = LlamaForCausalLM(config).eval().to(torch.bfloat16)
    first = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) | fields
    model = lorakit.inject(base, lorakit.LoraConfig(**first))
    second = dict(r=2, lora_alpha=4, target_modules=["v_proj", "o_proj"]) | fields
    lorakit.inject(model, lorakit.LoraConfig(**second), "b", activate=False)
    tiny_models.randomize_adapters(model, std=0.3)  # (A, B, DoRA's m, the bias on B)
    return model


def _float64_merged(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """``{weight name: W0 + sum_a s_a B_a A_a}`` in float64 for each adapted linear."""
    expected = {}
    for path, layer in lora_layers(model):
        total = layer.original_weight.detach().double()
        for name in names:
            if name in layer.ranks:
                lora_a = layer.lora_A[name].weight.double()
                lora_b = layer.lora_B[name].weight.double()
                total = total + layer.scalings[name] * (lora_b @ lora_a)
        expected[path + ".weight"] = total
    return expected


CASES = {
    "merged-alone": (["default"], ["default"]),
    "merged-then-another": (["default"], ["default", "b"]),
    "both-merged": (["default", "b"], None),
}


@pytest.mark.parametrize(
    "fields", [{}, {"use_dora": True}, {"lora_bias": True}], ids=["lora", "dora", "lora_bias"]
)
@pytest.mark.parametrize("case", list(CASES))
def test_float_dtype_after_an_earlier_merge_equals_the_direct_path_bit_for_bit(case, fields):
    merged_first, names = CASES[case]
    direct = lorakit.merge_and_unload(
        _set_active(_bf16_two_adapters(**fields), merged_first), names, float_dtype=torch.float32
    )
    model = _set_active(_bf16_two_adapters(**fields), merged_first)
    lorakit.merge(model, merged_first)
    again = lorakit.merge_and_unload(model, names, float_dtype=torch.float32)
    ours, theirs = again.state_dict(), direct.state_dict()
    assert set(ours) == set(theirs)
    for key, tensor in theirs.items():
        assert tensor.dtype == ours[key].dtype == torch.float32, key
        assert torch.equal(ours[key], tensor), key


def _set_active(model: nn.Module, names: list[str]) -> nn.Module:
    lorakit.set_active(model, names)
    return model


def test_float_dtype_after_an_earlier_merge_is_the_float64_sum_rounded_once():
    model = _bf16_two_adapters()
    expected = _float64_merged(model, ["default"])
    lorakit.merge(model)
    plain = lorakit.merge_and_unload(model, float_dtype=torch.float32)
    weights = plain.state_dict()
    for key, weight in expected.items():
        error = (weights[key].double() - weight).abs().max().item()
        assert error <= 4 * torch.finfo(torch.float32).eps * weight.abs().max().item(), key


@pytest.mark.parametrize("float_dtype", [torch.float32, torch.bfloat16])
def test_a_float32_merge_is_cast_not_computed_again(monkeypatch, float_dtype):
    """A float32 base merged earlier holds the float32 sum: cast to float_dtype it is that sum
    rounded once, so no layer is unmerged and merged again (a regression review: 26-62x the
    time and a copy of every adapted weight), and the result equals the direct path."""
    direct = lorakit.merge_and_unload(_bf16_two_adapters().float(), float_dtype=float_dtype)
    model = _bf16_two_adapters().float()
    lorakit.merge(model)
    for _, layer in lora_layers(model):
        monkeypatch.setattr(layer, "unmerge", lambda: pytest.fail("merged again"))
    again = lorakit.merge_and_unload(model, float_dtype=float_dtype)
    for key, tensor in direct.state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key


# --------------------------------------------------- 3. two named modules_to_save copies
def _two_copies(library):
    """A tiny Llama with adapters "one" (active) and "two", each with an ``lm_head`` copy
    (filled with 1 and 2); ``library``: peft or lorakit."""
    model = library.get_peft_model(
        tiny_models.llama(),
        library.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        adapter_name="one",
    )
    model.add_adapter(
        "two", library.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    for name, value in (("one", 1.0), ("two", 2.0)):
        with torch.no_grad():
            model.get_submodule(_copy_path(model, name)).weight.fill_(value)
    model.set_adapter("one")
    return model


def _copy_path(model, adapter: str) -> str:
    return next(
        path.rpartition(".")[0]
        for path, _ in model.named_parameters()
        if f"lm_head.modules_to_save.{adapter}." in path
    )


@pytest.mark.parametrize("names", [["one", "two"], ["two", "one"]])
def test_two_named_adapters_with_copies_of_one_module_are_refused_as_peft_0_22(names):
    if peft_at_least("0.22"):  # the oracle (peft 0.21 kept the active adapter's copy)
        with pytest.raises(ValueError, match="Only one adapter can be set at a time"):
            _two_copies(peft).merge_and_unload(adapter_names=names)
    ours = _two_copies(lorakit)
    state, modules = _state(ours), dict(ours.named_modules())
    for merge_and_unload in (
        ours.merge_and_unload,
        lambda **k: lorakit.merge_and_unload(ours, **k),
    ):
        with pytest.raises(ValueError, match=r"each hold a modules_to_save copy of 'lm_head'"):
            merge_and_unload(adapter_names=names)
        _assert_unchanged(ours, state, modules)


@pytest.mark.parametrize("names", [["two"], ["one"]])
def test_one_named_adapter_keeps_its_own_copy_as_peft_0_22(names):
    kept = {"one": 1.0, "two": 2.0}[names[0]]
    if peft_at_least("0.22"):
        theirs = _two_copies(peft).merge_and_unload(adapter_names=names)
        assert torch.all(theirs.lm_head.weight == kept)
    ours = _two_copies(lorakit).merge_and_unload(adapter_names=names)
    assert torch.all(ours.lm_head.weight == kept)


# --------------------------------------------------- 4. failed save into new parents
def _disk_full(tensors, filename, metadata=None):
    with open(filename, "wb") as handle:
        handle.write(b"\0" * 1000)  # a partial file, then the disk is full
    raise OSError(errno.ENOSPC, "No space left on device", filename)


def _failing_save(monkeypatch, output) -> None:
    model = lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    monkeypatch.setattr(modeling_utils, "safe_save_file", _disk_full)
    with pytest.raises(SaveError, match="No space left"):
        save_merged_model(model, output)


def test_a_failed_save_removes_the_new_parent_folders_it_made(monkeypatch, tmp_path):
    _failing_save(monkeypatch, tmp_path / "a" / "b" / "c")
    assert sorted(tmp_path.iterdir()) == []


def test_a_failed_save_keeps_parents_that_existed_and_what_they_hold(monkeypatch, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("mine")
    _failing_save(monkeypatch, tmp_path / "a" / "b" / "c")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "notes.txt"]
    assert (tmp_path / "a" / "notes.txt").read_text() == "mine"
