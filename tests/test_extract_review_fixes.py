"""Review fixes of ``lorakit extract`` / ``analyze`` on full fine-tunes: a base and a fine-tune
of different classes (a ``BertModel`` body, a ``BertForSequenceClassification``), weights newly
initialised at loading (a causal LM's checkpoint loaded for sequence classification has no
``score``), one float64 ΔW alive at a time, and no legend warning for an all-zero update."""

from __future__ import annotations

import copy
import json
import math
import warnings
import weakref

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertForSequenceClassification, BertModel, LlamaForSequenceClassification

from lorakit.analysis import extract_lora, updates
from lorakit.cli import main
from lorakit.io import load_adapter
from tests import tiny_models
from tests.tiny_models import fine_tuned, input_ids

BERT_UPDATES = {"query": 2, "value": 1, "dense": 2}


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))


def _extract(capsys, *argv: str) -> dict:
    assert main(["extract", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _bert_dirs(tmp_path):
    """A ``BertModel`` base and a ``BertForSequenceClassification`` fine-tuned from it (a
    rank-2 update of the body's linear layers, a trained classifier), saved to disk."""
    tuned = tiny_models.bert(0)
    base = BertModel(tuned.config).eval()
    base.load_state_dict(tuned.bert.state_dict())
    base.config.architectures = ["BertModel"]
    tuned.bert = fine_tuned(tuned.bert, noise=0.0, ranks=BERT_UPDATES)
    with torch.no_grad():
        tuned.classifier.weight += 0.5
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    return tmp_path / "base", tmp_path / "tuned"


def _base_body_tuned_head(base_dir, tuned_dir) -> BertForSequenceClassification:
    model = BertForSequenceClassification.from_pretrained(tuned_dir).eval()
    model.bert.load_state_dict(BertModel.from_pretrained(base_dir).state_dict())
    return model


def test_a_body_base_gives_an_adapter_for_the_fine_tunes_class(tmp_path, capsys):
    base_dir, tuned_dir = _bert_dirs(tmp_path)
    output = tmp_path / "adapter"
    report = _extract(
        capsys,
        "--base",
        str(base_dir),
        "--finetuned",
        str(tuned_dir),
        "--output",
        str(output),
        "--rank",
        "4",
    )
    assert report["max_relative_error"] < 1e-5  # (rank-2 updates, rank 4 kept)
    note = report["uncaptured_changes"]["classifier.weight"]["note"]
    assert note.startswith("new head: not in the base") and "modules_to_save" in note
    keys = load_file(output / "adapter_model.safetensors")
    assert keys and all(key.startswith("base_model.model.bert.") for key in keys)
    ids = input_ids(vocab=128)
    with torch.no_grad():
        want = BertForSequenceClassification.from_pretrained(tuned_dir).eval()(ids).logits
        plain = _base_body_tuned_head(base_dir, tuned_dir)(ids).logits
    assert (plain - want).abs().max() > 1e-2  # (the adapter has something to do)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with_peft = peft.PeftModel.from_pretrained(
            _base_body_tuned_head(base_dir, tuned_dir), output
        )
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    lorakit_model = load_adapter(_base_body_tuned_head(base_dir, tuned_dir), output)
    with torch.no_grad():
        torch.testing.assert_close(with_peft.eval()(ids).logits, want, atol=1e-4, rtol=0)
        torch.testing.assert_close(lorakit_model.eval()(ids).logits, want, atol=1e-4, rtol=0)


def _causal_base_and_classifier_dirs(tmp_path, body_update: bool = True):
    """A causal Llama's checkpoint and a ``LlamaForSequenceClassification`` fine-tuned from it
    (a low-rank update of the body when ``body_update``, a trained ``score``)."""
    base = tiny_models.llama(0)
    base.save_pretrained(tmp_path / "base")
    tuned_body = fine_tuned(base, noise=0.0) if body_update else copy.deepcopy(base)
    config = copy.deepcopy(base.config)
    config.num_labels, config.pad_token_id, config.architectures = 2, 0, None
    classifier = LlamaForSequenceClassification(config).eval()
    classifier.model.load_state_dict(tuned_body.model.state_dict())
    classifier.save_pretrained(tmp_path / "tuned")
    return tmp_path / "base", tmp_path / "tuned"


def test_weights_newly_initialised_at_loading_are_named_not_extracted(tmp_path, capsys):
    base_dir, tuned_dir = _causal_base_and_classifier_dirs(tmp_path)
    common = ["--base", str(base_dir), "--finetuned", str(tuned_dir), "--task", "seq-cls"]
    first = _extract(capsys, *common, "--output", str(tmp_path / "one"), "--rank", "4")
    second = _extract(capsys, *common, "--output", str(tmp_path / "two"), "--rank", "4")
    files = [(tmp_path / run / "adapter_model.safetensors").read_bytes() for run in ("one", "two")]
    assert files[0] == files[1]  # (no ΔW against random weights: the same every run)
    assert first == {**second, "output": first["output"]}
    assert "score" not in {layer["name"] for layer in first["layers"]}
    assert first["uncaptured_changes"]["score.weight"] == {
        "change": None,
        "relative": None,
        "note": "not in the base checkpoint (newly initialised): not extracted",
    }
    assert main(["analyze", *common, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "score" not in {layer["name"] for layer in report["layers"]}
    assert {"name": "score", "checkpoint": "base"}.items() <= report["left_out"][-1].items()
    assert main(["analyze", *common]) == 0
    assert "  score: not in the base checkpoint (newly initialised)" in capsys.readouterr().out


def test_only_newly_initialised_weights_differing_is_refused(tmp_path, capsys):
    base_dir, tuned_dir = _causal_base_and_classifier_dirs(tmp_path, body_update=False)
    argv = [
        "extract",
        "--base",
        str(base_dir),
        "--finetuned",
        str(tuned_dir),
        "--task",
        "seq-cls",
        "--output",
        str(tmp_path / "out"),
        "--rank",
        "2",
    ]
    assert main(argv) != 0
    error = capsys.readouterr().err
    assert "score (not in the base checkpoint)" in error and "newly initialised" in error
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("options", [dict(rank=3), dict(energy=0.9, max_rank=3)])
def test_extraction_holds_one_float64_update_at_a_time(monkeypatch, options):
    base = tiny_models.llama(0)
    tuned = fine_tuned(base, noise=1e-3)
    real_updates, references, most_alive = updates._updates, [], [0]

    def counted_updates(*args, **kwargs):
        for name, delta in real_updates(*args, **kwargs):
            alive = sum(reference() is not None for reference in references)
            most_alive[0] = max(most_alive[0], alive + 1)
            references.append(weakref.ref(delta))
            yield name, delta
            del delta

    monkeypatch.setattr(updates, "_updates", counted_updates)
    extraction = extract_lora(base, tuned, **options)
    assert len(references) >= 6 and most_alive[0] == 1
    modules, tuned_modules = dict(base.named_modules()), dict(tuned.named_modules())
    for layer in extraction.layers:  # the values: the float64 SVD's best rank-r fit
        tuned_weight, weight = tuned_modules[layer.name].weight, modules[layer.name].weight
        delta = tuned_weight.detach().double() - weight.detach().double()
        u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)
        r = layer.rank
        scale = extraction.config.alpha_for(layer.name) / extraction.config.rank_for(layer.name)
        assert r == (3 if "rank" in options else extraction.config.rank_for(layer.name))
        lora_A, lora_B = extraction.factors[layer.name]
        best = (u[:, :r] * sigma[:r]) @ vh[:r]
        got = scale * lora_B.double() @ lora_A.double()
        assert float((got - best).norm() / best.norm()) < 1e-6
        expected_error = math.sqrt(float((sigma[r:] ** 2).sum() / (sigma**2).sum()))
        assert layer.relative_error == pytest.approx(expected_error, abs=1e-12)
    dense = sum(layer.shape[0] * layer.shape[1] for layer in extraction.layers)
    assert extraction.dense_parameters == dense


def test_plots_of_an_all_zero_update_warn_nothing(tmp_path):
    from lorakit.analysis.plots import plot_effective_ranks, plot_spectra
    from lorakit.analysis.spectrum import spectrum_of_matrix

    spectra = [spectrum_of_matrix("model.layers.0.self_attn.q_proj", torch.zeros(8, 4))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = [
            plot_spectra(spectra, tmp_path / "spectra.png"),
            plot_spectra([], tmp_path / "empty.png"),
            plot_effective_ranks([], tmp_path / "ranks.png"),
        ]
    assert all(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in written)
