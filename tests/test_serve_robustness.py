"""Bad input and races against the HTTP app: every one gets OpenAI's JSON error with a 4xx code
(never a 500, a dropped stream or a hang), and no interleaving leaves an adapter stuck.

The app runs in process (Starlette's TestClient, engine thread started by the app's lifespan)
on a tiny random Llama with the tiny ChatML tokenizer and four PEFT-format adapters on disk.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import lorakit
from lorakit.io import save_adapter
from lorakit.serve import AdapterBank, prepare_for_serving
from lorakit.serve.app import ServerSettings, create_app
from lorakit.serve.engine import Engine
from lorakit.serve.registry import AdapterRegistry, ServedAdapters
from lorakit.serve.sampling import SamplingParams
from tests import tiny_models, tiny_tokenizer
from tests.locks import lock_is_free_for_others

TOKEN = "admin-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BASE = "base"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def base_model(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = tiny_models.llama_config(
        vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Four adapters ad0..ad3 (q_proj, v_proj, r=2) saved under ``root/adapters``."""
    root = tmp_path_factory.mktemp("robust")
    tokenizer = tiny_tokenizer.build()
    reference = base_model(tokenizer)
    for index in range(4):
        config = lorakit.LoraConfig(r=2, lora_alpha=4 + index, target_modules=["q_proj", "v_proj"])
        lorakit.inject(reference, config, adapter_name=f"ad{index}")
    tiny_models.randomize_adapters(reference, std=0.3)
    for index in range(4):
        save_adapter(reference, root / "adapters", f"ad{index}")
    return root, tokenizer


class Served:
    """One app over a fresh model, bank (2 slots), engine and registry; ``client`` is live."""

    def __init__(self, root, tokenizer) -> None:
        self.root, self.tokenizer = root, tokenizer
        model = base_model(tokenizer)
        prepare_for_serving(model, ["q_proj", "v_proj"])
        self.bank = AdapterBank(model, max_rank=4, capacity=2)
        self.adapters = ServedAdapters(self.bank, AdapterRegistry(root / "adapters"), model)
        self.engine = Engine(
            model, self.bank, tokenizer, max_batch=4, adapter_loader=self.adapters.read
        )
        settings = ServerSettings(
            model_name=BASE,
            admin_token=TOKEN,
            max_prompt_tokens=40,
            max_tokens_limit=24,
            max_positions=128,
        )
        self.app = create_app(self.engine, self.adapters, tokenizer, settings)
        self.client = TestClient(self.app)

    def post(self, path: str, body, headers=None):
        if isinstance(body, bytes):
            return self.client.post(path, content=body, headers=headers)
        return self.client.post(path, json=body, headers=headers)

    def model_ids(self) -> list[str]:
        return [card["id"] for card in self.client.get("/v1/models").json()["data"]]


@pytest.fixture
def served(files):
    served = Served(*files)
    with served.client:  # runs the lifespan: starts and stops the engine
        yield served


def assert_error(response, status: int, param: str | None, *words: str) -> dict:
    """An OpenAI error object with ``status``, ``param`` and a message holding ``words``."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error
    return error


@contextlib.contextmanager
def engine_held(engine: Engine, adapter: str | None = None):
    """Keep the engine thread inside a request's first-token callback (the request holds its
    adapter) until the block ends: what the test does meanwhile cannot race the engine."""
    started, release, done = threading.Event(), threading.Event(), threading.Event()

    def on_event(event):
        if not started.is_set():
            started.set()
            release.wait()
        if event.finish_reason is not None:
            done.set()

    engine.submit([5, 6, 7], adapter, SamplingParams(max_tokens=3), on_event)
    assert started.wait(timeout=60)  # (deadlock guard)
    try:
        yield
    finally:
        release.set()
    assert done.wait(timeout=60)


def wait_until(condition) -> None:
    """Poll a condition another thread will make true (a deadlock guard, not a timing check)."""
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.005)


def completion(**fields) -> dict:
    return {"model": "ad0", "prompt": "hello world", "max_tokens": 3, **fields}


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


def broken_copy(files, tmp_path, name: str, edit) -> Served:
    """A server over a copy of the adapter directory plus ``name``: ad0 with ``edit`` applied to
    its tensors (it may still lazily load by ``name``: the registry seeds it)."""
    root, tokenizer = files
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


def test_an_adapter_with_a_0d_factor_is_a_400_naming_the_tensor(files, tmp_path):
    served = broken_copy(files, tmp_path, "zerod", zero_dim_lora_A)
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


def test_an_adapter_directory_named_like_the_base_stops_the_start(files, tmp_path):
    root, tokenizer = files
    shutil.copytree(root / "adapters" / "ad0", tmp_path / "adapters" / BASE)
    with pytest.raises(lorakit.UserError, match="has the base model's name 'base'"):
        Served(tmp_path, tokenizer)


def test_an_unload_while_a_request_reads_the_adapter_leaves_nothing_stuck(served, monkeypatch):
    """The unload lands between a lazy load's file read and its write into the bank."""
    adapters, read = served.adapters, served.adapters.read

    def read_then_unload(name):
        files = read(name)
        adapters.remove(name)  # (the admin route, on another thread, at this very moment)
        return files

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

    def unregister_watched(name):
        seen.append(("ad1" in served.bank, lock_is_free_for_others(served.bank.lock)))
        unregister(name)

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
        wait_until(lambda: served.engine.load == (0, 1))  # ad2 prepared and its request queued
        assert "ad2" in served.bank
        assert served.post("/v1/unload_lora_adapter", {"lora_name": "ad2"}, AUTH).status_code == 200
    asking.join()
    error = assert_error(
        responses[0], 404, "model", "'ad2' does not exist", "unknown adapter 'ad2'"
    )
    assert error["code"] == "model_not_found"


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_after_the_engine_stopped_is_a_503(files, stream):
    served = Served(*files)
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
