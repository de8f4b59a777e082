"""One-line errors, not tracebacks or silent wrong results, for the commands' bad inputs that a
review found: empty or NaN generation settings, a merged model saved into its adapter's
directory, a model directory that also holds an adapter, broken weights, a merge that cannot be
done."""

from __future__ import annotations

import shutil

import pytest

import lorakit
from lorakit.cli import main
from lorakit.models import load_model


def _error(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, (code, err)
    return err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["", "--raw"], "the prompt is empty"),
        (["", "--raw", "--temperature", "0.7"], "the prompt is empty"),
        (["hi", "--temperature", "nan"], "--temperature must be a finite number >= 0, got nan"),
    ],
)
def test_generate_refuses_what_it_cannot_do(capsys, model_dir, extra, message):
    assert message in _error(capsys, "generate", *extra, "--model", model_dir)


@pytest.fixture
def adapter_dir(tmp_path, model_dir):
    model, _ = load_model(model_dir, progress=False)
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    lorakit.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def test_a_merged_model_is_not_saved_into_its_adapters_directory(capsys, model_dir, adapter_dir):
    """transformers applies an adapter_config.json found in a model directory while loading:
    the merged weights would get the adapter twice."""
    err = _error(
        capsys, "merge", "--model", model_dir, "--adapter", adapter_dir, "--output", adapter_dir
    )
    assert "holds an adapter (adapter_config.json)" in err
    assert not (adapter_dir / "config.json").exists()


def test_a_model_directory_holding_an_adapter_is_refused(capsys, tmp_path, model_dir, adapter_dir):
    both = tmp_path / "both"
    shutil.copytree(model_dir, both)
    shutil.copy(adapter_dir / "adapter_config.json", both)
    for command in (["eval", "--data", "rotten-tomatoes"], ["generate", "hi"]):
        err = _error(capsys, *command, "--model", both)
        assert "also holds an adapter (adapter_config.json)" in err


def test_broken_weights_are_one_line_naming_the_directory(capsys, tmp_path, model_dir):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    assert f"cannot load the model in {broken}" in _error(
        capsys, "generate", "hi", "--model", broken
    )
    weights.unlink()  # no weights at all
    assert f"cannot load the model in {broken}" in _error(
        capsys, "generate", "hi", "--model", broken
    )


def test_a_lora_bias_adapter_onto_a_base_without_biases_is_a_user_error(
    capsys, tmp_path, model_dir
):
    model, _ = load_model(model_dir, progress=False)
    config = lorakit.LoraConfig(target_modules=["q_proj"], lora_bias=True)
    lorakit.inject(model, config)
    lorakit.save_adapter(model, tmp_path / "biased")
    err = _error(
        capsys,
        "merge",
        "--model",
        model_dir,
        "--adapter",
        tmp_path / "biased",
        "--output",
        tmp_path / "merged",
    )
    assert "cannot merge:" in err and "bias" in err


def test_generate_refuses_to_run_past_a_learned_position_table():
    """GPT-2's 64 learned positions (tiny model): 60 prompt tokens + 10 new ones would index
    past the table (the engine failed mid-way and generate printed what came before, exit 0);
    a rotary Llama has no table to pass."""
    from lorakit.commands.generate import _check_length
    from lorakit.errors import UserError
    from tests import tiny_models

    with pytest.raises(UserError, match=r"60 tokens.*--max-new-tokens 10 .*64 positions"):
        _check_length(tiny_models.gpt2(), 60, 10)
    _check_length(tiny_models.gpt2(), 54, 10)
    _check_length(tiny_models.llama(), 120, 100)  # past max_position_embeddings: allowed
