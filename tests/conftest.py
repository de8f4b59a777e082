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


@pytest.fixture
def tiny_llama():
    return tiny_models.llama()


@pytest.fixture
def tiny_gpt2():
    return tiny_models.gpt2()


@pytest.fixture
def tiny_bert():
    return tiny_models.bert()
