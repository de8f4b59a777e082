"""Spectra, effective ranks, rank advice and subspace similarity against float64 references."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lorakit
from lorakit.analysis import (
    adapter_spectra,
    energy_rank,
    entropy_rank,
    low_rank_svd,
    rank_advice,
    similarity_grid,
    spectra_report,
    spectrum_of_matrix,
    stable_rank,
    subspace_similarity,
    tensor_spectra,
    update_spectra,
)
from lorakit.analysis.report import format_table
from lorakit.state import lora_layers
from tests import tiny_models


def _factors(d: int, k: int, r: int, seed: int = 0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    lora_A = torch.randn(r, k, generator=generator).to(dtype)
    lora_B = torch.randn(d, r, generator=generator).to(dtype)
    return lora_A, lora_B


@pytest.mark.parametrize(("d", "k", "r"), [(48, 32, 8), (20, 70, 4), (6, 5, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_rank_svd_matches_the_dense_product(d, k, r, dtype):
    lora_A, lora_B = _factors(d, k, r, dtype=dtype)
    scale = 16 / r
    dense = scale * lora_B.double() @ lora_A.double()  # plain formula in float64
    u, s, v = low_rank_svd(lora_A, lora_B, scale)
    expected = torch.linalg.svdvals(dense)
    n = min(len(s), len(expected))
    torch.testing.assert_close(s[:n], expected[:n], rtol=1e-10, atol=1e-10)
    assert torch.all(expected[n:] < 1e-9 * expected[0])
    torch.testing.assert_close(u @ torch.diag(s) @ v.T, dense, rtol=1e-10, atol=1e-10)
    assert s.dtype == torch.float64


def test_rank_measures_on_known_singular_values():
    delta = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0]))
    values = spectrum_of_matrix("x", delta).singular_values
    # energies 9, 4, 1 of 14: shares 0.643, 0.929, 1.0
    assert energy_rank(values, 0.6) == 1
    assert energy_rank(values, 0.9) == 2
    assert energy_rank(values, 0.99) == 3
    assert energy_rank(values, 1.0) == 3
    p = [3 / 6, 2 / 6, 1 / 6]
    assert entropy_rank(values) == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)))
    assert stable_rank(values) == pytest.approx(14 / 9)
    zero = torch.zeros(4)
    assert (energy_rank(zero, 0.9), entropy_rank(zero), stable_rank(zero)) == (0, 0.0, 0.0)
    assert entropy_rank(torch.ones(7)) == pytest.approx(7.0)


def test_rank_advice_by_module_type():
    spectra = [
        spectrum_of_matrix("m.layers.0.q_proj", torch.diag(torch.tensor([3.0, 0.0, 0.0]))),
        spectrum_of_matrix("m.layers.1.q_proj", torch.eye(3)),
        spectrum_of_matrix("m.layers.0.v_proj", torch.diag(torch.tensor([2.0, 1.0, 0.0]))),
    ]
    advice = {a.module_type: a for a in rank_advice(spectra, 0.9)}
    # q_proj energies 9 and 1+1+1: uniform r=1 keeps 10/12, r=2 keeps 11/12 >= 0.9
    assert (advice["q_proj"].rank, advice["q_proj"].max_layer_rank) == (2, 3)
    # v_proj energies 4, 1: r=1 keeps 0.8, r=2 keeps 1.0
    assert (advice["v_proj"].rank, advice["v_proj"].layers) == (2, 1)
    assert spectra[1].layer_index == 1 and spectra[0].module_type == "q_proj"
    # BERT has three different "dense" layers per block: the type keeps what tells them apart
    bert_names = [
        "bert.encoder.layer.3.attention.output.dense",
        "bert.encoder.layer.3.output.dense",
    ]
    types = [spectrum_of_matrix(name, torch.eye(2)).module_type for name in bert_names]
    assert types == ["attention.output.dense", "output.dense"]
    assert spectrum_of_matrix("classifier", torch.eye(2)).module_type == "classifier"


@pytest.mark.parametrize("builder", ["llama", "gpt2"])
def test_adapter_spectra_of_an_injected_adapter(builder):
    model = tiny_models.BUILDERS[builder]()
    targets = ["q_proj", "v_proj"] if builder == "llama" else ["c_attn", "c_proj"]
    config = lorakit.LoraConfig(
        r=4, lora_alpha=12, target_modules=targets, rank_pattern={"v_proj": 2}
    )
    lorakit.inject(model, config)
    tiny_models.randomize_adapters(model, std=0.3)
    spectra = {s.name: s for s in adapter_spectra(model)}
    layers = dict(lora_layers(model))
    assert set(spectra) == set(layers)
    for name, layer in layers.items():
        lora_A = layer.lora_A["default"].weight.double()
        lora_B = layer.lora_B["default"].weight.double()
        rank = lora_A.shape[0]
        expected = torch.linalg.svdvals((12 / rank) * lora_B @ lora_A)[:rank]
        torch.testing.assert_close(spectra[name].singular_values, expected, rtol=1e-9, atol=1e-12)
        assert spectra[name].energy_rank(0.99) <= rank == spectra[name].max_rank


def test_tensor_spectra_reads_peft_keys_and_patterns():
    model = tiny_models.llama()
    config = lorakit.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"down_proj": 6},
        use_rslora=True,
    )
    lorakit.inject(model, config)
    tiny_models.randomize_adapters(model, std=0.3)
    tensors = {
        "base_model.model." + key.replace(".default.", "."): value
        for key, value in model.state_dict().items()
        if ".lora_" in key
    }
    from_file = {s.name: s.singular_values for s in tensor_spectra(tensors, config)}
    from_model = {s.name: s.singular_values for s in adapter_spectra(model)}
    assert from_file.keys() == from_model.keys() and len(from_file) == 4
    for name in from_file:
        torch.testing.assert_close(from_file[name], from_model[name])
    layer = dict(lora_layers(model))["model.layers.0.mlp.down_proj"]
    dense = (
        (6 / math.sqrt(2))
        * layer.lora_B["default"].weight.double()
        @ layer.lora_A["default"].weight.double()
    )
    torch.testing.assert_close(
        from_file["model.layers.0.mlp.down_proj"], torch.linalg.svdvals(dense)[:2]
    )


def test_update_spectra_of_a_known_low_rank_fine_tune():
    base = tiny_models.llama()
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(5)
    layer = tuned.model.layers[1].self_attn.o_proj
    update = torch.randn(64, 3, generator=generator) @ torch.randn(3, 64, generator=generator)
    with torch.no_grad():
        layer.weight += 0.01 * update
    spectra = update_spectra(base, tuned)
    assert [s.name for s in spectra] == ["model.layers.1.self_attn.o_proj"]
    spectrum = spectra[0]
    with torch.no_grad():
        expected = torch.linalg.svdvals(
            layer.weight.double() - base.model.layers[1].self_attn.o_proj.weight.double()
        )
    torch.testing.assert_close(spectrum.singular_values, expected)
    report = spectrum.to_dict()
    assert report["rank_99"] == 3 and report["max_rank"] == 64
    assert report["stable_rank"] == pytest.approx(float((expected**2).sum() / expected[0] ** 2))
    text = format_table(spectra)
    assert "o_proj" in text and "r @90%" in text
    full = spectra_report(spectra)
    assert full["advice"]["0.9"][0]["module_type"] == "self_attn.o_proj"


def _orthonormal(k: int, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(k, n, generator=generator, dtype=torch.float64))
    return q


def test_subspace_similarity_of_known_subspaces():
    basis = _orthonormal(32, 8, seed=1)  # 8 orthonormal directions in R^32
    u1 = basis[:, :4]
    rotation = _orthonormal(4, 4, seed=2)
    assert subspace_similarity(u1, u1 @ rotation, 4, 4) == pytest.approx(1.0)
    assert subspace_similarity(u1, basis[:, 4:], 4, 4) == pytest.approx(0.0, abs=1e-12)
    mixed = torch.stack([basis[:, 0], basis[:, 5], basis[:, 1]], dim=1)
    assert subspace_similarity(u1, mixed, 4, 2) == pytest.approx(0.5)
    assert subspace_similarity(u1, mixed, 4, 3) == pytest.approx(2 / 3)
    assert subspace_similarity(u1, mixed, 1, 1) == pytest.approx(1.0)
    grid = similarity_grid(u1, mixed)
    for i in range(1, 5):
        for j in range(1, 4):
            assert grid[i - 1, j - 1] == pytest.approx(subspace_similarity(u1, mixed, i, j))
    with pytest.raises(ValueError, match="must be in"):
        subspace_similarity(u1, mixed, 5, 1)


def test_rank_advice_keeps_float64_energies_and_names_blocks_that_start_a_name():
    """Energies padded in float32 advised rank 1 where float64 needs 2; a module named
    ``0.attn.q`` (a top-level ModuleList of blocks) is the type ``attn.q`` in block 0."""
    from lorakit.analysis.report import rank_advice
    from lorakit.analysis.spectrum import Spectrum

    values = torch.tensor([1.0, 1e-4], dtype=torch.float64)
    assert rank_advice([Spectrum("model.layers.0.q_proj", (2, 2), values, 2)], 1.0)[0].rank == 2
    blocks = [
        Spectrum(f"{index}.attn.q", (2, 2), torch.ones(2, dtype=torch.float64), 2)
        for index in range(3)
    ]
    assert [(s.module_type, s.layer_index) for s in blocks[:2]] == [("attn.q", 0), ("attn.q", 1)]
    assert [(a.module_type, a.layers) for a in rank_advice(blocks)] == [("attn.q", 3)]


def test_spectra_of_a_dora_adapter_are_refused_by_name(tmp_path):
    """A DoRA update f (W0 + s B A) - W0 is not s B A: no spectrum of B A is reported."""
    from lorakit.analysis.sources import adapter_dir_spectra
    from lorakit.analysis.spectrum import adapter_spectra

    model = lorakit.inject(
        tiny_models.llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    )
    lorakit.save_adapter(model, tmp_path)
    with pytest.raises(lorakit.UserError, match="DoRA adapter"):
        adapter_spectra(model)
    with pytest.raises(lorakit.UserError, match="DoRA adapter"):
        adapter_dir_spectra(tmp_path)


def test_the_json_report_says_when_it_lists_only_the_first_singular_values(capsys):
    """spectra_report kept the first 64 singular values of a layer without a word."""
    from lorakit.analysis import spectra_report, spectrum_of_matrix
    from lorakit.cli import main

    generator = torch.Generator().manual_seed(0)
    wide = spectrum_of_matrix(
        "model.layers.0.mlp.down_proj", torch.randn(100, 120, generator=generator)
    )
    narrow = spectrum_of_matrix(
        "model.layers.0.self_attn.q_proj", torch.randn(8, 120, generator=generator)
    )
    layers = {layer["name"]: layer for layer in spectra_report([wide, narrow])["layers"]}
    down, q = layers["model.layers.0.mlp.down_proj"], layers["model.layers.0.self_attn.q_proj"]
    assert len(down["singular_values"]) == 64
    assert down["singular_value_count"] == 100 and down["singular_values_truncated"] is True
    assert len(q["singular_values"]) == 8
    assert q["singular_value_count"] == 8 and q["singular_values_truncated"] is False
    full = spectra_report([wide], max_values=None)["layers"][0]
    assert len(full["singular_values"]) == 100 and full["singular_values_truncated"] is False
    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    assert "first 64 singular values" in " ".join(capsys.readouterr().out.split())
