"""Review fix (round 35) of ``lorakit analyze``: a module with one of its two factors.

An adapter file missing one ``lora_A`` was analysed without that module (exit 0, the rank
advice computed from the other modules, no word); one missing a ``lora_B`` ended in a bare
``KeyError`` traceback (exit 1). ``load_adapter`` refuses both files; analyze now does too, in
one line naming the key that is there and the one that is missing.
"""

from __future__ import annotations

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.cli import main
from tests import tiny_models


def _adapter_without(tmp_path, suffix: str, targets: list[str]) -> tuple[str, str]:
    """An adapter directory whose first key ending in ``suffix`` is deleted, and that key."""
    model = lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(r=2, target_modules=targets))
    tiny_models.randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    removed = next(key for key in sorted(tensors) if key.endswith(suffix))
    del tensors[removed]
    save_file(tensors, str(path), metadata=metadata)
    return str(tmp_path / "adapter"), removed


@pytest.mark.parametrize(
    ("suffix", "targets", "present"),
    [
        ("lora_A.weight", ["q_proj", "v_proj"], "lora_B.weight"),
        ("lora_B.weight", ["q_proj", "v_proj"], "lora_A.weight"),
        ("lora_embedding_A", ["embed_tokens"], "lora_embedding_B"),
        ("lora_embedding_B", ["embed_tokens"], "lora_embedding_A"),
    ],
)
def test_a_missing_factor_is_refused_in_one_line_naming_it(
    tmp_path, capsys, suffix, targets, present
):
    adapter, removed = _adapter_without(tmp_path, suffix, targets)
    assert main(["analyze", adapter]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no table of the other modules
    assert captured.err.count("\n") == 1, captured.err
    kept = removed.removesuffix(suffix) + present
    assert f"{kept} has no" in captured.err
    assert f"({removed} is missing)" in captured.err
    assert "incomplete" in captured.err
