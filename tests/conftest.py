"""Shared fixtures: tiny random transformers models (no download), seeding, and a tiny model
directory with a JSONL data file for the command-line tests."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from tests import tiny_models, tiny_tokenizer

WORDS = ["good", "great", "fine", "dull", "bad", "poor", "warm", "cold", "fun", "slow"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures(...)``): the
    serving tests run tiny ops from several threads, far steadier on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_llama():
    return tiny_models.llama()


@pytest.fixture
def tiny_gpt2():
    return tiny_models.gpt2()


@pytest.fixture
def tiny_bert():
    return tiny_models.bert()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama + ChatML tokenizer saved as a plain transformers directory."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = tiny_tokenizer.build()
    tokenizer.pad_token = tokenizer.eos_token
    tiny_models.save_llama_with_tokenizer(directory, tokenizer, pad_token_id=tokenizer.pad_token_id)
    return directory


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    """24 prompt/completion reviews ("Review: good film\nSentiment:" -> " positive") as JSONL."""
    path = tmp_path_factory.mktemp("data") / "reviews.jsonl"
    lines = []
    for i in range(24):
        word = WORDS[i % len(WORDS)]
        answer = "positive" if i % len(WORDS) in (0, 1, 2, 6, 8) else "negative"
        lines.append(
            json.dumps({"prompt": f"Review: {word} film\nSentiment:", "completion": f" {answer}"})
        )
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory):
    """``(root, tokenizer)``: four adapters ad0..ad3 (q_proj, v_proj, r=2) under ``root/adapters``
    for the in-process serving tests (tests/serving.py)."""
    from tests import serving

    return serving.write_adapters(tmp_path_factory.mktemp("served"))


@pytest.fixture
def adapter_files_copy(adapter_files, tmp_path):
    """A copy of ``adapter_files``' adapters ad0..ad3 under ``tmp_path/adapters`` (for tests
    that change them on disk); returns ``tmp_path``."""
    import shutil

    source, _ = adapter_files
    shutil.copytree(source / "adapters", tmp_path / "adapters")
    return tmp_path


@pytest.fixture(scope="module")
def greedy_model(adapter_files):
    """The served tiny Llama (no adapter) and its greedy first token of ``serving.PROMPT``, which
    the serving tests use as EOS (an EOS the model picks first)."""
    from tests import serving

    model = serving.base_model(adapter_files[1])
    with torch.no_grad():
        first = int(model(torch.tensor([serving.PROMPT])).logits[0, -1].argmax())
    return model, first


@pytest.fixture
def tiny_builtin_model(monkeypatch, tmp_path):
    """The built-in ``smollm2-135m-instruct`` converted into an empty cache (``$LORAKIT_CACHE``
    in ``tmp_path``) as a tiny random Llama with the ChatML tokenizer, by a conversion that
    reseeds and draws from torch's global RNG, as building a transformers model does. Yields
    the list of conversions made (GGUF paths)."""
    from lorakit import model_cache
    from tests import tiny_tokenizer

    conversions = []

    def convert(gguf_path, target):
        conversions.append(gguf_path)
        tokenizer = tiny_tokenizer.build()

        def write(directory):
            tiny_models.save_llama_with_tokenizer(directory, tokenizer, seed=7)

        model_cache.publish_directory(target, {"source": gguf_path.name}, write)

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(model_cache, "convert_gguf", convert)
    return conversions


@pytest.fixture
def peft_loftq_on_cpu(monkeypatch):
    """peft's ``loftq_init`` exactly as written, but computing on the CPU (peft 0.21 needs
    CUDA; whatever accelerator the machine has, lorakit's factors, compared bit for bit, are
    computed there)."""
    import inspect

    import peft.tuners.lora.layer
    import peft.utils.loftq_utils

    from tests.peft_versions import peft_loftq_device_expression

    source = inspect.getsource(peft.utils.loftq_utils.loftq_init)
    device = peft_loftq_device_expression()
    assert device in source  # peft changed: update this fixture
    namespace = dict(vars(peft.utils.loftq_utils))
    exec(source.replace(device, '"cpu"'), namespace)  # peft's own source, device changed
    monkeypatch.setattr(peft.tuners.lora.layer, "loftq_init", namespace["loftq_init"])
