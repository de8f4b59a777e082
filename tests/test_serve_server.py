"""The HTTP server end to end: a live uvicorn on 127.0.0.1 driven by the official ``openai``
client (and httpx for errors and admin routes), on a tiny random Llama with its own tokenizer
and 16 PEFT-format adapters. Outputs are compared with each request generated alone by
transformers' ``generate`` on a model holding the same adapter."""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import socket
import threading
import time
import weakref

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import lorakit
from lorakit.cli import build_parser
from lorakit.commands.serve import build
from lorakit.io import save_adapter
from lorakit.serve import registry as registry_module
from tests import tiny_models
from tests.serving import LINES, metaspace_tokenizer

TOKEN = "s3cret-admin"
# Six adapter slots: 2 layers x sum(d + k) over the 7 linears (928) x max rank 6 x 4 bytes, plus
# a float32 scaling per layer and slot: 44,600 bytes a slot.
BUDGET = 6 * 44_600 + 1_000
TARGETS = [
    ["q_proj", "v_proj"],
    ["k_proj", "o_proj", "up_proj"],
    ["gate_proj", "down_proj", "q_proj"],
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import uvicorn

    root = tmp_path_factory.mktemp("serve")
    tokenizer = metaspace_tokenizer()
    base = tiny_models.save_llama_with_tokenizer(
        root / "model", tokenizer, max_position_embeddings=96, bos_token_id=tokenizer.bos_token_id
    )
    reference = LlamaForCausalLM.from_pretrained(root / "model").eval()
    for index in range(16):
        spec = dict(r=2 + index % 3 * 2, lora_alpha=4 + index, target_modules=TARGETS[index % 3])
        lorakit.inject(reference, lorakit.LoraConfig(**spec), adapter_name=f"ad{index}")
    tiny_models.randomize_adapters(reference, std=0.4)
    for index in range(16):
        save_adapter(reference, root / "adapters", f"ad{index}")  # -> adapters/ad<i>
    save_adapter(reference, root / "spare", "ad3")  # outside the adapter directory
    alien = LlamaForCausalLM(base.config).eval()  # same shapes, other weights (seed moved on)
    lorakit.inject(alien, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="alien")
    save_adapter(alien, root / "spare", "alien")
    port = free_port()
    args = build_parser().parse_args(
        [
            "serve",
            "--model",
            str(root / "model"),
            "--adapters",
            str(root / "adapters"),
            "--port",
            str(port),
            "--admin-token",
            TOKEN,
            "--adapter-memory",
            str(BUDGET),
            "--max-prompt-tokens",
            "40",
            "--max-tokens-limit",
            "24",
            "--max-batch",
            "24",
        ]
    )
    server = uvicorn.Server(
        uvicorn.Config(build(args), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    yield {
        "root": root,
        "url": f"http://127.0.0.1:{port}",
        "reference": reference,
        "tokenizer": tokenizer,
    }
    server.should_exit = True
    thread.join(timeout=10)


def expected_text(world, prompt: str, adapter: str | None, max_tokens: int) -> str:
    """transformers' greedy text after the prompt: ``decode(prompt + new)`` past the decoded
    prompt, as its ``TextGenerationPipeline(return_full_text=False)`` and vLLM give it (the
    new ids decoded alone lose a SentencePiece first token's leading space)."""
    reference, tokenizer = world["reference"], world["tokenizer"]
    ids = torch.tensor([tokenizer.encode(prompt)])
    names = [] if adapter is None else [adapter]
    with torch.no_grad(), lorakit.use_adapters(reference, names):
        out = reference.generate(ids, max_new_tokens=max_tokens, do_sample=False)
    prompt_text = tokenizer.decode(ids[0], skip_special_tokens=True)
    full = tokenizer.decode(out[0], skip_special_tokens=True)
    assert full.startswith(prompt_text)
    return full[len(prompt_text) :]


def client(world) -> openai.OpenAI:
    return openai.OpenAI(base_url=world["url"] + "/v1", api_key="unused", max_retries=0)


def test_models_lists_the_base_and_every_adapter(world):
    ids = [m.id for m in client(world).models.list().data]
    assert ids[0] == "model" and sorted(ids[1:]) == sorted(f"ad{i}" for i in range(16))


def test_completion_and_chat_match_generate_alone(world):
    api = client(world)
    for adapter in ["ad1", "ad5", None]:
        model = adapter or "model"
        got = api.completions.create(
            model=model, prompt="the quick brown", max_tokens=8, temperature=0
        )
        assert got.choices[0].text == expected_text(world, "the quick brown", adapter, 8)
        assert got.usage.prompt_tokens == len(world["tokenizer"].encode("the quick brown"))
    chat = api.chat.completions.create(
        model="ad2",
        messages=[{"role": "user", "content": "hello world"}],
        max_tokens=6,
        temperature=0,
    )
    prompt = "user: hello world\nassistant:"
    assert chat.choices[0].message.content == expected_text(world, prompt, "ad2", 6)


@pytest.mark.slow
def test_64_concurrent_streams_over_16_adapters(world, monkeypatch):
    prompts = [(LINES[i % 4][: 10 + i % 17], f"ad{i % 16}", 4 + i % 5) for i in range(64)]
    read_tensors = []  # weak references to every tensor read from an adapter file

    read_real = registry_module.read_adapter_data

    def read_watched(header):
        adapter = read_real(header)
        read_tensors.extend(weakref.ref(tensor) for tensor in adapter.tensors.values())
        return adapter

    monkeypatch.setattr(registry_module, "read_adapter_data", read_watched)
    before = httpx.get(world["url"] + "/health").json()

    async def one(api, prompt, adapter, max_tokens):
        stream = await api.completions.create(
            model=adapter, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
        )
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def main():
        api = openai.AsyncOpenAI(
            base_url=world["url"] + "/v1", api_key="unused", max_retries=0, timeout=120
        )
        return await asyncio.gather(*(one(api, *p) for p in prompts))

    texts = asyncio.run(main())
    for (prompt, adapter, max_tokens), text in zip(prompts, texts, strict=True):
        assert text == expected_text(world, prompt, adapter, max_tokens), (prompt, adapter)
    assert len(set(texts)) > 16  # different adapters give different outputs
    health = httpx.get(world["url"] + "/health").json()
    # the budget holds 6 adapters of the largest rank (6), more of ranks 2 and 4 (paged)
    capacity = health["adapter_capacity"]
    assert health["adapters_loaded"] <= capacity and 6 < capacity < 16
    assert 0 < health["adapter_resident_bytes"] <= health["adapter_memory_bytes"] <= BUDGET
    # 16 adapters through fewer slots: the others had to be evicted to make room
    assert health["adapter_evictions"] - before["adapter_evictions"] >= 16 - capacity
    assert health["max_running_batch"] > 1 and health["joined_running_batch"] > 0
    # the adapters live only in the bank's fixed stacks: no tensor read from a file survives
    gc.collect()
    assert len(read_tensors) >= 10 * 4  # >= 10 reads of >= 2 layers x (A, B)
    assert [ref for ref in read_tensors if ref() is not None] == []


def test_chat_stream_is_openai_sse_ending_with_done(world):
    body = {
        "model": "ad4",
        "messages": [{"role": "user", "content": "low rank"}],
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", world["url"] + "/v1/chat/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == expected_text(world, "user: low rank\nassistant:", "ad4", 5)


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/completions", b"{not json", 400),
        ("/v1/completions", b"[1, 2]", 400),
        ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404),
        ("/v1/completions", {"model": "../ad1", "prompt": "hi"}, 404),
        ("/v1/completions", {"model": "ad1"}, 400),
        ("/v1/completions", {"model": "ad1", "prompt": "hi", "max_tokens": 25}, 400),
        ("/v1/completions", {"model": "ad1", "prompt": "hi", "max_tokens": "many"}, 400),
        ("/v1/completions", {"model": "ad1", "prompt": "hi", "temperature": -1}, 400),
        ("/v1/completions", {"model": "ad1", "prompt": " ".join(LINES * 3)}, 400),  # as OpenAI
        ("/v1/completions", {"model": "ad1", "prompt": [10**6]}, 400),
        ("/v1/chat/completions", {"model": "ad1", "messages": "hi"}, 400),
        ("/v1/completions", {"model": "ad1", "prompt": "hi", "logprobs": 21}, 400),
        ("/v1/chat/completions", {"model": "ad1", "messages": [], "top_logprobs": 2}, 400),
        ("/v1/completions", {"model": "ad1", "prompt": "hi", "echo": True}, 400),
        ("/v1/completions", {"model": "ad1", "prompt": "hi", "presence_penalty": 0.5}, 400),
        ("/v1/completions", {"model": "ad1", "prompt": "hi", "logit_bias": {"5": 9}}, 400),
        ("/v1/completions", {"model": "ad1", "prompt": "hi", "stream_options": {}}, 400),
        ("/v1/nowhere", {}, 404),
    ],
)
def test_bad_requests_get_openai_errors(world, path, body, status):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(world["url"] + path, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_unimplemented_fields_are_refused_by_name_unless_they_ask_for_nothing(world):
    api = client(world)
    with pytest.raises(openai.BadRequestError) as refused:
        api.completions.create(model="ad1", prompt="hi", echo=True)
    assert refused.value.body["param"] == "echo"
    assert refused.value.body["code"] == "unsupported_parameter"
    neutral = dict(
        echo=False, presence_penalty=0, frequency_penalty=0.0, logit_bias={}, temperature=0
    )
    got = api.completions.create(model="ad1", prompt="the quick brown", max_tokens=4, **neutral)
    assert got.choices[0].text == expected_text(world, "the quick brown", "ad1", 4)


def joined_as_decoded(tokens: list[str], ids: list[int], tokenizer) -> bool:
    """The tokens' texts, joined, are the decoded ids (a decoder drops the leading space of a
    whole text, which a token's own text keeps)."""
    decoded = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return "".join(tokens).lstrip() == decoded.lstrip() and len(tokens) == len(ids)


def reference_logprobs(world, prompt: str, adapter: str, count: int):
    """(the ``count`` greedy token ids, log_softmax of the logits before each (float64)) of the
    reference model with ``adapter``, as ``expected_text`` generates them."""
    reference, prompt_ids = world["reference"], world["tokenizer"].encode(prompt)
    with torch.no_grad(), lorakit.use_adapters(reference, [adapter]):
        out = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=count, do_sample=False)
        logits = reference(out).logits[0].double()
    generated = out[0, len(prompt_ids) :].tolist()
    before = logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(generated)]
    if generated[-1] == world["tokenizer"].eos_token_id:  # ends the answer, not a token of it
        generated, before = generated[:-1], before[:-1]
    return generated, torch.log_softmax(before, dim=-1)


def test_logprobs_are_the_models_log_probabilities_of_each_token(world):
    """Completions (``logprobs: n``) and chat (``logprobs: true, top_logprobs: n``), whole and
    streamed, against log_softmax of the reference model's logits."""
    api, tokenizer = client(world), world["tokenizer"]
    got = api.completions.create(
        model="ad1", prompt="the quick brown", max_tokens=5, temperature=0, logprobs=3
    )
    logprobs = got.choices[0].logprobs
    generated, expected = reference_logprobs(world, "the quick brown", "ad1", 5)
    assert joined_as_decoded(logprobs.tokens, generated, tokenizer)
    for row, token, logprob, top in zip(
        expected, generated, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert abs(logprob - float(row[token])) < 1e-4
        best = torch.topk(row, 3)
        assert len(top) == 3 and all(
            joined_as_decoded([t], [i], tokenizer)
            for t, i in zip(top, best.indices.tolist(), strict=True)
        )
        assert max(top.values()) == pytest.approx(float(best.values[0]), abs=1e-4)
    offsets = [0] + [len("".join(logprobs.tokens[: i + 1])) for i in range(4)]
    assert logprobs.text_offset == offsets
    stream = api.chat.completions.create(
        model="ad2",
        messages=[{"role": "user", "content": "hello world"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
    )
    content = [
        item
        for c in stream
        if c.choices and c.choices[0].logprobs
        for item in c.choices[0].logprobs.content
    ]
    generated, expected = reference_logprobs(world, "user: hello world\nassistant:", "ad2", 4)
    assert joined_as_decoded([item.token for item in content], generated, tokenizer)
    for row, token, item in zip(expected, generated, content, strict=True):
        assert abs(item.logprob - float(row[token])) < 1e-4
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].token == item.token
        assert bytes(item.bytes).decode() == item.token


def test_a_stream_with_include_usage_ends_with_the_usage_chunk(world):
    stream = client(world).chat.completions.create(
        model="ad3",
        messages=[{"role": "user", "content": "low rank"}],
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == expected_text(world, "user: low rank\nassistant:", "ad3", 5)
    prompt_tokens = len(world["tokenizer"].encode("user: low rank\nassistant:"))
    assert chunks[-1].usage.prompt_tokens == prompt_tokens
    assert chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].usage.total_tokens == prompt_tokens + 5


def test_openai_client_sees_not_found(world):
    with pytest.raises(openai.NotFoundError):
        client(world).completions.create(model="missing", prompt="hi", max_tokens=2)


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        ({"lora_name": "x", "lora_path": "ad1"}, {}, 401),
        ({"lora_name": "x", "lora_path": "ad1"}, {"Authorization": "Bearer wrong"}, 401),
        ({"lora_name": "x", "lora_path": "../spare/ad3"}, None, 400),
        ({"lora_name": "x", "lora_path": "/etc"}, None, 400),
        ({"lora_name": "../x"}, None, 400),
        ({"lora_name": "x", "lora_path": "escape"}, None, 400),  # a symlink out of the directory
        ({"lora_name": "ad1", "lora_path": "ad1"}, None, 400),  # already loaded
        ({"lora_path": "ad1"}, None, 400),
    ],
)
def test_admin_load_is_guarded(world, body, headers, status):
    link = world["root"] / "adapters" / "escape"
    if not link.exists():
        link.symlink_to(world["root"] / "spare" / "ad3")
    headers = {"Authorization": f"Bearer {TOKEN}"} if headers is None else headers
    response = httpx.post(world["url"] + "/v1/load_lora_adapter", json=body, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]
    if body == {"lora_name": "ad1", "lora_path": "ad1"}:  # the name is the offending field
        assert response.json()["error"]["param"] == "lora_name"


def test_runtime_load_and_unload(world):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    shutil.copytree(world["root"] / "spare" / "ad3", world["root"] / "adapters" / "late" / "copy")
    response = httpx.post(
        world["url"] + "/v1/load_lora_adapter",
        json={"lora_name": "fresh", "lora_path": "late/copy"},
        headers=auth,
    )
    assert response.status_code == 200, response.text
    assert "fresh" in [m.id for m in client(world).models.list().data]
    got = client(world).completions.create(
        model="fresh", prompt="hello world", max_tokens=6, temperature=0
    )
    assert got.choices[0].text == expected_text(
        world, "hello world", "ad3", 6
    )  # the same tensors as ad3
    response = httpx.post(
        world["url"] + "/v1/unload_lora_adapter", json={"lora_name": "fresh"}, headers=auth
    )
    assert response.status_code == 200
    assert (
        httpx.post(
            world["url"] + "/v1/unload_lora_adapter", json={"lora_name": "fresh"}, headers=auth
        ).status_code
        == 404
    )
    assert (
        httpx.post(
            world["url"] + "/v1/completions", json={"model": "fresh", "prompt": "hi"}
        ).status_code
        == 404
    )
    assert httpx.get(world["url"] + "/health").json()["status"] == "ok"


def test_cli_sizes_and_user_errors(tmp_path):
    from lorakit.cli import main
    from lorakit.commands._serve_options import parse_size

    assert parse_size("256MB") == 256_000_000 and parse_size("1GiB") == 1024**3
    assert parse_size("1000") == 1000
    with pytest.raises(lorakit.UserError, match="not a size"):
        parse_size("lots")
    missing = str(tmp_path / "missing")
    assert main(["serve", "--model", str(tmp_path), "--adapters", missing]) == 2


def test_an_adapter_of_another_base_is_refused(world):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    shutil.copytree(world["root"] / "spare" / "alien", world["root"] / "adapters" / "late-alien")
    body = {"lora_name": "alien", "lora_path": "late-alien"}
    response = httpx.post(world["url"] + "/v1/load_lora_adapter", json=body, headers=auth)
    assert response.status_code == 400
    assert "different base weights" in response.json()["error"]["message"]
    assert "alien" not in [m.id for m in client(world).models.list().data]


def test_an_adapter_with_nan_weights_is_refused(world):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    target = world["root"] / "adapters" / "late-nan"
    shutil.copytree(world["root"] / "spare" / "ad3", target)
    tensors = load_file(target / "adapter_model.safetensors")
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, target / "adapter_model.safetensors")  # (drops lorakit's metadata)
    body = {"lora_name": "nan", "lora_path": "late-nan"}
    response = httpx.post(world["url"] + "/v1/load_lora_adapter", json=body, headers=auth)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert f"tensor {key} holds inf/NaN" in message
    assert "nan" not in [m.id for m in client(world).models.list().data]


def test_serve_listens_on_loopback_unless_told_otherwise(monkeypatch, tmp_path, capsys):
    import uvicorn

    from lorakit.commands import serve as serve_command

    listened = []
    monkeypatch.setattr(serve_command, "build", lambda args: "the app")
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: listened.append((app, options)))
    args = build_parser().parse_args(["serve", "--adapters", str(tmp_path)])
    assert args.host == "127.0.0.1"
    assert args.func(args) == 0
    assert listened[0][0] == "the app" and listened[0][1]["host"] == "127.0.0.1"
    assert "warning" not in capsys.readouterr().out
    args = build_parser().parse_args(["serve", "--adapters", str(tmp_path), "--host", "0.0.0.0"])
    assert args.func(args) == 0 and listened[1][1]["host"] == "0.0.0.0"
    assert "reachable from other machines" in capsys.readouterr().out


@pytest.mark.integration
def test_a_token_piece_holds_its_exact_bytes():
    """A character split across byte-level tokens: each token's bytes are its share of the
    UTF-8 ('€' is e2 82 ac), where decoding the token alone gives U+FFFD (ef bf bd)."""
    from lorakit.models import load_tokenizer, resolve_model
    from lorakit.serve.token_pieces import token_piece

    smollm2 = load_tokenizer(resolve_model("smollm2-135m-instruct"))
    ids = smollm2.encode(" quick 5€ ok", add_special_tokens=False)
    pieces = [token_piece(smollm2, i) for i in ids]
    assert b"".join(data for _, data in pieces).decode() == " quick 5€ ok"
    assert pieces[0][0] == " quick"


def test_a_sentencepiece_token_keeps_its_space_and_a_byte_token_its_byte(world):
    """'▁fo' is ' fo' (decoding it alone drops the space); '<0xE2>' is the byte e2."""
    from lorakit.serve.token_pieces import token_piece

    tokenizer = world["tokenizer"]
    spaced = next(
        token for token in tokenizer.get_vocab() if token.startswith("\u2581") and len(token) > 1
    )
    token_id = tokenizer.convert_tokens_to_ids(spaced)
    assert token_piece(tokenizer, token_id) == (" " + spaced[1:], (" " + spaced[1:]).encode())
    assert not tokenizer.decode([token_id]).startswith(" ")  # (what logprobs sent before)

    class ByteFallback:
        backend_tokenizer = None

        def convert_ids_to_tokens(self, token_id):
            return "<0xE2>"

    assert token_piece(ByteFallback(), 7) == ("\ufffd", b"\xe2")
