"""Shared fixtures: tiny random transformers models (no download) and seeding."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from tests import tiny_models


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
