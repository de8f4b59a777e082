"""The serving bank and PEFT's saved base copies (``save_embedding_layers``).

A PEFT adapter that targets lm_head, saved with PEFT's default ``save_embedding_layers="auto"``,
holds an unchanged copy of the base weight (``base_model.model.lm_head.base_layer.weight``). The
bank refused the whole adapter for it ("not a LoRA linear weight ... no embeddings"); it now
accepts the copy when it is the served weight (by shape from the header, by value once read) and
serves exactly what the same adapter saved without it serves. A copy that differs is refused
naming the tensor; other non-LoRA tensors are refused saying what they are and the way out.
"""

from __future__ import annotations

import copy
import logging
import threading

import peft
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from lorakit.cli import build_parser
from lorakit.commands.serve import build
from lorakit.errors import AdapterFileError
from lorakit.io.read import read_adapter, read_adapter_header
from lorakit.serve import AdapterBank, checks, prepare_for_serving
from lorakit.serve.engine import Engine
from lorakit.serve.sampling import SamplingParams
from tests import tiny_models, tiny_tokenizer

COPY_KEY = "base_model.model.lm_head.base_layer.weight"
TARGETS = ["q_proj", "lm_head"]
PROMPTS = [[5, 6, 7, 8], [9, 3, 40, 41, 2]]
STEPS = 6


def _peft_adapter(base, **config) -> peft.PeftModel:
    """PEFT's LoRA on a copy of ``base`` with random, non-zero factors (B too: lm_head's update
    changes the logits)."""
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval()


def _save_both(base, root) -> tuple:
    """The adapter saved with PEFT's defaults ("auto": it keeps lm_head's base weight) and with
    ``save_embedding_layers=False``; returns the PEFT model and both directories."""
    model = _peft_adapter(base, r=4, lora_alpha=8, target_modules=TARGETS)
    auto, plain = root / "auto", root / "plain"
    model.save_pretrained(auto)
    model.save_pretrained(plain, save_embedding_layers=False)
    return model, auto, plain


def _with_changed_copy(source, target, change) -> None:
    """A copy of the adapter directory ``source`` whose lm_head base copy is ``change(copy)``."""
    target.mkdir(parents=True)
    (target / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    tensors = load_file(source / "adapter_model.safetensors")
    tensors[COPY_KEY] = change(tensors[COPY_KEY])
    save_file(tensors, target / "adapter_model.safetensors", {"format": "pt"})


def _engine_greedy(model, bank, adapter) -> list[tuple[list[int], list[float]]]:
    """Each prompt's greedy tokens and their log-probabilities from the engine, one by one."""
    engine = Engine(model, bank, max_batch=2, eos_token_ids=[])
    results = []
    with engine:
        for prompt in PROMPTS:
            events, done = [], threading.Event()

            def on_event(event, events=events, done=done):
                events.append(event)
                if event.finish_reason is not None:
                    done.set()

            engine.submit(prompt, adapter, SamplingParams(max_tokens=STEPS, logprobs=0), on_event)
            assert done.wait(120)
            assert events[-1].error is None, events[-1].error
            tokens = [t for e in events for t in e.token_ids]
            logprobs = [item.logprob for e in events for item in e.logprobs]
            results.append((tokens, logprobs))
    return results


def _peft_greedy(model, prompt) -> list[int]:
    """PEFT's own greedy continuation (the full forward each step)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(STEPS):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_a_default_saved_lm_head_adapter_serves_as_the_one_saved_without_the_copy(tmp_path):
    base = tiny_models.llama()
    reference, auto, plain = _save_both(base, tmp_path)
    auto_file, plain_file = read_adapter(auto), read_adapter(plain)
    assert COPY_KEY in auto_file.tensors and COPY_KEY not in plain_file.tensors  # PEFT's "auto"
    assert torch.equal(auto_file.tensors[COPY_KEY], base.lm_head.weight)
    model = copy.deepcopy(base)
    prepare_for_serving(model, TARGETS)
    bank = AdapterBank(model, max_rank=4, capacity=2)
    bank.load("auto", auto_file.config, auto_file.tensors)
    bank.load("plain", plain_file.config, plain_file.tensors)
    served_auto = _engine_greedy(model, bank, "auto")
    served_plain = _engine_greedy(model, bank, "plain")
    served_base = _engine_greedy(model, bank, None)
    assert [tokens for tokens, _ in served_auto] == [tokens for tokens, _ in served_plain]
    for (_, got), (_, want) in zip(served_auto, served_plain, strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-6)
    for prompt, (tokens, _) in zip(PROMPTS, served_auto, strict=True):
        assert tokens == _peft_greedy(reference, prompt)  # lm_head's LoRA routed as PEFT's
    assert served_auto != served_base  # the adapter (lm_head included) changes the output
    assert (base.lm_head.weight == model.lm_head.base_layer.weight).all()  # base untouched


def test_a_base_copy_that_differs_from_the_served_weight_is_refused_naming_it(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(checks, "_COMPARE_ELEMENTS", 3 * 64)  # blocks of 3 rows: row 7 in the 3rd
    base = tiny_models.llama()
    _, auto, _ = _save_both(base, tmp_path)
    changed, resized = tmp_path / "changed", tmp_path / "resized"

    def nudged(weight):
        weight = weight.clone()
        weight[7, 3] += 1e-3
        return weight

    _with_changed_copy(auto, changed, nudged)
    _with_changed_copy(auto, resized, lambda weight: torch.cat([weight, weight[:2]]))
    model = copy.deepcopy(base)
    prepare_for_serving(model, TARGETS)
    bank = AdapterBank(model, max_rank=4, capacity=2)
    unchanged = read_adapter(auto)
    bank.load("auto", unchanged.config, unchanged.tensors)  # equal in every block
    header = read_adapter_header(changed)
    bank.check_shapes("changed", header.config, header.tensors)  # name and shape fit
    adapter = read_adapter(changed)
    with pytest.raises(AdapterFileError) as refused:
        bank.load("changed", adapter.config, adapter.tensors)
    message = str(refused.value)
    assert f"tensor {COPY_KEY!r}" in message and "of 'lm_head'" in message
    assert "other values" in message and "changes the base weight" in message
    assert "merge" in message and "save_embedding_layers=False" in message
    header = read_adapter_header(resized)
    with pytest.raises(AdapterFileError, match=r"shape \[130, 64\].*served one \[128, 64\]"):
        bank.check_shapes("resized", header.config, header.tensors)  # from the header alone
    assert bank.names() == ["auto"]


def test_a_copy_of_the_float32_weight_fits_a_bfloat16_served_base(tmp_path):
    """The copy is compared up to the rounding of either dtype (combining's rule for saved base
    weights): a bfloat16 server holds the float32 weight the adapter was saved with, rounded."""
    base = tiny_models.llama()
    _, auto, _ = _save_both(base, tmp_path)
    adapter = read_adapter(auto)
    assert adapter.tensors[COPY_KEY].dtype == torch.float32
    model = copy.deepcopy(base).to(torch.bfloat16)
    prepare_for_serving(model, TARGETS)
    bank = AdapterBank(model, max_rank=4, capacity=1)
    bank.load("auto", adapter.config, adapter.tensors)
    assert bank.names() == ["auto"]


@pytest.mark.parametrize(
    ("config", "key", "what"),
    [
        (
            dict(target_modules=["q_proj", "embed_tokens"]),
            "base_model.model.model.embed_tokens.lora_embedding_A",
            "a factor of a LoRA on an embedding layer",
        ),
        (
            dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
            "base_model.model.lm_head.weight",
            "a trained copy of a module (modules_to_save)",
        ),
    ],
    ids=["embedding-lora", "saved-lm-head"],
)
def test_other_non_lora_tensors_are_refused_saying_what_they_are(tmp_path, config, key, what):
    """An embedding's LoRA is refused for its factors (not for the base copy PEFT keeps beside
    them), and a saved lm_head is not called an embedding; both say the way out."""
    base = tiny_models.llama()
    _peft_adapter(base, r=4, lora_alpha=8, **config).save_pretrained(tmp_path / "a")
    adapter = read_adapter(tmp_path / "a")
    model = copy.deepcopy(base)
    prepare_for_serving(model, TARGETS)
    bank = AdapterBank(model, max_rank=4, capacity=1)
    with pytest.raises(AdapterFileError) as refused:
        bank.load("a", adapter.config, adapter.tensors)
    message = str(refused.value)
    assert f"tensor {key!r} is not a LoRA linear weight: it is {what}" in message
    assert "lm_head included" in message and "serve the merged model" in message
    if "modules_to_save" in config:
        assert "embedding" not in message


def test_lorakit_serve_starts_with_the_file_and_serves_it_lazily(tmp_path, caplog):
    tokenizer = tiny_tokenizer.build()
    base = tiny_models.save_llama_with_tokenizer(tmp_path / "model", tokenizer)
    _, auto, _ = _save_both(base, tmp_path / "adapters")
    _with_changed_copy(auto, tmp_path / "adapters" / "changed", lambda w: w * 1.01)
    args = build_parser().parse_args(
        ["serve", "--model", str(tmp_path / "model"), "--adapters", str(tmp_path / "adapters")]
    )
    with caplog.at_level(logging.INFO, logger="lorakit.serve"):
        app = build(args)
    summary = next(r.getMessage() for r in caplog.records if "served (" in r.getMessage())
    assert "3 served (auto, changed, plain), 0 skipped" in summary  # headers accepted
    body = dict(prompt=PROMPTS[0], max_tokens=STEPS, temperature=0, logprobs=0)
    with TestClient(app) as client:
        answers = {}
        for name in ("auto", "plain"):
            response = client.post("/v1/completions", json=dict(body, model=name))
            assert response.status_code == 200, response.text
            answers[name] = response.json()["choices"][0]["logprobs"]
        refused = client.post("/v1/completions", json=dict(body, model="changed"))
    assert answers["auto"]["tokens"] == answers["plain"]["tokens"]
    torch.testing.assert_close(
        torch.tensor(answers["auto"]["token_logprobs"]),
        torch.tensor(answers["plain"]["token_logprobs"]),
        rtol=0,
        atol=1e-6,
    )
    assert refused.status_code == 400, refused.text
    message = refused.json()["error"]["message"]
    assert COPY_KEY in message and "changes the base weight" in message
