"""GGUF export fixes: a write the disk drops is an error that replaces nothing; PEFT's copy of
the frozen embedding is skipped (a changed or resized one refused); a ``token_embd`` LoRA for a
tied model is refused on read (llama.cpp aborts on it); messages name the default base, the
trainable-token rows, and lorakit's ``PeftModel`` is taken as its base model."""

from __future__ import annotations

import copy
import errno
import os

import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.errors import AdapterFileError, UserError
from lorakit.export.gguf_adapter import export_adapter
from lorakit.export.gguf_model import export_model
from lorakit.state import state_of
from tests import tiny_models, tiny_tokenizer
from tests.gguf_helpers import reader_tensors, saved_adapter


# ----------------------------------------------------------------------------- a full disk
def drop_the_last_bytes(monkeypatch, count: int = 64) -> None:
    """gguf's writer as on a full disk: the tensor data's last ``count`` bytes never reach the
    file, with no error (numpy's buffered ``tofile``), the writer's position unchanged."""
    import gguf

    original = gguf.GGUFWriter.write_tensors_to_file

    def short_write(writer, *args, **kwargs):
        original(writer, *args, **kwargs)
        (handle,) = writer.fout
        handle.flush()
        os.ftruncate(handle.fileno(), handle.tell() - count)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", short_write)


def temporaries(path) -> list[str]:
    return [name for name in os.listdir(path.parent) if name.startswith(f".{path.name}.")]


def test_a_short_adapter_file_is_an_error_and_replaces_nothing(tmp_path, monkeypatch) -> None:
    base = tiny_models.llama()
    _, directory = saved_adapter(tmp_path / "adapter", base)
    target = tmp_path / "a.gguf"
    export_adapter(directory, base, target)
    before = target.read_bytes()
    drop_the_last_bytes(monkeypatch)
    with pytest.raises(OSError) as failed:
        export_adapter(directory, base, target, tensor_type="f16")
    assert failed.value.errno == errno.ENOSPC
    assert failed.value.filename == str(target)
    assert "came out" in str(failed.value) and "nothing was replaced" in str(failed.value)
    assert target.read_bytes() == before
    assert temporaries(target) == []


def test_a_short_model_file_is_an_error_and_the_cli_says_so(
    tmp_path, model_dir, monkeypatch, capsys
):
    target = tmp_path / "m.gguf"
    drop_the_last_bytes(monkeypatch, count=1)
    with pytest.raises(OSError, match="No space left on device"):
        export_model(tiny_models.llama(), target, "f32")
    assert not target.exists() and temporaries(target) == []
    code = main(["export", str(model_dir), "--format", "gguf", "--output", str(target)])
    assert code != 0
    err = capsys.readouterr().err
    assert "No space left on device" in err and f"--output {target}" in err
    assert not target.exists() and temporaries(target) == []


def test_the_planned_size_is_the_written_size(tmp_path) -> None:
    """Without a short write every export passes the check (the plan is the file's size)."""
    base = tiny_models.llama()
    _, directory = saved_adapter(tmp_path / "adapter", base, target_modules=["q_proj", "lm_head"])
    for tensor_type in ("f32", "f16", "bf16"):
        export_adapter(directory, base, tmp_path / f"{tensor_type}.gguf", tensor_type=tensor_type)
    for tensor_type in ("f32", "q8_0", "q4_0"):
        tokenizer = tiny_tokenizer.build()
        torch.manual_seed(0)
        model = type(base)(tiny_models.llama_config(vocab_size=len(tokenizer))).eval()
        export_model(model, tmp_path / f"m-{tensor_type}.gguf", tensor_type, tokenizer=tokenizer)


# ------------------------------------------------------------ PEFT's frozen embedding copy
def peft_adapter(directory, base, targets=("q_proj", "embed_tokens", "lm_head"), **saving) -> None:
    """An adapter saved by PEFT itself (default: on q_proj, embed_tokens and lm_head: with
    ``save_embedding_layers="auto"`` it also holds both embeddings' frozen base weights)."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False
    )
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(directory, **saving)


def safetensors_keys(directory) -> list[str]:
    """The tensor names of ``directory``'s adapter_model.safetensors, in file order."""
    from safetensors import safe_open

    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as handle:
        return list(handle.keys())


def test_peft_copy_of_the_frozen_embedding_is_skipped(tmp_path) -> None:
    base = tiny_models.llama()
    peft_adapter(tmp_path / "peft", base)
    done = export_adapter(tmp_path / "peft", base, tmp_path / "a.gguf")
    assert done.dropped == []
    assert set(done.modules) == {"model.embed_tokens", "lm_head"} | {
        f"model.layers.{i}.self_attn.q_proj" for i in range(base.config.num_hidden_layers)
    }
    names = set(reader_tensors(tmp_path / "a.gguf"))
    assert {"token_embd.weight.lora_a", "output.weight.lora_b"} <= names
    with torch.device("meta"):  # the CLI's model: shapes only, so it cannot tell PEFT's copy
        meta = type(base)(base.config)  # from a trained embedding of the same shape
    with pytest.raises(UserError, match="cannot compare with the base's") as refused:
        export_adapter(tmp_path / "peft", meta, tmp_path / "m.gguf")
    assert "--drop-unsupported" in str(refused.value)
    done = export_adapter(tmp_path / "peft", meta, tmp_path / "m.gguf", drop_unsupported=True)
    assert [entry.split(":")[0] for entry in done.dropped] == [
        key for key in safetensors_keys(tmp_path / "peft") if key.endswith("base_layer.weight")
    ]
    assert set(done.modules) == {"model.embed_tokens", "lm_head"} | {
        f"model.layers.{i}.self_attn.q_proj" for i in range(base.config.num_hidden_layers)
    }


def test_a_changed_or_resized_embedding_is_refused(tmp_path) -> None:
    base = tiny_models.llama()
    peft_adapter(tmp_path / "peft", base)
    changed = copy.deepcopy(base)
    with torch.no_grad():
        changed.model.embed_tokens.weight[3, 0] += 1.0
    with pytest.raises(UserError) as refused:
        export_adapter(tmp_path / "peft", changed, tmp_path / "a.gguf")
    assert "model.embed_tokens.base_layer.weight: a full embedding weight that differs" in str(
        refused.value
    )
    assert "lm_head" not in str(refused.value)  # the head is still the model's own
    torch.manual_seed(0)
    resized = type(base)(tiny_models.llama_config(vocab_size=base.config.vocab_size + 8)).eval()
    peft_adapter(tmp_path / "resized", resized, ["q_proj"], save_embedding_layers=True)
    with pytest.raises(UserError, match=r"shape \[136, 64\] for the model's \[128, 64\]"):
        export_adapter(tmp_path / "resized", base, tmp_path / "b.gguf")
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "b.gguf").exists()


# ----------------------------------------------------------- token_embd LoRA, tied model
def test_reading_a_token_embd_lora_onto_a_tied_model_is_refused(tmp_path) -> None:
    torch.manual_seed(0)
    tied = type(tiny_models.llama())(tiny_models.llama_config(tie_word_embeddings=True)).eval()
    untied = tiny_models.llama()  # same shapes: the file is valid for it
    _, directory = saved_adapter(tmp_path / "embed", untied, target_modules=["embed_tokens"])
    export_adapter(directory, untied, tmp_path / "e.gguf")
    before = {k: v.clone() for k, v in tied.state_dict().items()}
    with pytest.raises(AdapterFileError) as refused:
        lorakit.load_adapter(tied, tmp_path / "e.gguf")
    for part in ("token_embd.weight", "ties its output", "llama.cpp aborts", "GGML_ASSERT"):
        assert part in str(refused.value)
    assert state_of(tied) is None
    assert all(torch.equal(before[k], v) for k, v in tied.state_dict().items())
    with pytest.warns(UserWarning, match="no base-model fingerprint"):
        lorakit.load_adapter(untied, tmp_path / "e.gguf")  # the untied model takes it


def test_export_gives_the_true_reason_for_a_tied_token_embedding(tmp_path) -> None:
    torch.manual_seed(0)
    tied = type(tiny_models.llama())(tiny_models.llama_config(tie_word_embeddings=True)).eval()
    _, directory = saved_adapter(tmp_path / "embed", tied, target_modules=["embed_tokens"])
    with pytest.raises(UserError, match=r"embed_tokens .*llama\.cpp aborts .*GGML_ASSERT"):
        export_adapter(directory, tied, tmp_path / "b.gguf")


# ------------------------------------------------------------------------------ messages
def test_without_model_the_message_names_the_default_base(tmp_path, monkeypatch, capsys):
    """The adapter is for a base of other sizes than the default ``--model``."""
    other = tiny_models.save_llama_with_tokenizer(
        tmp_path / "other", tiny_tokenizer.build(), intermediate_size=40
    )
    _, directory = saved_adapter(tmp_path / "adapter", other)
    monkeypatch.setattr("lorakit.commands.export.DEFAULT_BASE", str(tmp_path / "other"))
    tiny_models.save_llama_with_tokenizer(tmp_path / "small", tiny_tokenizer.build())
    command = ["export", str(directory), "--format", "gguf", "--output", str(tmp_path / "a.gguf")]
    assert main(command) == 0  # the (patched) default fits
    command.append("--overwrite")  # (the checks below fail after the output check)
    assert main([*command, "--model", str(tmp_path / "small")]) == 2
    err = capsys.readouterr().err
    assert f"of --model {tmp_path / 'small'}; give the adapter's base model (--model)" in err
    monkeypatch.setattr("lorakit.commands.export.DEFAULT_BASE", str(tmp_path / "small"))
    assert main(command) == 2
    err = capsys.readouterr().err
    assert f"of the default base {tmp_path / 'small'} (no --model given)" in err


def test_lorakit_peft_model_is_taken_as_its_base(tmp_path) -> None:
    base = tiny_models.llama()
    _, directory = saved_adapter(tmp_path / "adapter", base)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    wrapped = lorakit.get_peft_model(copy.deepcopy(base), config)
    export_adapter(directory, base, tmp_path / "base.gguf")
    export_adapter(directory, wrapped, tmp_path / "wrapped.gguf")
    assert (tmp_path / "base.gguf").read_bytes() == (tmp_path / "wrapped.gguf").read_bytes()


def test_trainable_token_rows_are_named(tmp_path) -> None:
    base = tiny_models.llama()
    _, directory = saved_adapter(tmp_path / "tt", base, trainable_token_indices=[1, 2])
    message = (
        "model.embed_tokens.token_adapter.trainable_tokens_delta: trained rows of the token "
        "embedding (trainable_token_indices)"
    )
    with pytest.raises(UserError) as refused:
        export_adapter(directory, base, tmp_path / "a.gguf")
    assert message in str(refused.value)
    done = export_adapter(directory, base, tmp_path / "a.gguf", drop_unsupported=True)
    assert [d for d in done.dropped if message in d] and len(done.dropped) == 1
