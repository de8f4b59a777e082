"""The derived ``tokenizer.*`` keys of a GGUF model (``gguf_tokenizer.tokenizer_keys``): whether
llama.cpp adds BOS / EOS must be what the tokenizer itself does. Oracle: llama.cpp's own
converter's reading of the saved tokenizer (``gguf.SpecialVocab``), and the tokenizer's output."""

from __future__ import annotations

import pytest

from lorakit.export.gguf_model import export_model
from lorakit.export.gguf_tokenizer import tokenizer_keys
from tests import tiny_models
from tests.gguf_helpers import reader_fields, with_post_processor


def converter_flags(tokenizer, directory) -> dict[str, bool]:
    """What llama.cpp's converter writes as add_bos_token / add_eos_token (absent = False)."""
    import gguf

    tokenizer.save_pretrained(directory)
    special = gguf.SpecialVocab(directory, load_merges=False)
    return {role: bool(special.add_special_token.get(role, False)) for role in ("bos", "eos")}


def derived_flags(tokenizer) -> dict[str, bool]:
    keys = {key: value for key, value, *_ in tokenizer_keys(tokenizer, len(tokenizer))}
    return {
        role: bool(keys.get(f"tokenizer.ggml.add_{role}_token", False)) for role in ("bos", "eos")
    }


@pytest.mark.parametrize("template", [None, "bos", "eos", "both"])
def test_add_bos_and_eos_follow_the_post_processor_as_the_converter_reads_it(
    tmp_path, template
) -> None:
    tokenizer = with_post_processor(template)
    ids = tokenizer("hello world")["input_ids"]
    plain = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    adds = {
        "bos": ids[0] == tokenizer.bos_token_id != plain[0],
        "eos": ids[-1] == tokenizer.eos_token_id != plain[-1],
    }
    assert adds == {
        "bos": template in ("bos", "both"),
        "eos": template in ("eos", "both"),
    }  # the tokenizer itself
    assert converter_flags(tokenizer, tmp_path) == adds  # llama.cpp's converter
    assert derived_flags(tokenizer) == adds  # lorakit


def test_the_model_file_holds_the_flags(tmp_path) -> None:
    """Through ``export_model``: the GGUF file's keys, read by the gguf package."""
    tokenizer = with_post_processor("bos")
    torch_model = tiny_models.save_llama_with_tokenizer(tmp_path / "hf", tokenizer)
    export_model(torch_model, tmp_path / "m.gguf", "f32", tokenizer=tokenizer)
    fields = reader_fields(tmp_path / "m.gguf")
    assert fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert "tokenizer.ggml.add_eos_token" not in fields  # absent: llama.cpp adds no EOS
