"""A mixture (``merged_adapters``) of adapters that carry PEFT's copy of a base weight.

PEFT's default save of an adapter on lm_head (``save_embedding_layers="auto"``) holds an
unchanged copy of lm_head's base weight. Each such adapter alone was served (the copy checked
against the served weight, ``serve.checks``), but a mixture of them was a 400 ("carry base
weights"). The mixture's carried copies now go through the same check: served as the mixture of
the same adapters saved without the copy, refused naming the tensor when they differ from the
served weight.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests import serving, tiny_tokenizer
from tests.serving import assert_error

TARGETS = ["q_proj", "lm_head"]
COPY_KEY = "base_model.model.lm_head.base_layer.weight"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer.build()


def _save_pair(base, root, seed: int) -> None:
    """A PEFT adapter (r=2, non-zero factors) saved as ``a<seed>`` with PEFT's defaults (the
    lm_head copy) and as ``p<seed>`` without it."""
    model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS)
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    model.save_pretrained(root / "adapters" / f"a{seed}")
    model.save_pretrained(root / "adapters" / f"p{seed}", save_embedding_layers=False)


def _nudged(root, source: str, target: str) -> None:
    """``target``: ``source`` with its lm_head copy changed in one element."""
    directory = root / "adapters" / target
    directory.mkdir()
    config = (root / "adapters" / source / "adapter_config.json").read_text()
    (directory / "adapter_config.json").write_text(config)
    tensors = load_file(root / "adapters" / source / "adapter_model.safetensors")
    tensors[COPY_KEY] = tensors[COPY_KEY].clone()
    tensors[COPY_KEY][7, 3] += 1e-2
    save_file(tensors, directory / "adapter_model.safetensors", {"format": "pt"})


def test_a_mixture_of_adapters_with_lm_head_copies_is_served_as_without_them(tmp_path, tokenizer):
    base = serving.base_model(tokenizer)
    for seed in (0, 1):
        _save_pair(base, tmp_path, seed)
    assert COPY_KEY in load_file(tmp_path / "adapters/a0/adapter_model.safetensors")
    _nudged(tmp_path, "a0", "n0")
    _nudged(tmp_path, "a1", "n1")
    server = serving.Served(tmp_path, tokenizer, targets=TARGETS)
    body = dict(model=serving.BASE, prompt="hello world", max_tokens=6, temperature=0, logprobs=0)
    with server.client:
        answers = {}
        for kind in ("a", "p"):
            mixture = {"ids": [f"{kind}0", f"{kind}1"], "weights": [0.7, 0.6]}
            response = server.post("/v1/completions", dict(body, merged_adapters=mixture))
            assert response.status_code == 200, response.text
            answers[kind] = response.json()["choices"][0]
        base_answer = server.post("/v1/completions", body).json()["choices"][0]
        refused = server.post("/v1/completions", dict(body, merged_adapters={"ids": ["n0", "n1"]}))
    assert answers["a"]["text"] == answers["p"]["text"]
    got, want = (answers[k]["logprobs"]["token_logprobs"] for k in ("a", "p"))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-6)
    assert answers["a"]["logprobs"]["token_logprobs"] != base_answer["logprobs"]["token_logprobs"]
    error = assert_error(refused, 400, "merged_adapters", "cannot be served", COPY_KEY)
    assert "changes the base weight" in error["message"]
