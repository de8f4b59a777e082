"""Bad input and races against the HTTP app: every one gets OpenAI's JSON error with a 4xx code
(never a 500, a dropped stream or a hang), and no interleaving leaves an adapter stuck.

The app runs in process (Starlette's TestClient, engine thread started by the app's lifespan)
on a tiny random Llama with the tiny ChatML tokenizer and four PEFT-format adapters on disk.
"""

from __future__ import annotations

import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.serve.sampling import SamplingParams
from tests import tiny_tokenizer
from tests.locks import lock_is_free_for_others
from tests.serving import (
    AUTH,
    BASE,
    TOKEN,
    Served,
    assert_error,
    completion,
    engine_held,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def served(adapter_files):
    served = Served(*adapter_files)
    with served.client:  # runs the lifespan: starts and stops the engine
        yield served


def test_json_nested_100k_deep_is_a_400(served):
    deep = b"[" * 100_000 + b"]" * 100_000
    error = assert_error(served.post("/v1/completions", deep), 400, None, "nested too deeply")
    assert error["code"] == "invalid_json"
    deep_object = b'{"model": ' * 20_000 + b"1" + b"}" * 20_000
    assert_error(served.post("/v1/chat/completions", deep_object), 400, None, "nested too deeply")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("seed", [2**70, 2**64, -(2**63) - 1])
def test_seed_out_of_torch_range_is_a_400_naming_seed(served, seed, stream):
    body = completion(seed=seed, temperature=1.0, stream=stream)
    assert_error(served.post("/v1/completions", body), 400, "seed", "seed", str(seed))
    chat = {"model": "ad1", "messages": [{"role": "user", "content": "hi"}], "seed": seed}
    assert_error(served.post("/v1/chat/completions", {**chat, "stream": stream}), 400, "seed")


@pytest.mark.parametrize("name", ["temperature", "top_p"])
def test_an_integer_too_large_for_a_float_is_a_400_naming_the_field(served, name):
    raw = f'{{"model": "ad0", "prompt": "hi", "{name}": 1{"0" * 400}}}'
    assert_error(served.post("/v1/completions", raw.encode()), 400, name, "out of range")


def test_seeds_at_the_ends_of_the_range_are_served(served):
    for seed in (2**64 - 1, -(2**63)):
        response = served.post("/v1/completions", completion(seed=seed, temperature=1.0))
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(
    ("path", "raw", "param", "where"),
    [
        ("/v1/completions", '{"model": "ad0", "prompt": "\\ud800abc"}', "prompt", "'prompt'"),
        ("/v1/completions", '{"model": "ad0", "prompt": ["x\\udfff"]}', "prompt", "'prompt[0]'"),
        (
            "/v1/chat/completions",
            '{"model": "ad0", "messages": [{"role": "user", "content": "hi \\udc80"}]}',
            "messages",
            "'messages[0].content'",
        ),
        (
            "/v1/completions",
            '{"model": "ad0", "prompt": "hi", "stop": "\\ud83d"}',
            "stop",
            "'stop'",
        ),
    ],
)
def test_lone_surrogates_are_a_400_naming_the_field(served, path, raw, param, where):
    error = assert_error(served.post(path, raw.encode()), 400, param, where, "surrogate")
    assert error["type"] == "invalid_request_error"
    # a surrogate pair (valid UTF-16 for one character) is fine
    ok = served.post("/v1/completions", b'{"model": "ad0", "prompt": "hi \\ud83d\\ude00"}')
    assert ok.status_code == 200, ok.text


def test_sampling_params_name_the_field_out_of_range():
    from lorakit.serve.sampling import InvalidSamplingParam

    for fields, name in [
        (dict(seed=2**64), "seed"),
        (dict(seed=-(2**63) - 1), "seed"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
    ]:
        with pytest.raises(InvalidSamplingParam, match=name) as caught:
            SamplingParams(**fields)
        assert caught.value.field == name
    generator = torch.Generator().manual_seed(SamplingParams(seed=2**64 - 1).seed)  # accepted
    assert generator.initial_seed() == 2**64 - 1


def broken_copy(adapter_files, tmp_path, name: str, edit) -> Served:
    """A server over a copy of the adapter directory plus ``name``: ad0 with ``edit`` applied to
    its tensors (it may still lazily load by ``name``: the registry seeds it)."""
    root, tokenizer = adapter_files
    shutil.copytree(root / "adapters", tmp_path / "adapters")
    target = tmp_path / "adapters" / name
    shutil.copytree(root / "adapters" / "ad0", target)
    tensors = load_file(target / "adapter_model.safetensors")
    save_file(edit(tensors), target / "adapter_model.safetensors")
    return Served(tmp_path, tokenizer)


def zero_dim_lora_A(tensors: dict) -> dict:
    return {
        k: torch.tensor(1.0) if k.endswith("q_proj.lora_A.weight") else v
        for k, v in tensors.items()
    }


def test_an_adapter_with_a_0d_factor_is_a_400_naming_the_tensor(adapter_files, tmp_path):
    served = broken_copy(adapter_files, tmp_path, "zerod", zero_dim_lora_A)
    tensor = "model.layers.0.self_attn.q_proj.lora_A.weight has shape ()"
    with served.client:
        body = {"lora_name": "zerod-again", "lora_path": "zerod"}
        response = served.post("/v1/load_lora_adapter", body, AUTH)
        assert_error(response, 400, "lora_path", tensor)
        assert "zerod-again" not in served.model_ids()
        lazily = served.post("/v1/completions", completion(model="zerod"))
        assert_error(lazily, 400, "model", tensor)
        assert served.bank.names() == []  # nothing half-loaded
        assert served.post("/v1/completions", completion()).status_code == 200


RAISING_TEMPLATE = (  # Llama-2 / Mistral style: the template itself refuses some conversations
    "{% if messages[0]['role'] != 'user' %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}" + tiny_tokenizer.CHATML_TEMPLATE
)


@pytest.mark.parametrize("stream", [False, True])
def test_a_chat_template_that_raises_is_a_400_with_its_message(served, monkeypatch, stream):
    monkeypatch.setattr(served.tokenizer, "chat_template", RAISING_TEMPLATE)
    messages = [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "hello"}]
    body = {"model": "ad1", "messages": messages, "max_tokens": 2, "stream": stream}
    response = served.post("/v1/chat/completions", body)
    assert_error(response, 400, "messages", "chat template", "roles must alternate user/assistant")
    body["messages"] = messages[1:]  # what the template accepts is served
    response = served.post("/v1/chat/completions", body)
    assert response.status_code == 200, response.text


def test_an_adapter_may_not_take_the_base_models_name(served):
    before = served.model_ids()
    assert before == [BASE, "ad0", "ad1", "ad2", "ad3"]
    response = served.post("/v1/load_lora_adapter", {"lora_name": BASE, "lora_path": "ad1"}, AUTH)
    assert_error(response, 400, "lora_name", f"{BASE!r} is the base model's name")
    assert served.model_ids() == before and served.bank.names() == []
    ok = served.post("/v1/completions", completion(model=BASE))
    assert ok.status_code == 200 and ok.json()["model"] == BASE


def test_an_adapter_directory_named_like_the_base_stops_the_start(adapter_files, tmp_path):
    root, tokenizer = adapter_files
    shutil.copytree(root / "adapters" / "ad0", tmp_path / "adapters" / BASE)
    with pytest.raises(lorakit.UserError, match="has the base model's name 'base'"):
        Served(tmp_path, tokenizer)


def test_an_unload_while_a_request_reads_the_adapter_leaves_nothing_stuck(served, monkeypatch):
    """The unload lands between a lazy load's file read and its write into the bank."""
    adapters, read = served.adapters, served.adapters.read

    def read_then_unload(name):
        adapter_files = read(name)
        adapters.remove(name)  # (the admin route, on another thread, at this very moment)
        return adapter_files

    monkeypatch.setattr(adapters, "read", read_then_unload)
    with pytest.raises(KeyError, match="'ad0' was unloaded while it was being read"):
        adapters.ensure_loaded("ad0")
    assert "ad0" not in served.bank and "ad0" not in served.model_ids()
    monkeypatch.undo()
    # the name is free again: loading it back and unloading it work (they said "already loaded"
    # and 404 when the adapter was left in the bank but not in the registry)
    assert served.post("/v1/load_lora_adapter", {"lora_name": "ad0"}, AUTH).status_code == 200
    assert "ad0" in served.bank and "ad0" in served.model_ids()
    assert served.post("/v1/unload_lora_adapter", {"lora_name": "ad0"}, AUTH).status_code == 200
    assert "ad0" not in served.bank and "ad0" not in served.model_ids()


def test_unload_forgets_the_name_while_holding_the_bank_lock(served, monkeypatch):
    """No lazy load can slip in between the bank eviction and the registry forgetting the name."""
    served.adapters.ensure_loaded("ad1")
    registry, unregister, seen = served.adapters.registry, served.adapters.registry.unregister, []

    def unregister_watched(name, withdrawn=False):
        seen.append(("ad1" in served.bank, lock_is_free_for_others(served.bank.lock)))
        unregister(name, withdrawn)

    monkeypatch.setattr(registry, "unregister", unregister_watched)
    assert served.post("/v1/unload_lora_adapter", {"lora_name": "ad1"}, AUTH).status_code == 200
    assert seen == [(False, False)]  # evicted already, and the bank still locked


@pytest.mark.parametrize("stream", [False, True])
def test_an_adapter_unloaded_after_its_request_was_queued_is_a_404(served, stream):
    responses = []
    with engine_held(served.engine):
        asking = threading.Thread(
            target=lambda: responses.append(
                served.post("/v1/completions", completion(model="ad2", stream=stream))
            )
        )
        asking.start()
        wait_until(lambda: served.engine.load == (1, 1))  # held one; ad2 queued
        assert "ad2" in served.bank
        assert served.post("/v1/unload_lora_adapter", {"lora_name": "ad2"}, AUTH).status_code == 200
    asking.join()
    error = assert_error(
        responses[0], 404, "model", "'ad2' does not exist", "unknown adapter 'ad2'"
    )
    assert error["code"] == "model_not_found"


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_after_the_engine_stopped_is_a_503(adapter_files, stream):
    served = Served(*adapter_files)
    served.engine.start()
    served.engine.stop()  # (no lifespan: the client below does not start the engine again)
    response = served.post("/v1/completions", completion(stream=stream))
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["type"] == "server_error" and "engine is stopped" in error["message"]


@pytest.mark.parametrize(
    "headers", [None, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}]
)
def test_unload_without_the_admin_token_is_a_401(served, headers):
    served.adapters.ensure_loaded("ad3")
    response = served.post("/v1/unload_lora_adapter", {"lora_name": "ad3"}, headers)
    error = assert_error(response, 401, None, "admin token")
    assert error["type"] == "authentication_error"
    assert "ad3" in served.model_ids() and "ad3" in served.bank  # nothing was unloaded


def test_unload_of_an_adapter_a_running_request_uses_is_a_409(served):
    with engine_held(served.engine, "ad1"):  # a running request holds ad1
        response = served.post("/v1/unload_lora_adapter", {"lora_name": "ad1"}, AUTH)
        assert_error(response, 409, "lora_name", "'ad1' is used by 1 running request(s)")
        assert "ad1" in served.model_ids() and "ad1" in served.bank
    # once the request has finished, the same unload succeeds
    assert served.post("/v1/unload_lora_adapter", {"lora_name": "ad1"}, AUTH).status_code == 200
    assert "ad1" not in served.model_ids() and "ad1" not in served.bank
