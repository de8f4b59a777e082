"""Limits that keep one client from hurting the others: prompts refused by size before they are
tokenized (and tokenized off the event loop), tiny temperatures, clients that leave, a bounded
waiting queue, and connection timeouts on a real uvicorn.

Most tests run the app in process (``Served`` from tests/serving.py: a tiny random Llama,
four PEFT adapters on disk, ``max_prompt_tokens=40``)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

import lorakit
from lorakit.serve.app import ServerSettings, create_app
from lorakit.serve.connections import ConnectionLimits
from lorakit.serve.engine import Engine
from lorakit.serve.prompts import max_prompt_chars
from tests import serving
from tests.serving import assert_error, completion, free_port

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Limited(serving.Served):
    """``serving.Served`` with an engine whose waiting queue holds ``max_waiting`` at most."""

    def __init__(self, root, tokenizer, *, max_waiting: int | None = None) -> None:
        super().__init__(root, tokenizer)
        self.engine = Engine(
            self.engine.model,
            self.bank,
            tokenizer,
            max_batch=4,
            adapter_loader=self.adapters.read,
            max_waiting=max_waiting,
        )
        settings = ServerSettings(
            model_name=serving.BASE,
            admin_token=serving.TOKEN,
            max_prompt_tokens=40,
            max_tokens_limit=24,
            max_positions=128,
        )
        self.app = create_app(self.engine, self.adapters, tokenizer, settings)
        self.client = TestClient(self.app)


@pytest.fixture
def served(adapter_files):
    served = Limited(*adapter_files, max_waiting=2)
    with served.client:  # runs the lifespan: starts and stops the engine
        yield served


class EncodeWatch:
    """Wraps ``tokenizer.encode``: records each text's length and whether it ran on an event
    loop; ``hold`` (an Event) makes calls wait for ``release`` (bounded: never a hang)."""

    def __init__(self, tokenizer, monkeypatch) -> None:
        self.lengths: list[int] = []
        self.on_event_loop: list[bool] = []
        self.entered, self.release, self.finished = (threading.Event() for _ in range(3))
        self.hold = False
        encode = tokenizer.encode

        def watched(text, *args, **kwargs):
            self.lengths.append(len(text))
            self.on_event_loop.append(_in_event_loop())
            if self.hold:
                self.entered.set()
                self.release.wait(timeout=30)
                self.finished.set()
            return encode(text, *args, **kwargs)

        monkeypatch.setattr(tokenizer, "encode", watched)


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def test_huge_prompts_are_refused_before_they_are_tokenized(served, monkeypatch):
    watch = EncodeWatch(served.tokenizer, monkeypatch)
    bound = max_prompt_chars(40)
    huge = "hello world " * 75_000  # 900 KB
    for index in range(12):
        response = served.post("/v1/completions", completion(prompt=huge[index:]))
        error = assert_error(response, 400, "prompt", "characters", "without tokenizing")
        assert error["code"] == "context_length_exceeded"
        chat = {"model": "ad1", "messages": [{"role": "user", "content": huge}], "stream": True}
        response = served.post("/v1/chat/completions", chat)
        assert_error(response, 400, "messages", "characters")
    assert watch.lengths == []  # never tokenized
    # within the character bound but over 40 tokens: tokenized (bounded), then refused by tokens
    response = served.post("/v1/completions", completion(prompt=huge[: bound - 5]))
    assert_error(response, 400, "prompt", f"tokens; the limit is {40}")
    assert watch.lengths == [bound - 5]
    ok = served.post("/v1/completions", completion(prompt="hello world"))
    assert ok.status_code == 200, ok.text
    assert max(watch.lengths) <= bound and watch.on_event_loop == [False, False]


def test_health_answers_while_a_prompt_is_being_tokenized(served, monkeypatch):
    watch = EncodeWatch(served.tokenizer, monkeypatch)
    watch.hold = True
    answers = []
    asking = threading.Thread(
        target=lambda: answers.append(served.post("/v1/completions", completion()))
    )
    asking.start()
    try:
        assert watch.entered.wait(timeout=30)  # (deadlock guard)
        health = served.client.get("/health")
        encoded_before_health = watch.finished.is_set()
    finally:
        watch.release.set()
        asking.join()
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert not encoded_before_health  # /health answered while encode was still running
    assert answers[0].status_code == 200 and watch.on_event_loop == [False]


@pytest.mark.parametrize("stream", [False, True])
def test_a_tiny_temperature_is_served_as_greedy(served, stream):
    greedy = served.post("/v1/completions", completion(temperature=0, max_tokens=6))
    assert greedy.status_code == 200, greedy.text
    body = completion(temperature=2.8e-309, max_tokens=6, stream=stream)
    tiny = served.post("/v1/completions", body)
    assert tiny.status_code == 200, tiny.text
    if stream:
        assert "[DONE]" in tiny.text and '"error"' not in tiny.text
        pieces = [
            line.removeprefix("data: ")
            for line in tiny.text.splitlines()
            if line.startswith("data: {")
        ]
        import json

        text = "".join(json.loads(p)["choices"][0]["text"] for p in pieces)
    else:
        text = tiny.json()["choices"][0]["text"]
    assert text == greedy.json()["choices"][0]["text"]


def completion_scope(length: int) -> dict:
    """The ASGI scope of ``POST /v1/completions`` with a JSON body of ``length`` bytes."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % length)],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


def post_then_leave(served, body: dict, *, when_generating: threading.Event) -> list[dict]:
    """Call the app as a server would (ASGI), and disconnect once ``when_generating`` is set;
    what the app sent back."""
    raw = json.dumps(body).encode()
    scope = completion_scope(len(raw))
    sent: list[dict] = []

    async def main() -> None:
        gone, body_sent = asyncio.Event(), False

        async def receive() -> dict:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": raw, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        async def leave() -> None:
            assert await asyncio.to_thread(when_generating.wait, 30)  # (deadlock guard)
            gone.set()

        await asyncio.gather(served.app(scope, receive, send), leave())

    asyncio.run(main())
    return sent


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_cancels_its_request(served, monkeypatch, stream):
    """The engine holds the request at its first token until it is cancelled: the disconnect
    must cancel it, and the engine then generates nothing more for it."""
    engine, accepted, generating = served.engine, [], threading.Event()
    accept = engine._accept

    def gated_accept(request, logits, *token):
        accepted.append(request.id)
        if len(accepted) == 1:
            generating.set()
            serving.wait_until(lambda: request.cancelled)  # the client's disconnect did this
            # not the end-of-text token: drawn (about 1 prefill in 300 at temperature 1 here) it
            # ended the request "stop" instead of "cancelled", and the test waited out its guard
            logits = logits.clone()
            logits[list(engine.eos_token_ids)] = float("-inf")
        accept(request, logits, *token)

    monkeypatch.setattr(engine, "_accept", gated_accept)
    before = engine.stats.cancelled
    body = completion(model="ad1", max_tokens=24, stream=stream)
    sent = post_then_leave(served, body, when_generating=generating)
    serving.wait_until(lambda: engine.stats.cancelled == before + 1)  # (else: never cancelled)
    serving.wait_until(lambda: engine.load == (0, 0))
    assert len(accepted) == 1  # one token (the prefill's) of the 24 asked
    if not stream:  # (an answer for nobody: the request ended "cancelled")
        assert sent[0]["status"] == 503
    monkeypatch.undo()
    # its adapter slot was released: unloading ad1 is not refused as "in use"
    unload = served.post("/v1/unload_lora_adapter", {"lora_name": "ad1"}, serving.AUTH)
    assert unload.status_code == 200, unload.text
    assert served.client.get("/health").json()["cancelled_requests"] == before + 1


def test_a_full_waiting_queue_is_a_429_with_retry_after(served):
    answers = []

    def ask() -> None:
        answers.append(served.post("/v1/completions", completion()))

    with serving.engine_held(served.engine):  # the engine thread is busy: requests queue up
        askers = [threading.Thread(target=ask) for _ in range(2)]
        for asker in askers:
            asker.start()
        serving.wait_until(
            lambda: served.engine.load == (1, 2)
        )  # held one running; max_waiting=2: full
        response = served.post("/v1/completions", completion(stream=True))
        error = assert_error(response, 429, None, "2 requests are already waiting", "retry")
        assert error["type"] == "server_busy" and error["code"] == "queue_full"
        assert response.headers["retry-after"] == "1"
    for asker in askers:
        asker.join()
    assert [a.status_code for a in answers] == [200, 200]  # the queued ones were served
    assert served.post("/v1/completions", completion()).status_code == 200


def test_cancelled_requests_leave_a_full_queue_at_once(served):
    """Requests whose clients left do not hold places in the queue while the batch is busy."""
    from lorakit.serve.sampling import SamplingParams

    events = []
    with serving.engine_held(served.engine):
        handles = [
            served.engine.submit([5, 6], "ad0", SamplingParams(max_tokens=2), events.append)
            for _ in range(2)
        ]
        for handle in handles:
            handle.cancel()
        # the queue holds two cancelled requests: they do not count against max_waiting=2
        assert served.engine.load == (1, 2)  # (the held request counts as running)
        third = served.engine.submit([5, 6], "ad0", SamplingParams(max_tokens=2), events.append)
    serving.wait_until(lambda: len([e for e in events if e.finish_reason]) == 3)
    assert sorted(e.finish_reason for e in events if e.finish_reason) == [
        "cancelled",
        "cancelled",
        "length",
    ]
    assert third is not None


@pytest.fixture(scope="module")
def limited_server():
    """A real uvicorn on 127.0.0.1 with 1-second keep-alive and request timeouts, serving a
    two-route app (GET /, POST /echo that reads its body)."""
    import uvicorn

    app = FastAPI()

    @app.get("/")
    async def root() -> dict:
        return {"ok": True}

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"bytes": len(await request.body())}

    limits = ConnectionLimits(timeout_keep_alive=1, timeout_request=1, max_header_bytes=4096)
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", **limits.uvicorn_options()
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    serving.wait_until(lambda: server.started)
    yield port
    server.should_exit = True
    thread.join(timeout=10)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a socket.timeout after 10
    s fails the test: the server never closed it)."""
    sock.settimeout(10)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


@pytest.mark.parametrize(
    "sent",
    [
        b"",  # connects and says nothing
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Le",  # half a request head
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789",  # half a body
    ],
)
def test_a_connection_without_a_whole_request_is_closed(limited_server, sent):
    with socket.create_connection(("127.0.0.1", limited_server)) as sock:
        sock.sendall(sent)
        assert read_until_closed(sock) == b""  # closed, nothing answered


def test_an_idle_keep_alive_connection_is_closed_after_its_answer(limited_server):
    with socket.create_connection(("127.0.0.1", limited_server)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        received = read_until_closed(sock)  # answered, then closed once idle for 1 s
    assert received.startswith(b"HTTP/1.1 200 OK") and received.endswith(b'{"ok":true}')


def test_an_unfinished_request_head_over_the_limit_is_a_400(limited_server):
    """h11 bounds the buffer of a head still incomplete (4096 bytes here): a client dripping
    an endless header is answered 400 and closed, without waiting for the timeout."""
    with socket.create_connection(("127.0.0.1", limited_server)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000)
        assert read_until_closed(sock).startswith(b"HTTP/1.1 400")


def test_connection_limits_are_checked():
    with pytest.raises(ValueError, match="timeout_request must be > 0"):
        ConnectionLimits(timeout_request=0)
    with pytest.raises(ValueError, match="backlog must be >= 1"):
        ConnectionLimits(backlog=0)
    options = ConnectionLimits(timeout_request=7).uvicorn_options()
    assert options["http"].timeout_request == 7 and options["limit_concurrency"] is None
    assert options["http"].max_connections == 512


def test_a_client_leaving_mid_body_is_not_an_internal_error(served, caplog):
    """The request timeout closes a connection whose body is still coming; the app then reads
    a disconnect instead of the rest of the body: quietly dropped, not logged as a crash."""
    scope = completion_scope(100)
    messages = [
        {"type": "http.request", "body": b'{"model": "ad0", ', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(served.app(scope, receive, send))
    assert [r for r in caplog.records if r.levelname == "ERROR"] == []
    assert sent[0]["status"] == 499


def serve_args(*extra: str):
    from lorakit.cli import build_parser

    return build_parser().parse_args(["serve", "--adapters", "adapters", "--model", "m", *extra])


def test_the_admin_token_comes_from_a_file_the_environment_or_argv(tmp_path, capsys):
    from lorakit.commands.serve import server_settings

    environ = {"LORAKIT_ADMIN_TOKEN": "from-env\n"}
    assert server_settings(serve_args(), 96, environ).admin_token == "from-env"
    assert server_settings(serve_args(), 96, {}).admin_token is None  # admin routes disabled
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    settings = server_settings(serve_args("--admin-token-file", str(token_file)), 96, environ)
    assert settings.admin_token == "from-file" and settings.max_prompt_tokens == 95
    assert "warning" not in capsys.readouterr().err
    settings = server_settings(serve_args("--admin-token", "from-argv"), 96, environ)
    assert settings.admin_token == "from-argv"
    assert "visible to other users (ps)" in capsys.readouterr().err
    token_file.write_text("  \n")
    with pytest.raises(lorakit.UserError, match="is empty"):
        server_settings(serve_args("--admin-token-file", str(token_file)), 96, {})
    with pytest.raises(lorakit.UserError, match="missing"):
        server_settings(serve_args("--admin-token-file", str(tmp_path / "missing")), 96, {})
    both = serve_args("--admin-token-file", str(token_file), "--admin-token", "x")
    with pytest.raises(lorakit.UserError, match="not both"):
        server_settings(both, 96, {})


def test_serve_hands_its_connection_limits_to_uvicorn(monkeypatch):
    import uvicorn

    from lorakit.commands import serve as serve_command
    from lorakit.commands._serve_options import connection_limits
    from lorakit.serve.connections import RequestTimeoutProtocol

    assert connection_limits(serve_args()) == ConnectionLimits()  # same defaults
    runs = []
    monkeypatch.setattr(serve_command, "build", lambda args: "the app")
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: runs.append(options))
    args = serve_args("--timeout-request", "3", "--timeout-keep-alive", "2", "--backlog", "64")
    assert args.func(args) == 0
    options = runs[0]
    assert issubclass(options["http"], RequestTimeoutProtocol)
    assert options["http"].timeout_request == 3.0 and options["timeout_keep_alive"] == 2.0
    assert options["backlog"] == 64 and options["limit_concurrency"] is None
    assert options["http"].max_connections == 512
    assert options["h11_max_incomplete_event_size"] == 16384
    with pytest.raises(lorakit.UserError, match="--timeout-request: timeout_request must be > 0"):
        connection_limits(serve_args("--timeout-request", "0"))


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--max-waiting", "0", "--max-waiting must be >= 1, got 0"),
        ("--max-loras", "0", "--max-loras must be >= 1, got 0"),
        ("--max-batch", "0", "--max-batch must be >= 1, got 0"),  # every request hung
        ("--max-prompt-tokens", "0", "--max-prompt-tokens must be >= 1"),  # every one refused
        ("--max-tokens-limit", "-1", "--max-tokens-limit must be >= 1, got -1"),
        ("--max-adapters", "0", "--max-adapters must be >= 1"),  # silently became 8
        ("--max-rank", "0", "--max-rank must be >= 1"),
        ("--port", "70000", "--port must be in 0-65535, got 70000"),  # was a traceback
    ],
)
def test_serve_numbers_out_of_range_are_user_errors(tmp_path, capsys, option, value, message):
    from lorakit.cli import main

    args = ["serve", "--model", str(tmp_path), "--adapters", str(tmp_path), option, value]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def _post_body(served, scope: dict, chunks: list[bytes]) -> tuple[list[dict], int]:
    """Call the app with ``chunks`` as the body; (messages sent, chunks the app read)."""
    pending = [
        {"type": "http.request", "body": chunk, "more_body": index < len(chunks) - 1}
        for index, chunk in enumerate(chunks)
    ]
    read, sent = [0], []

    async def receive() -> dict:
        if not pending:
            return {"type": "http.disconnect"}
        read[0] += 1
        return pending.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(served.app(scope, receive, send))
    return sent, read[0]


def test_a_body_over_the_limit_is_refused_before_it_is_held_in_memory(served):
    """The 1 MiB limit is checked from Content-Length before anything is read, and on a chunked
    body as soon as the bytes received pass it (it used to read the whole body first: a 400 MiB
    body took 800 MB of memory before its 413)."""
    limit = 1 << 20
    megabyte = b"x" * (1 << 20)
    sent, read = _post_body(served, completion_scope(400 * limit), [megabyte] * 400)
    assert sent[0]["status"] == 413 and read == 0
    assert b"419430400 bytes exceeds the limit of 1048576" in sent[1]["body"]
    chunked = completion_scope(0)
    chunked["headers"] = [(b"content-type", b"application/json")]  # no Content-Length
    sent, read = _post_body(served, chunked, [megabyte[:300_000]] * 400)
    assert sent[0]["status"] == 413 and read == 4  # 1.2 MB read, not 120 MB
    assert b"more than 1200000 bytes" in sent[1]["body"]


def test_an_unset_max_tokens_takes_openais_default_within_the_servers_limits(served, monkeypatch):
    """Unset, max_tokens is 16 for completions and the rest of the context for chat, within the
    server's limit (24 here) and the positions the prompt leaves (128 here): never a 400 that
    blames a field the client did not send."""
    submitted = []
    submit = served.engine.submit

    def record(prompt_ids, adapter, params, on_event):
        submitted.append((len(prompt_ids), params.max_tokens))
        return submit(prompt_ids, adapter, params, on_event)

    monkeypatch.setattr(served.engine, "submit", record)
    body = {"model": "ad0", "prompt": "hello world"}
    assert served.post("/v1/completions", body).status_code == 200
    chat = {"model": "ad0", "messages": [{"role": "user", "content": "hello"}]}
    assert served.post("/v1/chat/completions", chat).status_code == 200
    long_prompt = list(range(5, 5 + 40))  # 40 token ids: the limit; 88 positions left
    assert served.post("/v1/completions", {**body, "prompt": long_prompt}).status_code == 200
    assert [tokens for _, tokens in submitted] == [16, 24, 16]
    # the room a prompt leaves shortens the default, never a given max_tokens
    from lorakit.serve import protocol
    from lorakit.serve.prompts import fit_max_tokens, prompt_ids

    unset = protocol.parse_job({"model": "ad0", "prompt": "x"}, chat=False, max_tokens_limit=24)
    given = protocol.parse_job(
        {"model": "ad0", "prompt": "x", "max_tokens": 16}, chat=False, max_tokens_limit=24
    )
    assert fit_max_tokens(unset, 120, 128).params.max_tokens == 8
    assert fit_max_tokens(given, 120, 128).params.max_tokens == 16
    ids = list(range(5, 125))
    for job, fits in ((unset, True), (given, False)):
        job = protocol.CompletionJob(job.model, ids, job.params, False, False, job.max_tokens_given)
        if fits:
            assert prompt_ids(job, served.tokenizer, max_prompt_tokens=200, max_positions=128)
        else:
            with pytest.raises(
                protocol.APIError, match=r"max_tokens \(16\) exceeds the model's 128"
            ):
                prompt_ids(job, served.tokenizer, max_prompt_tokens=200, max_positions=128)


def test_a_non_ascii_admin_token_matches_the_bytes_a_client_sends():
    """HTTP clients send a header's UTF-8 bytes; Starlette decodes them as Latin-1."""
    from starlette.requests import Request

    from lorakit.serve.admin_routes import _check_admin
    from lorakit.serve.protocol import APIError

    settings = ServerSettings(model_name="base", admin_token="sécret-ü")

    def request(raw: bytes) -> Request:
        return Request({"type": "http", "headers": [(b"authorization", raw)]})

    _check_admin(request("Bearer sécret-ü".encode()), settings)  # accepted
    for wrong in ("Bearer sécret-ü".encode("latin-1"), b"Bearer secret-u"):
        with pytest.raises(APIError, match="wrong admin token"):
            _check_admin(request(wrong), settings)


def test_chat_content_as_openai_text_parts_is_the_joined_text(served):
    def chat(content):
        body = {"model": "ad0", "messages": [{"role": "user", "content": content}]}
        return served.post("/v1/chat/completions", {**body, "max_tokens": 4, "temperature": 0})

    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]
    joined = chat("hello\nworld")
    assert joined.status_code == 200
    as_parts = chat(parts)
    assert as_parts.status_code == 200
    text = as_parts.json()["choices"][0]["message"]["content"]
    assert text == joined.json()["choices"][0]["message"]["content"]
    image = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    assert_error(chat(image), 400, "messages[0].content", "only text parts")
    assert_error(chat(None), 400, "messages[0].content", "a string or a list of text parts")


def test_a_bad_prompt_loads_no_adapter(served):
    """The prompt is checked before the adapter is loaded: a refused request used to load its
    adapter into the bank first, evicting another."""
    assert "ad1" not in served.bank
    too_long = list(range(5, 5 + 41))  # over max_prompt_tokens = 40
    response = served.post("/v1/completions", completion(model="ad1", prompt=too_long))
    assert_error(response, 400, "prompt", "tokens; the limit is 40")
    assert "ad1" not in served.bank
    assert served.post("/v1/completions", completion(model="ad1")).status_code == 200
    assert "ad1" in served.bank


def test_a_wrong_method_is_an_openai_error_with_its_allow_header(served):
    response = served.client.get("/v1/completions")
    error = assert_error(response, 405, None, "Method Not Allowed")
    assert error["code"] == "405" and response.headers["allow"] == "POST"
