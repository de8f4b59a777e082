"""Review 38 of EVA and ``lorakit plan``.

1. A layer input with fewer counted tokens than the components its layers may take
   (``round(r * rho)``) is refused before the model changes: n tokens give only n - 1
   directions with variance (the old code handed out A rows of zero variance).
2. ``rho`` above 1000 is capped at ``max_dim // r``, as peft 0.22's ``_get_eva_state_dict``
   caps it: same ranks, A and tokens read as peft (exact-PCA oracle).
3. ``EvaConfig`` fields set after the config was built are checked where EVA reads them.
4. ``lorakit plan``: the dtype error lists what is accepted and says when the value came from
   the config; the adapter file's size in a unit that shows it; the backward-peak line states
   the term that is its number.
"""

from __future__ import annotations

import copy
import json
import re
import warnings

import peft
import pytest
import torch
from transformers import AutoConfig

import lorakit
from lorakit.cli import main
from lorakit.plan import plan
from lorakit.plan_report import format_report
from tests import tiny_models
from tests.eva_oracle import lorakit_statistics, peft_svd_hooks, token_counts

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _eva_model(r=4, targets=ALL_LINEAR, **eva):
    config = lorakit.LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=targets,
        init_lora_weights="eva",
        eva_config=lorakit.EvaConfig(**eva),
    )
    model = lorakit.get_peft_model(tiny_models.llama(), config)
    model.train()
    return model


def _snapshot(model):
    """Everything EVA may change: tensors (bit for bit), hooks, train mode, config."""
    state = {key: value.clone() for key, value in model.state_dict().items()}
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
    modes = [m.training for m in model.modules()]
    return state, hooks, modes, copy.deepcopy(model.peft_config["default"])


def _assert_unchanged(model, snapshot):
    state, hooks, modes, config = snapshot
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert now[key].dtype == value.dtype and torch.equal(now[key], value), key
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()] == hooks
    assert [m.training for m in model.modules()] == modes
    assert model.peft_config["default"] == config


def _few_token_batch(counted: int) -> list[dict]:
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[0, :counted] = ids[0, :counted]
    return [{"input_ids": ids, "labels": labels}]


# ---- 1. fewer counted tokens than components ---------------------------------------------------
@pytest.mark.parametrize(("counted", "r", "rho"), [(3, 4, 2.0), (6, 8, 1.0)])
def test_fewer_counted_tokens_than_components_is_refused_model_unchanged(counted, r, rho):
    """The centred counted inputs have rank counted - 1 (float64 oracle), fewer than the
    round(r * rho) components: one error naming the input, the counts and the way out; the
    model is bit-identical afterwards."""
    batches = _few_token_batch(counted)
    name = "model.layers.0.self_attn.o_proj"
    rows = []
    base = tiny_models.llama()
    handle = base.get_submodule(name).register_forward_pre_hook(
        lambda module, args: rows.append(args[0][0, :counted].double())
    )
    with torch.no_grad():
        base(input_ids=batches[0]["input_ids"])
    handle.remove()
    centred = rows[0] - rows[0].mean(0)
    assert torch.linalg.matrix_rank(centred).item() == counted - 1 < round(r * rho)

    model = _eva_model(r=r, rho=rho)
    before = _snapshot(model)
    needed = round(r * rho)
    with pytest.raises(ValueError, match=r"too few counted tokens") as caught:
        lorakit.initialize_lora_eva_weights(model, batches)
    message = str(caught.value)
    assert f"the input of ['{name}']: {counted} tokens counted, {needed} needed" in message
    for way_out in ("more batches or longer sequences", "smaller r or rho", "exclude_modules"):
        assert way_out in message
    _assert_unchanged(model, before)


def test_enough_tokens_over_skipped_batches_still_give_components():
    """Batches each below the 8 components but 12 tokens in all: no error, and A is the
    float64 PCA of those 12 tokens (top 4 eigenvectors, up to sign)."""
    generator = torch.Generator().manual_seed(3)
    batches = []
    for counted in (5, 7):
        ids = torch.randint(0, 128, (1, 10), generator=generator)
        labels = torch.full_like(ids, -100)
        labels[0, :counted] = ids[0, :counted]
        batches.append({"input_ids": ids, "labels": labels})
    model = _eva_model(r=4, targets=["o_proj"], rho=2.0)
    lorakit.initialize_lora_eva_weights(model, batches)
    name = "model.layers.0.self_attn.o_proj"
    rows = []
    base = tiny_models.llama()
    handle = base.get_submodule(name).register_forward_pre_hook(
        lambda module, args: rows.append(args[0][0])
    )
    with torch.no_grad():
        for batch in batches:
            base(input_ids=batch["input_ids"])
    handle.remove()
    x = torch.cat([r[:c] for r, c in zip(rows, (5, 7), strict=True)]).double()
    _, _, vt = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    lora_a = model.model.get_submodule(name).lora_A["default"].weight.double()
    cosines = (lora_a * vt[: lora_a.shape[0]]).sum(1).abs()
    torch.testing.assert_close(cosines, torch.ones_like(cosines), rtol=0, atol=1e-6)


# ---- 2. rho above 1000: peft's cap --------------------------------------------------------------
def _batches(count: int, size: int = 12, length: int = 30) -> list[dict]:
    generator = torch.Generator().manual_seed(4)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, 128, (size, length), generator=generator)
        mask = torch.ones_like(ids)
        for row in range(size):
            padding = int(torch.randint(0, length // 2, (1,), generator=generator))
            if padding:
                mask[row, -padding:] = 0
        labels = ids.clone()
        labels[:, :4] = -100
        labels[mask == 0] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def test_rho_above_1000_is_capped_as_peft_caps_it(monkeypatch):
    """r=1, rho=1001 on o_proj / down_proj: peft 0.22 (exact PCA) caps rho at max_dim // r =
    128; lorakit gives its rank_pattern, alpha_pattern, A and tokens read per input (the
    uncapped old code read every batch and gave other ranks)."""
    fields = dict(
        r=1, lora_alpha=2, target_modules=["o_proj", "down_proj"], init_lora_weights="eva"
    )
    batches = _batches(60)
    peft_tokens = peft_svd_hooks(monkeypatch, every_component=True)
    our_stats = lorakit_statistics(monkeypatch)
    ours = lorakit.get_peft_model(
        tiny_models.llama(), lorakit.LoraConfig(**fields, eva_config=lorakit.EvaConfig(rho=1001.0))
    )
    lorakit.initialize_lora_eva_weights(ours, batches)
    theirs = peft.get_peft_model(
        tiny_models.llama(), peft.LoraConfig(**fields, eva_config=peft.EvaConfig(rho=1001.0))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.initialize_lora_eva_weights(theirs, batches, show_progress_bar=False)
    assert max(max(p.shape) for p in theirs.parameters()) // 1 == 128  # peft's rho_ceil
    ours_config, theirs_config = ours.peft_config["default"], theirs.peft_config["default"]
    assert ours_config.rank_pattern == theirs_config.rank_pattern
    assert ours_config.rank_pattern  # the cap moved ranks: the test compares something
    assert ours_config.alpha_pattern == theirs_config.alpha_pattern
    assert ours_config.eva_config.rho == 1001.0  # the config keeps the rho given, as peft's
    assert token_counts(our_stats) == peft_tokens
    ours_a, theirs_a = _lora_a(ours), _lora_a(theirs)
    assert ours_a.keys() == theirs_a.keys()
    for key, value in ours_a.items():
        torch.testing.assert_close(value, theirs_a[key].to(value.dtype), rtol=0, atol=1e-5)


def _lora_a(model) -> dict[str, torch.Tensor]:
    return {
        key[key.index("layers.") :].replace(".default", ""): value
        for key, value in model.state_dict().items()
        if "lora_A" in key
    }


# ---- 3. settings changed after the config was built ---------------------------------------------
@pytest.mark.parametrize(("field", "value"), [("rho", 0.5), ("tau", 1.5), ("whiten", "yes")])
def test_a_setting_changed_after_building_is_checked_where_eva_reads_it(field, value):
    with pytest.raises(ValueError) as built:
        lorakit.EvaConfig(**{field: value})
    model = _eva_model(rho=2.0)
    setattr(model.peft_config["default"].eva_config, field, value)
    before = _snapshot(model)
    with pytest.raises(ValueError) as caught:
        lorakit.initialize_lora_eva_weights(model, _batches(2))
    assert str(caught.value) == str(built.value)  # the message building it gives
    _assert_unchanged(model, before)


# ---- 4. lorakit plan ------------------------------------------------------------------------------
def _config_dir(tmp_path, **values):
    AutoConfig.for_model("llama", **tiny_models.DECODER_SIZES).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | values))
    return str(tmp_path)


def test_plan_dtype_errors_list_what_is_accepted_and_where_the_value_came_from(tmp_path, capsys):
    directory = _config_dir(tmp_path, torch_dtype="float32")
    assert plan(directory, dtype="float64", seq_len=8).dtype == "float64"  # accepted
    assert main(["plan", directory, "--dtype", "int8", "--seq-len", "8"]) == 2
    error = capsys.readouterr().err
    assert "dtype 'int8' is not supported" in error
    assert "float32, float16, bfloat16 or float64" in error
    auto = _config_dir(tmp_path / "auto", torch_dtype="auto")
    assert main(["plan", auto, "--seq-len", "8"]) == 2
    error = capsys.readouterr().err
    assert "the model config's dtype (torch_dtype) 'auto' is not supported" in error
    assert "--dtype" in error and "float64" in error
    assert main(["plan", auto, "--dtype", "bfloat16", "--seq-len", "8"]) == 0  # overrides it


def test_plan_adapter_file_size_shows_a_small_file(tmp_path):
    """A tiny model's adapter (tens of kB; planned to the byte, tests/test_plan_review_fixes2.py)
    reads in kB, not "0.0 MB"."""
    result = plan(_config_dir(tmp_path), r=4, seq_len=8)
    line = next(x for x in format_report(result).splitlines() if x.startswith("adapter file"))
    size = result.adapter_file_bytes["float32"]
    assert 1e3 < size < 1e6
    assert f"adapter file: {size / 1e3:,.1f} kB in float32" in line
    assert "0.0 MB" not in line


def test_plan_backward_peak_line_states_its_number(tmp_path):
    """int8-rows, bfloat16: the peak beyond what is kept is R_out + G - L / 2 (formula from the
    shapes: R_out = 6 V H, G = N V 2, L = 2 N V 4), larger than L; the line names that term
    with those parts, and calls L smaller."""
    sizes = dict(tiny_models.DECODER_SIZES, vocab_size=2048, tie_word_embeddings=False)
    AutoConfig.for_model("llama", **sizes).save_pretrained(tmp_path)
    tokens = 16
    result = plan(str(tmp_path), dtype="bfloat16", quantization="int8-rows", seq_len=tokens)
    vocab, hidden = sizes["vocab_size"], sizes["hidden_size"]
    rebuilt, gradient, loss = 6 * vocab * hidden, tokens * vocab * 2, 2 * tokens * vocab * 4
    extra = result.activations_peak_bytes - result.activations.total_bytes
    assert extra == rebuilt + gradient - loss // 2 > loss
    line = next(x for x in format_report(result).splitlines() if "backward's peak" in x)
    parts = [float(v.replace(",", "")) for v in re.findall(r"([\d.,]+) kB", line)]
    assert f"+ at backward's peak: {extra / 1e3:,.1f} kB (the output layer's backward" in line
    assert parts[1:4] == [round(v / 1e3, 1) for v in (rebuilt, gradient, loss // 2)]
    assert f"more than the loss backward's float32 buffers {loss / 1e3:,.1f} kB" in line
    assert "the larger:" not in line
