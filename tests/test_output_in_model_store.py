"""An ``--output`` in the place lorakit keeps its built-in base models is refused before
anything loads: ``lorakit merge --output`` onto the converted SmolLM2 replaced the base every
later run loads (the cache checks sizes, not contents, and a merged model has the same size)."""

from __future__ import annotations

import hashlib

import pytest

from lorakit.cli import main
from lorakit.model_specs import resolve_model


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_merge_refuses_the_builtin_models_directory(tiny_builtin_model, tmp_path, capsys):
    builtin = resolve_model("smollm2-135m-instruct")  # converted into the test's cache
    weights = builtin / "model.safetensors"
    before = _digest(weights)
    for output, what in (
        (builtin, "the built-in model smollm2-135m-instruct"),
        (builtin / "merged", "the built-in model smollm2-135m-instruct"),
        (builtin.parent, "lorakit's model cache"),
    ):
        command = ["merge", "--model", "smollm2-135m-instruct", "--adapter", str(tmp_path / "a")]
        assert main([*command, "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert f"--output {output} lies in {what}" in err
        assert "Give a directory of your own" in err
    assert _digest(weights) == before
    assert not (builtin / "merged").exists()


def test_train_refuses_an_output_in_the_model_cache(tiny_builtin_model, tmp_path, capsys):
    builtin = resolve_model("smollm2-135m-instruct")
    command = ["train", "--data", "rotten-tomatoes", "--steps", "1"]
    assert main([*command, "--output", str(builtin)]) == 2
    assert "lies in the built-in model smollm2-135m-instruct" in capsys.readouterr().err
    assert not (builtin / "adapter_config.json").exists()


@pytest.mark.parametrize("where", ["out", "cache", "cache/models/mine"])
def test_an_output_beside_the_builtin_models_is_fine(tiny_builtin_model, tmp_path, where):
    """Only the built-ins' own directories are refused: a LORAKIT_CACHE that is a general
    work directory keeps its other subdirectories usable."""
    from lorakit.model_specs import refuse_output_in_model_store

    refuse_output_in_model_store("merge", tmp_path / where / "merged")


def test_a_users_model_in_the_cache_is_not_called_a_damaged_conversion(
    tiny_builtin_model, model_dir, tmp_path
):
    """A model of the user's own under LORAKIT_CACHE missing its tokenizer: the error must not
    advise deleting it to have it 'converted anew' (nothing would convert it)."""
    import shutil

    from lorakit.errors import UserError
    from lorakit.model_cache import cache_root
    from lorakit.models import load_tokenizer

    mine = cache_root() / "mine"
    shutil.copytree(model_dir, mine)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (mine / name).unlink(missing_ok=True)
    with pytest.raises(UserError) as refused:
        load_tokenizer(mine)
    assert "converted anew" not in str(refused.value)
