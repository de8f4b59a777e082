"""Extraction of a LoRA adapter from a full fine-tune, on a tiny model whose fine-tune is the base
plus a known low-rank update and small noise."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from lorakit.analysis import apply_extraction, extract_lora
from lorakit.analysis.extract import truncated_factors
from lorakit.functional import scaling
from lorakit.state import lora_layers
from tests import tiny_models
from tests.tiny_models import UPDATE_RANKS, fine_tuned


def test_truncated_factors_are_the_best_rank_r_fit():
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(30, 20, generator=generator, dtype=torch.float64)
    scale = scaling(5, 10.0)
    lora_A, lora_B, error = truncated_factors(delta, 5, scale)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    best = u[:, :5] @ torch.diag(s[:5]) @ vh[:5]
    torch.testing.assert_close(scale * lora_B @ lora_A, best)
    assert error == pytest.approx(float((delta - best).norm() / delta.norm()))
    # A and B share the singular values evenly: ||B||_F = ||A||_F
    assert float(lora_B.norm()) == pytest.approx(float(lora_A.norm()))


def test_fixed_rank_extraction_reproduces_the_fine_tuned_outputs():
    base = tiny_models.llama()
    tuned = fine_tuned(base)
    extraction = extract_lora(base, tuned, rank=4)
    assert extraction.config.target_modules == ["down_proj", "q_proj", "v_proj"]
    assert extraction.config.rank_pattern == {}
    assert len(extraction.layers) == 6 and all(layer.rank == 4 for layer in extraction.layers)
    for layer in extraction.layers:
        module = dict(tuned.named_modules())[layer.name]
        delta = (
            module.weight.detach().double()
            - dict(base.named_modules())[layer.name].weight.detach().double()
        )
        tail = torch.linalg.svdvals(delta)[4:]
        assert layer.relative_error == pytest.approx(float(tail.norm() / delta.norm()), rel=1e-6)
        assert layer.relative_error < 2e-2  # rank >= the true update rank: only noise is lost
        assert layer.parameters == 4 * sum(layer.shape)
    ids = tiny_models.input_ids()
    with torch.no_grad():
        expected = tuned(ids).logits
        before = base(ids).logits
        adapted = apply_extraction(base, extraction)(ids).logits
    change = (expected - before).norm()
    assert float((adapted - expected).norm() / change) < 2 * extraction.relative_error + 1e-3


def test_energy_extraction_chooses_per_layer_ranks_with_rank_pattern():
    base = tiny_models.llama()
    tuned = fine_tuned(base, noise=1e-5)
    extraction = extract_lora(base, tuned, energy=0.999)
    ranks = {layer.name.rsplit(".", 1)[-1]: layer.rank for layer in extraction.layers}
    assert ranks == UPDATE_RANKS
    assert extraction.config.r == 4
    pattern = extraction.config.rank_pattern
    assert set(pattern.values()) == {2, 3} and len(pattern) == 4
    # every layer keeps the file's one scale lora_alpha / r = 1 (alpha_i = 4 r_i / 4), so a
    # reader that ignores the patterns' alphas (LoRAX; vLLM before it read them) scales right
    assert extraction.config.alpha_pattern == {name: float(r) for name, r in pattern.items()}
    model = apply_extraction(copy.deepcopy(base), extraction)
    for name, layer in lora_layers(model):
        rank = layer.ranks["default"]
        assert rank == UPDATE_RANKS[name.rsplit(".", 1)[-1]]
        assert layer.scalings["default"] == pytest.approx(1.0)
        delta = (
            dict(tuned.named_modules())[name].weight.detach().double()
            - layer.base_layer.weight.detach().double()
        )
        got = layer.delta_weight("default").detach().double()
        assert float((got - delta).norm() / delta.norm()) < 2e-3
    capped = extract_lora(base, tuned, energy=0.999, max_rank=3)
    assert max(layer.rank for layer in capped.layers) == 3
    assert capped.relative_error > extraction.relative_error


def test_extraction_reports_what_lora_cannot_capture_and_refuses_bad_arguments():
    base = tiny_models.bert()
    tuned = fine_tuned(base, ranks={"query": 1})
    with torch.no_grad():
        tuned.classifier.bias += 0.5
    extraction = extract_lora(base, tuned, rank=1)
    assert extraction.config.target_modules == ["query"]
    assert list(extraction.uncaptured) == ["classifier.bias"]
    change = extraction.uncaptured["classifier.bias"]
    assert change["change"] == pytest.approx(0.5 * math.sqrt(2), rel=1e-6)
    assert change["relative"] is None  # the base bias is zero
    without_query = extract_lora(
        base, tuned, rank=1, exclude=["bert.encoder.layer.0.attention.self.query"]
    )
    assert [layer.name for layer in without_query.layers] == [
        "bert.encoder.layer.1.attention.self.query"
    ]
    assert "bert.encoder.layer.0.attention.self.query.weight" in without_query.uncaptured
    with pytest.raises(ValueError, match="exactly one"):
        extract_lora(base, tuned)
    with pytest.raises(ValueError, match="no linear layer differs"):
        extract_lora(base, copy.deepcopy(base), rank=2)


def test_a_tied_head_is_left_out_and_named_so_merged_and_unmerged_agree(tmp_path):
    import warnings

    from peft import PeftModel

    from lorakit.io import save_adapter

    base = tiny_models.gpt2()  # lm_head.weight IS transformer.wte.weight
    tuned = fine_tuned(base, noise=0, ranks={"wte": 3, "c_attn": 2})
    assert tuned.lm_head.weight is tuned.transformer.wte.weight
    extraction = extract_lora(base, tuned, rank=3)
    assert "lm_head" not in [layer.name for layer in extraction.layers]
    assert extraction.config.target_modules == ["c_attn"]
    head = extraction.uncaptured["lm_head.weight"]
    assert head["note"] == "tied to transformer.wte.weight"
    wte = extraction.uncaptured["transformer.wte.weight"]
    assert head["change"] == pytest.approx(wte["change"]) and wte["change"] > 0.4
    assert extraction.relative_error < 1e-6  # c_attn's rank-2 updates, exactly
    save_adapter(apply_extraction(copy.deepcopy(base), extraction), tmp_path / "adapter")
    ids = tiny_models.input_ids()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        adapted = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter"))
        unmerged = adapted(ids).logits
        merged_model = adapted.merge_and_unload()
        merged = merged_model(ids).logits
    assert torch.equal(merged_model.transformer.wte.weight, base.transformer.wte.weight)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert "note" not in wte


@pytest.mark.parametrize("arguments", [{"energy": 0.999}, {"rank": 48}])
def test_a_reader_with_one_scale_for_every_module_gets_each_update(tmp_path, arguments):
    """vLLM (and LoRAX, at ranks that its padding keeps) scales every module of a file by one
    ``lora_alpha / r`` and ignores ``alpha_pattern``. An extraction with per-layer ranks
    (``energy``, or ``rank`` above a layer's min(d, k)) gave rank-2 layers of a rank-6 file a
    third of their update there; the file's alpha_pattern now keeps every layer at that one
    scale, so such a reader and PEFT (which applies the patterns) agree."""
    from peft import PeftModel
    from safetensors.torch import load_file

    import lorakit

    base = tiny_models.llama()
    tuned = fine_tuned(base, noise=1e-5)
    extraction = extract_lora(base, tuned, **arguments)
    assert extraction.config.rank_pattern  # per-layer ranks: the case in question
    lorakit.save_adapter(apply_extraction(copy.deepcopy(base), extraction), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    one_scale = config["lora_alpha"] / config["r"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    reference = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    checked = 0
    for name, module in reference.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            key = name.removesuffix(".base_layer")
            lora_A = tensors[f"{key}.lora_A.weight"].double()
            lora_B = tensors[f"{key}.lora_B.weight"].double()
            read = one_scale * lora_B @ lora_A
            torch.testing.assert_close(
                read, module.get_delta_weight("default").double(), rtol=1e-6, atol=1e-8
            )
            checked += 1
    assert checked == len(extraction.factors)


@pytest.mark.parametrize("alpha", [-8.0, 0.0, float("nan")])
def test_an_alpha_with_no_positive_scale_is_refused(alpha):
    """Extracted factors are sqrt(S / s): a scale s <= 0 gave NaN factors once LoraConfig took
    any finite alpha (as PEFT does); 0 was read as "unset" (lora_alpha or rank)."""
    base = tiny_models.bert()
    tuned = fine_tuned(base, ranks={"query": 1})
    with pytest.raises(ValueError, match="lora_alpha must be a positive finite number"):
        extract_lora(base, tuned, rank=1, lora_alpha=alpha)
