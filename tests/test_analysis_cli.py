"""``lorakit analyze`` and ``lorakit extract`` on tiny models saved to temporary directories; the
extracted adapter is checked through lorakit's loader and through the real peft package."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli import main
from tests import tiny_models
from tests.tiny_models import UPDATE_RANKS, fine_tuned


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    base = tiny_models.llama()
    tuned = fine_tuned(base, noise=1e-5)
    root = tmp_path_factory.mktemp("models")
    base.save_pretrained(root / "base")
    tuned.save_pretrained(root / "tuned")
    return root / "base", root / "tuned", base, tuned


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_analyze_a_full_fine_tune_as_json_with_plots(model_dirs, capsys, tmp_path):
    base_dir, tuned_dir, base, tuned = model_dirs
    argv = ["analyze", "--base", str(base_dir), "--finetuned", str(tuned_dir), "--json"]
    code, out, _ = _run(capsys, [*argv, "--plots", str(tmp_path)])
    assert code == 0
    report = json.loads(out)
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert len(layers) == 6
    for name, layer in layers.items():
        assert layer["rank_99"] == UPDATE_RANKS[layer["module_type"].rsplit(".", 1)[-1]]
        delta = (
            tuned.get_submodule(name).weight.detach().double()
            - base.get_submodule(name).weight.detach().double()
        )
        expected = torch.linalg.svdvals(delta)
        assert layer["singular_values"][:3] == pytest.approx(expected[:3].tolist(), rel=1e-5)
    advice = {a["module_type"].rsplit(".", 1)[-1]: a["rank"] for a in report["advice"]["0.99"]}
    assert advice == UPDATE_RANKS
    for name in ("spectra.png", "ranks.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_extract_then_load_reproduces_the_fine_tune(model_dirs, capsys, tmp_path):
    base_dir, tuned_dir, base, tuned = model_dirs
    output = tmp_path / "adapter"
    argv = ["extract", "--base", str(base_dir), "--finetuned", str(tuned_dir)]
    code, out, _ = _run(capsys, [*argv, "--output", str(output), "--energy", "0.999", "--json"])
    assert code == 0
    report = json.loads(out)
    assert {layer["rank"] for layer in report["layers"]} == set(UPDATE_RANKS.values())
    assert report["parameters"] == sum(l["rank"] * sum(l["shape"]) for l in report["layers"])
    saved = json.loads((output / "adapter_config.json").read_text())
    assert saved["r"] == 4 and len(saved["rank_pattern"]) == 4

    from lorakit.io import load_adapter

    ids = tiny_models.input_ids()
    with torch.no_grad():
        expected = tuned(ids).logits
        change = (expected - base(ids).logits).norm()
        model = load_adapter(copy.deepcopy(base), output)
        got = model(ids).logits
    assert float((got - expected).norm() / change) < 10 * report["max_relative_error"] + 1e-4

    from peft import PeftModel

    with torch.no_grad():
        oracle = PeftModel.from_pretrained(copy.deepcopy(base), str(output))(ids).logits
    torch.testing.assert_close(oracle, got, rtol=1e-5, atol=1e-5)

    code, out, _ = _run(capsys, ["analyze", str(output), "--json"])
    assert code == 0
    layers = {layer["name"]: layer for layer in json.loads(out)["layers"]}
    name = "model.layers.0.self_attn.v_proj"
    delta = (
        tuned.get_submodule(name).weight.detach().double()
        - base.get_submodule(name).weight.detach().double()
    )
    top = torch.linalg.svdvals(delta)[:4].tolist()
    assert layers[name]["singular_values"] == pytest.approx(top, rel=1e-5)
    assert layers[name]["max_rank"] == 4


def test_readable_table_and_user_errors(model_dirs, capsys, tmp_path):
    base_dir, tuned_dir, _, _ = model_dirs
    code, out, _ = _run(capsys, ["analyze", "--base", str(base_dir), "--finetuned", str(tuned_dir)])
    assert code == 0 and "r99" in out and "advised rank at 0.9" in out
    assert "model.layers.1.mlp.down_proj" in out
    code, _, err = _run(capsys, ["analyze"])
    assert code == 2 and "ADAPTER_DIR" in err
    code, _, err = _run(capsys, ["analyze", "--base", str(base_dir)])
    assert code == 2 and "--finetuned" in err
    argv = ["extract", "--base", str(base_dir), "--finetuned", str(base_dir)]
    code, _, err = _run(capsys, [*argv, "--output", str(tmp_path / "x"), "--rank", "2"])
    assert code == 2 and "no linear layer differs" in err
    code, _, err = _run(capsys, [*argv, "--output", str(tmp_path / "x"), "--energy", "1.5"])
    assert code == 2 and "--energy" in err


def test_analyze_and_extract_show_no_loading_bars(model_dirs, capsys, tmp_path):
    from transformers.utils import logging as transformers_logging

    base_dir, tuned_dir, _, _ = model_dirs
    pair = ["--base", str(base_dir), "--finetuned", str(tuned_dir)]
    code, _, err = _run(capsys, ["analyze", *pair])
    assert code == 0 and "Loading weights" not in err and err == ""
    code, _, err = _run(capsys, ["extract", *pair, "--output", str(tmp_path / "a"), "--rank", "2"])
    assert code == 0 and "Loading weights" not in err and err == ""
    assert transformers_logging.is_progress_bar_enabled()  # switched back on afterwards


def test_extract_gives_the_adapter_size_in_binary_units(model_dirs, capsys, tmp_path):
    base_dir, tuned_dir, _, _ = model_dirs
    pair = ["--base", str(base_dir), "--finetuned", str(tuned_dir)]
    code, out, _ = _run(capsys, ["extract", *pair, "--output", str(tmp_path / "a"), "--rank", "2"])
    adapter = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    parameters = sum(t.numel() for t in tensors.values())
    assert code == 0 and adapter["r"] == 2 and f"adapter: {parameters:,} parameters" in out
    assert f"({4 * parameters / 1024:.1f} KiB in float32)" in out and " MB" not in out


def test_analyze_help_shows_a_single_percent_sign(capsys):
    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    out = capsys.readouterr().out
    assert "90/99% energy" in " ".join(out.split()) and "%%" not in out


def test_analyze_lists_layers_in_numeric_order(capsys, tmp_path):
    from transformers import LlamaForCausalLM

    import lorakit
    from lorakit.io import save_adapter

    deep = LlamaForCausalLM(tiny_models.llama_config(num_hidden_layers=12))
    lorakit.inject(deep, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    tiny_models.randomize_adapters(deep)
    save_adapter(deep, tmp_path / "adapter")
    code, out, _ = _run(capsys, ["analyze", str(tmp_path / "adapter"), "--json"])
    assert code == 0
    layers = [layer["layer"] for layer in json.loads(out)["layers"]]
    assert layers == list(range(12))
    code, out, _ = _run(capsys, ["analyze", str(tmp_path / "adapter")])
    rows = [line.split()[0] for line in out.splitlines() if line.startswith("model.layers.")]
    assert rows == [f"model.layers.{i}.self_attn.q_proj" for i in range(12)]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("mismatch", "are not two matrices sharing a rank"),
        ("flat", "are not two matrices sharing a rank"),
        ("integer", "are not floating point"),
    ],
)
def test_analyze_refuses_damaged_factors_in_one_line(tmp_path, capsys, damage, message):
    """inspect refused these files in one line; analyze ended in a torch traceback (or, for
    integer factors, analysed them)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    import lorakit

    model = lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    key = next(k for k in sorted(tensors) if k.endswith("lora_B.weight"))
    tensors[key] = {
        "mismatch": torch.zeros(64, 3),
        "flat": torch.zeros(64),
        "integer": tensors[key].to(torch.int32),
    }[damage]
    save_file(tensors, str(path), metadata=metadata)
    assert main(["analyze", str(tmp_path / "adapter")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_layers_of_another_shape_are_named_not_dropped(tmp_path, capsys):
    """A 'fine-tune' whose MLP is wider: analyze analyses the attention layers and lists the MLP
    ones as left out (it refused the pair); extract lists the reshaped weights as not captured
    (they were dropped unseen)."""
    from lorakit.analysis.extract import extract_lora

    base = tiny_models.llama()
    wide = tiny_models.LlamaForCausalLM(tiny_models.llama_config(intermediate_size=128))
    base.save_pretrained(tmp_path / "base")
    wide.save_pretrained(tmp_path / "wide")
    capsys.readouterr()  # (the saving bars)
    argv = ["analyze", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "wide")]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    left_out = {layer["name"]: layer for layer in report["left_out"]}
    mlp = [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")]
    assert sorted(left_out) == sorted(mlp)
    assert left_out["model.layers.0.mlp.gate_proj"]["finetuned_shape"] == [128, 64]
    analysed = {layer["name"].rsplit(".", 1)[-1] for layer in report["layers"]}
    assert analysed == {"q_proj", "k_proj", "v_proj", "o_proj", "lm_head"}  # (another model)
    extraction = extract_lora(base, wide, rank=2)
    reshaped = {k: v for k, v in extraction.uncaptured.items() if v["change"] is None}
    assert "model.layers.0.mlp.gate_proj.weight" in reshaped
    assert reshaped["model.layers.0.mlp.gate_proj.weight"]["finetuned_shapes"] == [128, 64]


def test_a_base_encoder_against_its_classification_fine_tune(tmp_path, capsys):
    """minilm-l6 is a BertModel; its fine-tunes are BertForSequenceClassification, whose layers
    are prefixed 'bert.': analyze compared nothing ("no linear layer differs")."""
    from transformers import BertModel

    tuned = tiny_models.bert()
    with torch.no_grad():
        query = tuned.bert.encoder.layer[0].attention.self.query.weight
        query.add_(torch.outer(torch.ones(query.shape[0]), torch.linspace(0, 1, query.shape[1])))
    base = BertModel(tuned.config, add_pooling_layer=True)
    base.load_state_dict(tiny_models.bert().bert.state_dict())
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    capsys.readouterr()
    argv = ["analyze", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "tuned")]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = [layer["name"] for layer in report["layers"]]
    assert names == ["encoder.layer.0.attention.self.query"]
    assert report["layers"][0]["rank_90"] == 1  # the rank-1 update added above


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_analyze_refuses_non_finite_factors_naming_the_key(tmp_path, capsys, value):
    """A NaN / inf in a factor ended in torch's LinAlgError traceback."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    import lorakit

    model = lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(target_modules=["q_proj"]))
    tiny_models.randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    tensors[key][0, 0] = value
    save_file(tensors, str(path), metadata=metadata)
    assert main(["analyze", str(tmp_path / "adapter")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit: error: ") and err.count("\n") == 1, err
    assert key in err and "NaN or inf" in err, err


@pytest.mark.parametrize("where", ["base", "tuned"])
def test_analyze_and_extract_refuse_non_finite_weights_naming_the_layer(
    model_dirs, tmp_path, capsys, where
):
    """A NaN in a model's weight ended in torch's LinAlgError traceback."""
    _, _, base, tuned = model_dirs
    base, tuned = copy.deepcopy(base), copy.deepcopy(tuned)
    broken = base if where == "base" else tuned
    with torch.no_grad():
        broken.model.layers[1].mlp.down_proj.weight[3, 3] = float("nan")
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    capsys.readouterr()
    models = ["--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "tuned")]
    for argv in (
        ["analyze", *models],
        ["extract", *models, "--output", str(tmp_path / "adapter"), "--rank", "4"],
        ["extract", *models, "--output", str(tmp_path / "adapter"), "--energy", "0.9"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("lorakit: error: ") and err.count("\n") == 1, err
        assert "model.layers.1.mlp.down_proj" in err and "NaN or inf" in err, err
        assert ("fine-tuned" if where == "tuned" else "base") in err, err
    assert not (tmp_path / "adapter").exists()


def test_extract_says_why_a_tied_head_is_left_out(tmp_path, capsys):
    base = tiny_models.gpt2()
    fine_tuned(base, noise=0, ranks={"wte": 3, "c_attn": 2}).save_pretrained(tmp_path / "tuned")
    base.save_pretrained(tmp_path / "base")
    capsys.readouterr()
    argv = ["extract", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "tuned")]
    assert main([*argv, "--output", str(tmp_path / "a"), "--rank", "2"]) == 0
    out = capsys.readouterr().out
    assert "lm_head" not in out.split("\n\n")[0]  # no row of the table
    assert "left out (a LoRA on a tied weight" in out
    assert "lm_head.weight (tied to transformer.wte.weight)" in out
    assert main([*argv, "--output", str(tmp_path / "b"), "--rank", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [layer["name"].rsplit(".", 1)[-1] for layer in report["layers"]] == ["c_attn"] * 2
    note = report["uncaptured_changes"]["lm_head.weight"]["note"]
    assert note == "tied to transformer.wte.weight"
