"""Review fixes 33 for ``lorakit serve``'s HTTP layer, on a live uvicorn over 127.0.0.1 started
as the command starts it (``build`` and ``connection_limits(args).uvicorn_options()``), on a tiny
random Llama of 64 positions saved to disk with the tiny ChatML tokenizer:

- a 400 about the prompt or the output length names the field the client sent: ``messages``
  for a chat body (it has no ``prompt``), ``max_completion_tokens`` when that was the length
  field (both used to say ``prompt`` / ``max_tokens``);
- ``--max-header-bytes`` bounds every request head: one sent in a single write used to be parsed
  whatever its size (h11 bounds only a head still incomplete in its buffer)."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from transformers import LlamaForCausalLM

import lorakit
from lorakit.cli import build_parser
from lorakit.commands._serve_options import connection_limits
from lorakit.commands.serve import build
from lorakit.io import save_adapter
from lorakit.serve.prompts import prompt_ids
from lorakit.serve.protocol import APIError, parse_job
from tests import tiny_models, tiny_tokenizer
from tests.serving import free_port, wait_until

pytestmark = pytest.mark.usefixtures("one_torch_thread")

POSITIONS = 64  # the model's; prompts at most 40 tokens, outputs at most 40
HEAD_LIMIT = 16384  # --max-header-bytes' default


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    import uvicorn

    root = tmp_path_factory.mktemp("serve33")
    tokenizer = tiny_tokenizer.build()
    tiny_models.save_llama_with_tokenizer(
        root / "model", tokenizer, max_position_embeddings=POSITIONS
    )
    reference = LlamaForCausalLM.from_pretrained(root / "model").eval()
    config = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    lorakit.inject(reference, config, adapter_name="ad0")
    tiny_models.randomize_adapters(reference, std=0.3)
    save_adapter(reference, root / "adapters", "ad0")
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
            "--max-prompt-tokens",
            "40",
            "--max-tokens-limit",
            "40",
        ]
    )
    options = connection_limits(args).uvicorn_options()
    server = uvicorn.Server(
        uvicorn.Config(build(args), host="127.0.0.1", port=port, log_level="warning", **options)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def chat_error(url: str, words: int, **fields) -> dict:
    """The error object of a chat request whose one user message is ``"hello " * words``
    (16 + 4 * words tokens after the tiny ChatML template); the request must be a 400."""
    messages = [{"role": "user", "content": "hello " * words}]
    body = {"model": "ad0", "messages": messages, **fields}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    return response.json()["error"]


def test_the_output_length_error_names_max_completion_tokens_when_it_was_sent(url):
    # 32 prompt tokens + 40 > 64 positions
    error = chat_error(url, 4, max_completion_tokens=40)
    assert error["param"] == "max_completion_tokens"
    assert error["code"] == "context_length_exceeded"
    assert "+ max_completion_tokens (40) exceeds the model's 64 positions" in error["message"]
    assert "max_tokens (" not in error["message"]
    # the legacy name, in a chat or a completion body, is still the one named
    error = chat_error(url, 4, max_tokens=40)
    assert error["param"] == "max_tokens" and "+ max_tokens (40) exceeds" in error["message"]
    body = {"model": "ad0", "prompt": [5] * 30, "max_tokens": 40}
    response = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "max_tokens"
    # within the positions: answered
    messages = [{"role": "user", "content": "hello " * 4}]
    body = {"model": "ad0", "messages": messages, "max_completion_tokens": 32, "temperature": 0}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == 32


def test_a_chat_prompt_over_the_token_limit_names_messages(url):
    error = chat_error(url, 10, max_completion_tokens=4)  # 56 prompt tokens > 40
    assert error["param"] == "messages" and error["code"] == "context_length_exceeded"
    assert "the prompt has 56 tokens; the limit is 40" in error["message"]
    body = {"model": "ad0", "prompt": [5] * 41, "max_tokens": 4}
    response = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "prompt"


def test_an_empty_chat_prompt_names_messages():
    """A template that renders only the contents makes an empty message an empty prompt."""
    tokenizer = tiny_tokenizer.build()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    body = {"model": "m", "messages": [{"role": "user", "content": ""}]}
    job = parse_job(body, chat=True, max_tokens_limit=16)
    with pytest.raises(APIError, match="the prompt is empty") as caught:
        prompt_ids(job, tokenizer, max_prompt_tokens=40, max_positions=POSITIONS)
    assert caught.value.status == 400 and caught.value.param == "messages"
    job = parse_job({"model": "m", "prompt": ""}, chat=False, max_tokens_limit=16)
    with pytest.raises(APIError, match="the prompt is empty") as caught:
        prompt_ids(job, tokenizer, max_prompt_tokens=40, max_positions=POSITIONS)
    assert caught.value.param == "prompt"


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def head(size: int, path: bytes = b"/health", close: bool = False) -> bytes:
    """A GET request head of exactly ``size`` bytes (an ``X-Pad`` header fills it)."""
    start = b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + (b"Connection: close\r\n" * close)
    filler = size - len(start) - len(b"X-Pad: \r\n\r\n")
    return start + b"X-Pad: " + b"a" * filler + b"\r\n\r\n"


def exchange(url: str, *writes: bytes) -> bytes:
    """Send ``writes`` on one connection (0.2 s apart), then read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port_of(url))) as sock:
        for index, data in enumerate(writes):
            if index:
                time.sleep(0.2)
            sock.sendall(data)
        sock.settimeout(30)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


@pytest.mark.parametrize("halves", [False, True], ids=["one-write", "two-writes"])
def test_a_request_head_over_max_header_bytes_is_a_400(url, halves):
    big = head(100_000)
    writes = (big[:50_000], big[50_000:]) if halves else (big,)
    received = exchange(url, *writes)
    assert received.startswith(b"HTTP/1.1 400"), received[:200]
    assert b"over 16384 bytes" in received  # the same answer however the head arrives
    assert b'"status":"ok"' not in received
    # the limit is the head's size: 16384 bytes pass, 16385 do not
    assert exchange(url, head(HEAD_LIMIT, close=True)).startswith(b"HTTP/1.1 200")
    assert exchange(url, head(HEAD_LIMIT + 1, close=True)).startswith(b"HTTP/1.1 400")
    # the server goes on answering
    assert httpx.get(url + "/health", timeout=60).json()["status"] == "ok"


def test_the_head_limit_counts_each_keep_alive_request_alone(url):
    """Three 10 KB heads on one connection (30 KB in all), apart and pipelined: all answered."""
    heads = [head(10_000), head(10_000), head(10_000, close=True)]
    for writes in (heads, [b"".join(heads)]):
        received = exchange(url, *writes)
        assert received.count(b"HTTP/1.1 200 OK") == 3, received[:300]
        assert received.count(b'"status":"ok"') == 3
    # a pipelined head over the limit after a good request: the good one is answered, then 400
    received = exchange(url, head(200) + head(100_000))
    assert received.startswith(b"HTTP/1.1 200 OK") and received.count(b"HTTP/1.1 200") == 1
    assert b'"status":"ok"' in received and b"}HTTP/1.1 400 Bad Request" in received
    assert b"over 16384 bytes" in received


def test_the_body_is_not_counted_in_the_head(url):
    """A 60 KB body sent with its small head in one write is answered."""
    body = b'{"model": "ad0", "prompt": "hello world", "max_tokens": 2' + b" " * 60_000 + b"}"
    request = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    received = exchange(url, request)
    assert received.startswith(b"HTTP/1.1 200 OK"), received[:300]
    assert b'"completion_tokens":2' in received
