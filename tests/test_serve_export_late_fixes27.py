"""Late fixes of review 27 (serving and GGUF export).

Serving: the 429 check before an adapter load holds a place in the waiting queue until the
request is submitted (concurrent requests no longer all pass it, load and evict, then get a 429);
``min_tokens`` masks EOS also with ``ignore_eos`` (vLLM); with ``include_stop_str_in_output`` the
text of the stop token that ended a request ends its text (vLLM's detokenizer).

GGUF export: an adapter made for another class of the same GGUF architecture (Mistral over
Llama) exports; ``sliding_window`` is refused only where transformers applies it (Mistral, and
Qwen2 layers whose ``layer_types`` is "sliding_attention", with a window below
``max_position_embeddings``); the quantized-layer refusal names each layer's class and why, and
suggests ``merge_and_unload`` only where it dequantizes; ``export --help`` says what
``--overwrite`` replaces.

Greedy generation is checked against a loop written out on the model's full forward in float64
(vLLM's ``min_tokens``: EOS at -inf for the first ``min_tokens`` steps)."""

from __future__ import annotations

import copy
import json
import shutil
import sys
import threading
import types

import numpy as np
import pytest
import torch
from torch import nn
from transformers import (
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lorakit.cli import main
from lorakit.errors import UserError
from lorakit.export.gguf_adapter import export_adapter
from lorakit.export.gguf_model import export_model
from lorakit.serve.engine import Engine
from lorakit.serve.requests import GenerationRequest
from lorakit.serve.sampling import SamplingParams
from tests import serving, tiny_models
from tests.gguf_helpers import SIZES, reader_tensors
from tests.serving import BASE, Served, assert_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = serving.PROMPT


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def root(adapter_files, tmp_path):
    shutil.copytree(adapter_files[0] / "adapters", tmp_path / "adapters")
    return tmp_path


# ----------------------------------------------------------------- 1. queue places
def _completion(served: Served, model: str):
    return served.post("/v1/completions", serving.completion(model=model))


def test_a_request_loading_its_adapter_holds_its_queue_place(root, adapter_files) -> None:
    """max_waiting=1: while one request loads its adapter, a second (another adapter) gets a
    429 at once and loads nothing; the place is free again once the first is done."""
    served = Served(root, adapter_files[1])
    served.engine.max_waiting = 1
    loading, release = threading.Event(), threading.Event()
    ensure_loaded = served.adapters.ensure_loaded

    def slow_load(name: str) -> None:
        if name == "ad1":
            loading.set()
            assert release.wait(timeout=60)  # (deadlock guard)
        ensure_loaded(name)

    served.adapters.ensure_loaded = slow_load
    answers = {}
    with served.client:
        assert _completion(served, "ad0").status_code == 200
        first = threading.Thread(target=lambda: answers.update(ad1=_completion(served, "ad1")))
        first.start()
        try:
            assert loading.wait(timeout=60)
            loaded, evictions = served.bank.names(), served.bank.evictions
            response = _completion(served, "ad2")
            error = assert_error(response, 429, None, "busy", "1 more are on their way")
            assert error["code"] == "queue_full"
            assert served.bank.names() == loaded and served.bank.evictions == evictions
        finally:
            release.set()
            first.join(timeout=60)
        assert answers["ad1"].status_code == 200, answers["ad1"].text
        assert served.engine.reserved == 0
        assert _completion(served, "ad2").status_code == 200


def test_reserved_places_count_against_max_waiting(root, adapter_files) -> None:
    served = Served(root, adapter_files[1])
    served.engine.max_waiting = 2
    with served.client:
        assert _completion(served, "ad0").status_code == 200
        loaded, evictions = served.bank.names(), served.bank.evictions
        with served.engine.reserve(), served.engine.reserve():
            assert served.engine.reserved == 2
            assert_error(_completion(served, "ad1"), 429, None, "2 more are on their way")
            assert served.bank.names() == loaded and served.bank.evictions == evictions
        assert served.engine.reserved == 0  # released on leaving the block
        assert _completion(served, "ad1").status_code == 200


def test_failed_requests_leave_no_reserved_place(root, adapter_files) -> None:
    served = Served(root, adapter_files[1])
    served.engine.max_waiting = 1
    broken = root / "adapters" / "broken"
    shutil.copytree(root / "adapters" / "ad0", broken)
    (broken / "adapter_config.json").write_text("{not json")
    mixture = {"model": BASE, "prompt": "hi", "max_tokens": 2, "merged_adapters": {"ids": []}}
    with served.client:
        assert_error(_completion(served, "nowhere"), 404, "model")
        assert_error(_completion(served, "broken"), 400, "model", "'broken'")
        assert served.post("/v1/completions", mixture).status_code == 400
        assert served.engine.reserved == 0
        place = served.engine.reserve()
        assert served.engine.reserved == 1
        place.release()
        place.release()  # released once: a second release changes nothing
        assert served.engine.reserved == 0
        assert _completion(served, "ad0").status_code == 200


# ----------------------------------------------------------------- 2./3. min_tokens, stop text
def greedy(model, masked: set[int], min_tokens: int, steps: int, stops=()) -> list[int]:
    return serving.masked_greedy(model, PROMPT, masked, min_tokens, steps, stops)


@pytest.mark.parametrize("min_tokens", [1, 3])
def test_min_tokens_masks_eos_also_with_ignore_eos(greedy_model, min_tokens) -> None:
    model, eos = greedy_model
    with Engine(model, None, None, eos_token_ids=[eos]) as engine:
        params = SamplingParams(max_tokens=6, min_tokens=min_tokens, ignore_eos=True)
        ids, _, last = engine.generate(PROMPT, None, params)
    assert ids == greedy(model, {eos}, min_tokens, 6)
    assert eos not in ids[:min_tokens] and ids[0] != eos
    assert last.finish_reason == "length" and last.completion_tokens == 6


class _Letters:
    """A tokenizer: id i < 5 decodes to "abcde"[i]; 99 is a special token (EOS)."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join("abcde"[i] if i < 5 else "" if skip_special_tokens else "</s>" for i in ids)


def _run(tokens, **fields) -> tuple[str, tuple[int, ...], str | None]:
    request = GenerationRequest([1], None, SamplingParams(**fields), lambda event: None)
    text, ids = "", ()
    for token in tokens:
        piece = request.take(token, {99}, _Letters())
        if piece is not None:
            final, new_text, new_ids, _ = piece
            text, ids = text + new_text, ids + new_ids
            if final is not None:
                return text, ids, final
    return text, ids, None


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_token_s_text_ends_the_text_with_include_stop_str(include) -> None:
    fields = dict(max_tokens=9, stop_token_ids=(3,), include_stop_str_in_output=include)
    text, ids, final = _run([0, 1, 3, 2], **fields)
    kept = (0, 1, 3) if include else (0, 1)  # a kept stop token is an output token
    assert (text, ids, final) == ("abd" if include else "ab", kept, "stop")
    text, ids, final = _run([0, 1, 99, 2], **fields)  # EOS: special, no text either way
    assert (text, ids, final) == ("ab", (0, 1), "stop")


def test_a_stop_token_s_text_streamed_and_whole_over_http(root, adapter_files) -> None:
    served = Served(root, adapter_files[1])
    tokenizer = adapter_files[1]
    model = served.engine.model
    plain = greedy(model, set(), 0, 6)
    index, stop_id = next(
        (i, t) for i, t in enumerate(plain) if i and tokenizer.decode([t], skip_special_tokens=True)
    )
    body = {
        "model": BASE,
        "prompt": PROMPT,
        "max_tokens": 6,
        "temperature": 0,
        "stop_token_ids": [stop_id],
        "include_stop_str_in_output": True,
        "logprobs": 0,
    }
    expected = tokenizer.decode(plain[: index + 1], skip_special_tokens=True)
    with served.client:
        whole = served.post("/v1/completions", body).json()
        streamed = served.client.post("/v1/completions", json={**body, "stream": True}).text
    assert whole["choices"][0]["text"] == expected
    assert whole["choices"][0]["finish_reason"] == "stop"
    # the stop token is kept as the last output token: counted, with its log-probability,
    # so the tokens' texts add up to the text (OpenAI's contract), streamed and whole
    assert whole["usage"]["completion_tokens"] == index + 1
    assert "".join(whole["choices"][0]["logprobs"]["tokens"]) == expected
    chunks = [
        json.loads(line[len("data: ") :])["choices"][0]
        for line in streamed.splitlines()
        if line.startswith("data: {")
    ]
    assert "".join(chunk["text"] for chunk in chunks) == expected
    for chunk in chunks:
        tokens = (chunk.get("logprobs") or {}).get("tokens", [])
        assert "".join(tokens) == chunk["text"]


# ----------------------------------------------------------------- 4. base_model_class
def _peft_adapter(directory, base: nn.Module):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(copy.deepcopy(base), config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:  # B != 0
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(directory)
    return peft_model


def test_a_mistral_adapter_exports_over_a_same_sized_llama(tmp_path) -> None:
    torch.manual_seed(0)
    mistral = MistralForCausalLM(MistralConfig(**SIZES, sliding_window=None)).eval()
    llama = tiny_models.llama()
    peft_model = _peft_adapter(tmp_path / "adapter", mistral)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["auto_mapping"]["base_model_class"] == "MistralForCausalLM"
    export_adapter(tmp_path / "adapter", mistral, tmp_path / "mistral.gguf")
    export_adapter(tmp_path / "adapter", llama, tmp_path / "llama.gguf")
    over_mistral, over_llama = (
        reader_tensors(tmp_path / n) for n in ("mistral.gguf", "llama.gguf")
    )
    assert over_mistral.keys() == over_llama.keys()
    for name in over_mistral:
        np.testing.assert_array_equal(over_llama[name], over_mistral[name])
    layer = peft_model.base_model.model.model.layers[1].self_attn.v_proj
    np.testing.assert_array_equal(  # alpha / r = 2 everywhere: PEFT's factors as they are
        over_llama["blk.1.attn_v.weight.lora_a"],
        layer.lora_A["default"].weight.detach().double().numpy(),
    )


def test_an_adapter_on_a_llama_classifier_exports_over_the_causal_llama(tmp_path) -> None:
    """PEFT records LlamaForSequenceClassification for an adapter trained on it: its decoder
    layers are a Llama's, so it exports over the same-sized LlamaForCausalLM (it was refused
    as "no GGUF architecture lorakit writes")."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    classifier = LlamaForSequenceClassification(tiny_models.llama_config(num_labels=2)).eval()
    peft_model = _peft_adapter(tmp_path / "adapter", classifier)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["auto_mapping"]["base_model_class"] == "LlamaForSequenceClassification"
    export_adapter(tmp_path / "adapter", tiny_models.llama(), tmp_path / "a.gguf")
    layer = peft_model.base_model.model.model.layers[1].self_attn.v_proj
    np.testing.assert_array_equal(
        reader_tensors(tmp_path / "a.gguf")["blk.1.attn_v.weight.lora_a"],
        layer.lora_A["default"].weight.detach().double().numpy(),
    )


def test_a_qwen2_adapter_over_a_llama_is_still_refused(tmp_path) -> None:
    torch.manual_seed(0)
    _peft_adapter(tmp_path / "adapter", Qwen2ForCausalLM(Qwen2Config(**SIZES)).eval())
    with pytest.raises(UserError, match="made for a Qwen2ForCausalLM") as refused:
        export_adapter(tmp_path / "adapter", tiny_models.llama(), tmp_path / "a.gguf")
    assert "'qwen2'" in str(refused.value) and "'llama'" in str(refused.value)
    assert not (tmp_path / "a.gguf").exists()


# ----------------------------------------------------------------- 5./6. sliding windows
def _logits_equal_to_plain(plain: nn.Module, other: nn.Module) -> None:
    """transformers gives ``other`` (same weights, another config) ``plain``'s logits over a
    sequence longer than any window in these tests."""
    other.load_state_dict(plain.state_dict())
    ids = torch.randint(0, SIZES["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            other(ids, use_cache=False).logits, plain(ids, use_cache=False).logits, rtol=0, atol=0
        )


def _exports_like(plain: nn.Module, other: nn.Module, tmp_path) -> None:
    export_model(plain, tmp_path / "plain.gguf", "f32")
    export_model(other, tmp_path / "other.gguf", "f32")
    expected, written = (reader_tensors(tmp_path / n) for n in ("plain.gguf", "other.gguf"))
    assert written.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(written[name], expected[name])


def test_a_llama_config_s_sliding_window_is_ignored_as_transformers_does(tmp_path) -> None:
    plain = tiny_models.llama()
    windowed = LlamaForCausalLM(tiny_models.llama_config(sliding_window=4)).eval()
    _logits_equal_to_plain(plain, windowed)
    _exports_like(plain, windowed, tmp_path)
    torch.manual_seed(0)
    mistral = MistralForCausalLM(MistralConfig(**SIZES, sliding_window=4)).eval()
    with pytest.raises(UserError, match=r"sliding_window=4 .*model_type='mistral'"):
        export_model(mistral, tmp_path / "m.gguf", "f32")


@pytest.mark.parametrize(
    "fields",
    [
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=2),  # no layer windowed
        dict(use_sliding_window=True, sliding_window=128, max_window_layers=0),  # >= positions
    ],
)
def test_qwen2_windows_no_layer_uses_export(fields, tmp_path) -> None:
    torch.manual_seed(0)
    plain = Qwen2ForCausalLM(Qwen2Config(**SIZES)).eval()
    windowed = Qwen2ForCausalLM(Qwen2Config(**SIZES, **fields)).eval()
    _logits_equal_to_plain(plain, windowed)
    _exports_like(plain, windowed, tmp_path)


def test_a_qwen2_window_on_its_layers_is_still_refused(tmp_path) -> None:
    config = Qwen2Config(**SIZES, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    with pytest.raises(UserError, match=r"'sliding_attention' at layers \[0, 1\]"):
        export_model(Qwen2ForCausalLM(config).eval(), tmp_path / "q.gguf", "f32")
    assert not (tmp_path / "q.gguf").exists()


# ----------------------------------------------------------------- 7. quantized layers, --help
def test_a_known_quantized_layer_is_named_with_its_class_and_merge_advice(model_dir, tmp_path):
    from lorakit.models import load_model

    model, _ = load_model(model_dir, quantization="int8-rows", progress=False)
    with pytest.raises(UserError) as refused:
        export_model(model, tmp_path / "q.gguf", "f32")
    message = str(refused.value)
    assert "model.layers.0.self_attn.q_proj (lorakit.quantized." in message
    assert "Int8RowsLinear" in message and "merge_and_unload the model" in message


def test_an_unknown_quantized_layer_gets_its_reason_and_no_merge_advice(tmp_path, monkeypatch):
    helpers = types.ModuleType("training_quantize_helpers")
    exec("import torch.nn as nn\nclass CastedLinear(nn.Linear): pass", helpers.__dict__)
    monkeypatch.setitem(sys.modules, "training_quantize_helpers", helpers)
    model = tiny_models.llama()
    old = model.model.layers[0].self_attn.q_proj
    model.model.layers[0].self_attn.q_proj = helpers.CastedLinear(
        old.in_features, old.out_features, bias=False
    )
    with pytest.raises(UserError) as refused:
        export_model(model, tmp_path / "q.gguf", "f32")
    message = str(refused.value)
    assert (
        "model.layers.0.self_attn.q_proj (its class training_quantize_helpers.CastedLinear "
        "is a quantized layer type)" in message
    )
    assert "merge_and_unload the model" not in message and "cannot dequantize" in message


def test_export_help_says_overwrite_replaces_the_output_file(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["export", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "replace an existing --output file" in text
    assert "an adapter already in --output" not in text


def test_an_adapter_for_a_class_of_another_model_type_is_refused_by_its_own_config(tmp_path):
    """JevForDecision is listed under qwen2 (and gemma4, qwen3_5, ...) in transformers' decision
    table: the class's own config type, jev, decides, so it is no Qwen2."""
    from lorakit.export.gguf_names import class_architecture

    assert class_architecture("JevForDecision") is None
    assert class_architecture("Qwen2ForCausalLM") == "qwen2"


def test_a_question_answering_adapter_names_its_decoder_prefix(tmp_path) -> None:
    """LlamaForQuestionAnswering keeps its decoder under 'transformer': the refusal says so (it
    passed the class check and then blamed llama.cpp for every module)."""
    from transformers import LlamaForQuestionAnswering

    torch.manual_seed(0)
    _peft_adapter(tmp_path / "adapter", LlamaForQuestionAnswering(tiny_models.llama_config()))
    with pytest.raises(UserError, match=r"under 'transformer' where .* has 'model'"):
        export_adapter(tmp_path / "adapter", tiny_models.llama(), tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()
