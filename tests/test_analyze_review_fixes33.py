"""Review fixes (round 33) of ``lorakit analyze``.

1. An ``--energy`` share that ``f"{share:g}"`` prints as "0.9" or "0.99" (0.99000001) overwrote
   that default's entry of the JSON ``advice``: two keys for three shares, and the "0.99" entry
   held the other share's advice; the screen said "advised rank at 0.99".
2. ``max_rank`` ("max r") was the adapter's r even when r > min(d, k) (PEFT's ``rank_pattern``
   allows it): r 40 on a 32 x 64 layer showed max r 40 beside 32 singular values.
"""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.analysis import low_rank_svd, spectra_report, spectrum_of_factors
from lorakit.analysis.report import rank_advice, share_label
from lorakit.analysis.spectrum import spectrum_of_matrix
from lorakit.cli import main
from tests import tiny_models

NEAR = 0.99000001  # printed "0.99" by f"{share:g}"

# ------------------------------------------------------------------ 1. one advice entry a share


@pytest.mark.parametrize(
    ("share", "label"),
    [
        (0.9, "0.9"),
        (0.99, "0.99"),
        (1.0, "1"),
        (0.5, "0.5"),
        (NEAR, "0.99000001"),
        (0.9 + 1e-12, "0.900000000001"),
        (0.1 + 0.2, "0.30000000000000004"),
    ],
)
def test_a_share_label_reads_back_as_exactly_that_share(share, label):
    assert share_label(share) == label
    assert float(share_label(share)) == share


def _spectra():
    """q_proj keeps 0.990000005 of its energy at rank 2: 0.99 is reached there, 0.99000001 only
    at rank 3, so the two shares' advice differs."""
    values = torch.tensor([0.895, 0.095000005, 0.009999995], dtype=torch.float64).sqrt()
    q = spectrum_of_matrix("model.layers.0.q_proj", torch.diag(values))
    v = spectrum_of_matrix("model.layers.0.v_proj", torch.diag(torch.tensor([1.0, 0.0, 0.0])))
    return [q, v]


def test_a_share_near_a_default_gets_its_own_advice_entry():
    spectra = _spectra()
    report = spectra_report(spectra, shares=[0.9, 0.99, NEAR, 1.0])
    assert list(report["advice"]) == ["0.9", "0.99", "0.99000001", "1"]
    for key, entries in report["advice"].items():
        assert [entry["share"] for entry in entries] == [float(key)] * 2
        assert entries == [a.to_dict() for a in rank_advice(spectra, float(key))]
    ranks = {key: [e["rank"] for e in entries] for key, entries in report["advice"].items()}
    assert ranks == {"0.9": [2, 1], "0.99": [2, 1], "0.99000001": [3, 1], "1": [3, 1]}


# ------------------------------------------------------------------ 2. max_rank <= min(d, k)


@pytest.mark.parametrize(("d", "k", "r"), [(8, 12, 30), (20, 12, 15), (20, 12, 5), (6, 6, 6)])
def test_max_rank_is_min_of_r_d_k_and_the_svd_has_that_many_columns(d, k, r):
    torch.manual_seed(0)
    lora_A, lora_B = torch.randn(r, k), torch.randn(d, r)
    dense = 2.0 * lora_B.double() @ lora_A.double()
    spectrum = spectrum_of_factors("x", lora_A, lora_B, 2.0)
    bound = min(r, d, k)
    assert spectrum.max_rank == bound == len(spectrum.singular_values)
    assert spectrum.shape == (d, k) and spectrum.to_dict()["max_rank"] == bound
    torch.testing.assert_close(spectrum.singular_values, torch.linalg.svdvals(dense)[:bound])
    U, S, V = low_rank_svd(lora_A, lora_B, 2.0)  # the docstring's shapes: (d, m), (m,), (k, m)
    assert (U.shape, S.shape, V.shape) == ((d, bound), (bound,), (k, bound))
    torch.testing.assert_close(U @ torch.diag(S) @ V.T, dense)


# ------------------------------------------------------------------ both through the CLI


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A PEFT adapter on the tiny Llama: r 4, but r 80 on q_proj (64 x 64) and r 40 on layer 0's
    k_proj (32 x 64), with random factors."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4,
        target_modules=["q_proj", "k_proj", "v_proj"],
        rank_pattern={"q_proj": 80, "layers.0.self_attn.k_proj": 40},
        init_lora_weights=False,
    )
    torch.manual_seed(0)
    model = get_peft_model(tiny_models.llama(), config)
    directory = tmp_path_factory.mktemp("adapter") / "ad"
    model.save_pretrained(directory)
    return directory


def test_analyze_json_keeps_every_share_and_bounds_max_rank(adapter_dir, capsys):
    assert main(["analyze", str(adapter_dir), "--json", "--energy", str(NEAR)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["advice"]) == ["0.9", "0.99", "0.99000001"]
    for key, entries in report["advice"].items():
        assert {entry["share"] for entry in entries} == {float(key)}
    layers = {layer["name"]: layer for layer in report["layers"]}
    expected = {"q_proj": 64, "k_proj": 4, "v_proj": 4}  # min(r, d, k)
    for name, layer in layers.items():
        bound = expected[name.rsplit(".", 1)[-1]]
        if name == "model.layers.0.self_attn.k_proj":
            bound = 32  # r 40 on a 32 x 64 layer
        assert layer["max_rank"] == bound == layer["singular_value_count"], name
        assert layer["max_rank"] <= min(layer["shape"])


def test_analyze_table_names_the_share_asked_for_and_the_bound(adapter_dir, capsys):
    assert main(["analyze", str(adapter_dir), "--energy", str(NEAR)]) == 0
    out = capsys.readouterr().out
    assert "advised rank at 0.99000001 of the energy" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if "_proj" in line}
    assert rows["model.layers.0.self_attn.k_proj"][1:3] == ["32x64", "32"]
    assert rows["model.layers.1.self_attn.k_proj"][1:3] == ["32x64", "4"]
    assert rows["model.layers.0.self_attn.q_proj"][1:3] == ["64x64", "64"]
    assert main(["analyze", str(adapter_dir)]) == 0
    assert "advised rank at 0.9 of the energy" in capsys.readouterr().out
