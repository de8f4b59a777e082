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
