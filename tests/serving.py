"""Helpers for the serving tests that run the HTTP app in process: a tiny random Llama with the
tiny ChatML tokenizer, four PEFT adapters on disk (the ``adapter_files`` fixture in conftest),
``Served`` (app + bank + engine + registry), OpenAI error checks and engine/condition waits."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import torch
from fastapi.testclient import TestClient
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

import lorakit
from lorakit.io import save_adapter
from lorakit.serve import AdapterBank, prepare_for_serving
from lorakit.serve.app import ServerSettings, create_app
from lorakit.serve.engine import Engine
from lorakit.serve.registry import AdapterRegistry, ServedAdapters
from lorakit.serve.sampling import SamplingParams
from tests import tiny_models, tiny_tokenizer

LINES = [
    "the quick brown fox jumps over the lazy dog",
    "low rank adapters share one base model",
    "many adapters one server and a batch of requests",
    "hello world this is a tiny tokenizer for tests",
]


PROMPT = [5, 6, 7, 8]  # a prompt of the tiny tokenizer's ids (greedy_model, masked_greedy)


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style (Metaspace) BPE of 96 tokens trained on ``LINES``."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=96, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(LINES * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


TOKEN = "admin-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BASE = "base"


def masked_greedy(
    model, prompt: list[int], masked: set[int], min_tokens: int, steps: int, stops=()
) -> list[int]:
    """vLLM's greedy ``min_tokens`` written out on the full forward in float64: ``masked`` at
    -inf while fewer than ``min_tokens`` tokens were generated; a token in ``stops`` ends the
    output (and is not part of it); at most ``steps`` tokens."""
    ids, out = list(prompt), []
    with torch.no_grad():
        while len(out) < steps:
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            if len(out) < min_tokens:
                logits[list(masked)] = float("-inf")
            token = int(logits.argmax())
            if token in stops:
                break
            ids.append(token)
            out.append(token)
    return out


def base_model(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = tiny_models.llama_config(
        vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id
    )
    return LlamaForCausalLM(config).eval()


def write_adapters(root) -> tuple:
    """Four adapters ad0..ad3 (q_proj, v_proj, r=2) saved under ``root/adapters``; returns
    ``(root, tokenizer)``."""
    tokenizer = tiny_tokenizer.build()
    reference = base_model(tokenizer)
    for index in range(4):
        config = lorakit.LoraConfig(r=2, lora_alpha=4 + index, target_modules=["q_proj", "v_proj"])
        lorakit.inject(reference, config, adapter_name=f"ad{index}")
    tiny_models.randomize_adapters(reference, std=0.3)
    for index in range(4):
        save_adapter(reference, root / "adapters", f"ad{index}")
    return root, tokenizer


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Served:
    """One app over a fresh model, bank (2 slots), engine and registry; ``client`` is live."""

    def __init__(self, root, tokenizer, targets=("q_proj", "v_proj")) -> None:
        self.root, self.tokenizer = root, tokenizer
        model = base_model(tokenizer)
        prepare_for_serving(model, list(targets))
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


def run_in_thread(target, name: str, results: dict) -> threading.Thread:
    """``target()`` in a started daemon thread called ``name``; its value or its exception in
    ``results[name]`` (the race tests hold such threads at hooks, then check both)."""

    def body():
        try:
            results[name] = target()
        except BaseException as error:  # (checked by the test)
            results[name] = error

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    return thread


def wait_until(condition) -> None:
    """Poll a condition another thread will make true (a deadlock guard, not a timing check)."""
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.005)


def completion(**fields) -> dict:
    return {"model": "ad0", "prompt": "hello world", "max_tokens": 3, **fields}


REGISTRY_PROMPT = "hello world"


def served_logprobs(
    served, model: str, count: int = 4, prompt: str = REGISTRY_PROMPT, **extra
) -> list[float]:
    """The log-probabilities of the greedy tokens ``served`` (a ``Served`` server) completes
    ``prompt`` with, asking for adapter (or base) ``model``; ``extra``: more request fields."""
    body = {"model": model, "prompt": prompt, "max_tokens": count, "temperature": 0}
    response = served.post("/v1/completions", {**body, "logprobs": 1, **extra})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["logprobs"]["token_logprobs"]


def fresh_logprobs(
    directory, tokenizer, count: int = 4, prompt: str = REGISTRY_PROMPT
) -> list[float]:
    """Greedy tokens' log-probabilities (float64) of ``load_adapter`` on a plain base model."""
    import warnings

    model = base_model(tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lorakit.load_adapter(model, directory)
    prompt_ids = tokenizer.encode(prompt)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=count, do_sample=False)
        logits = model(out).logits[0].double()
    generated = out[0, len(prompt_ids) :].tolist()
    rows = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
    return [float(row[token]) for row, token in zip(rows, generated, strict=True)]


def randomize_peft_lora(model, seed: int = 1, std: float = 0.3) -> None:
    """Every ``lora_`` parameter of a peft model set to N(0, std^2) draws (non-zero ``B``)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def peft_greedy(oracle, prompt: list[int], adapter: str | None, new_tokens: int) -> list[int]:
    """The ``new_tokens`` token ids peft's greedy ``generate`` gives after ``prompt`` alone, with
    ``adapter`` active (None: every adapter disabled)."""
    ids = torch.tensor([prompt])
    options = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        if adapter is None:
            with oracle.disable_adapter():
                out = oracle.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)
        else:
            oracle.set_adapter(adapter)
            out = oracle.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)
    return out[0, len(prompt) :].tolist()


def engine_events(engine: Engine, jobs: list[tuple[list[int], str | None, int]]) -> list[list]:
    """Each job's events: every ``(prompt, adapter, max_tokens)`` job submitted before the
    engine's loop starts, then the engine run until all have finished."""
    events = [[] for _ in jobs]
    done = threading.Semaphore(0)

    def collector(row: int):
        def on_event(event) -> None:
            events[row].append(event)
            if event.finish_reason is not None:
                done.release()

        return on_event

    for row, (prompt, adapter, new) in enumerate(jobs):  # all queued before the loop starts
        engine.submit(prompt, adapter, SamplingParams(max_tokens=new), collector(row))
    with engine:
        for _ in jobs:
            assert done.acquire(timeout=120)
    return events
