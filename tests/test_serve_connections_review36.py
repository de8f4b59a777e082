"""``lorakit serve --max-connections N`` on a real uvicorn, with real sockets (review 36).

The server is started the way the command starts it: ``lorakit.cli.main(["serve", ...])`` down
to ``uvicorn.run``, which is swapped for a ``uvicorn.Server`` built from the very options the
command passes (so the test can stop it), serving the real app of ``tests.serving.Served``.
The oracle is the documented contract: N open keep-alive connections are all served (200),
also when each asks again at once; a request on an (N+1)th connection gets uvicorn's plain-text
503 and that connection is closed, while the N older ones go on being served. Before the fix
uvicorn got ``limit_concurrency = N``, whose check ``len(connections) >= N`` refused every
request on every connection once N were open (so ``--max-connections 1`` served nothing).
"""

from __future__ import annotations

import contextlib
import json
import socket

import pytest

from tests import serving
from tests.serving import free_port

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
_BODY = json.dumps(
    {"model": "ad0", "prompt": "hello world", "max_tokens": 2, "temperature": 0}
).encode()
COMPLETION = (
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n" % len(_BODY) + _BODY
)


@contextlib.contextmanager
def cli_server(monkeypatch, adapter_files, *options: str):
    """``lorakit serve --port P *options`` in a thread, serving a fresh ``Served`` app; yields
    ``(port, server)`` once uvicorn listens (``server.server_state.connections``: the
    connections uvicorn holds open)."""
    import uvicorn

    from lorakit.cli import main
    from lorakit.commands import serve as serve_command

    root, tokenizer = adapter_files
    app = serving.Served(root, tokenizer).app
    started: dict = {}

    def run_server(app, **kwargs) -> None:
        kwargs["log_level"] = "warning"  # (the command's "info": uvicorn's access log)
        started["server"] = uvicorn.Server(uvicorn.Config(app, **kwargs))
        started["server"].run()

    monkeypatch.setattr(serve_command, "build", lambda args: app)
    monkeypatch.setattr(serve_command, "_freeze_start_up_objects", lambda: None)
    monkeypatch.setattr(uvicorn, "run", run_server)
    port = free_port()
    argv = ["serve", "--model", "m", "--adapters", str(root / "adapters"), "--port", str(port)]
    argv += ["--timeout-keep-alive", "60", *options]
    results: dict = {}
    thread = serving.run_in_thread(lambda: main(argv), "lorakit serve", results)
    serving.wait_until(lambda: "server" in started and started["server"].started)
    try:
        yield port, started["server"]
    finally:
        started["server"].should_exit = True
        thread.join(timeout=30)
    assert results["lorakit serve"] == 0


def open_connections(port: int, server, count: int) -> list[socket.socket]:
    """``count`` more connections, returned once uvicorn has accepted them all."""
    held = len(server.server_state.connections)
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    serving.wait_until(lambda: len(server.server_state.connections) == held + count)
    return sockets


def read_response(sock: socket.socket) -> tuple[int, bytes, bytes]:
    """(status, head, body) of one response with a Content-Length."""
    sock.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return int(head.split()[1]), head, body


def exchange_all(sockets: list[socket.socket], request: bytes) -> list[tuple[int, bytes]]:
    """Send ``request`` on every socket first (all in flight at once), then read each answer:
    [(status, body)]."""
    for sock in sockets:
        sock.sendall(request)
    return [read_response(sock)[::2] for sock in sockets]


def assert_refused_and_closed(sock: socket.socket, request: bytes = HEALTH) -> None:
    """uvicorn's limit answer: plain-text 503 "Service Unavailable", then it closes."""
    sock.sendall(request)
    status, head, body = read_response(sock)
    assert (status, body) == (503, b"Service Unavailable")
    assert b"connection: close" in head.lower()
    assert sock.recv(1) == b""  # closed by the server


@pytest.mark.parametrize("limit", [1, 3, 16])
def test_n_open_keep_alive_connections_are_served_and_the_next_is_refused(
    monkeypatch, adapter_files, limit
):
    """Each round asks again on every connection as soon as its answer is read (uvicorn's
    ``limit_concurrency`` still counted the previous request's task then)."""
    with cli_server(monkeypatch, adapter_files, "--max-connections", str(limit)) as (port, server):
        held = open_connections(port, server, limit)
        try:
            for request in (HEALTH, COMPLETION) * 3:  # keep-alive: each connection reused
                answers = exchange_all(held, request)
                assert [status for status, _ in answers] == [200] * limit, answers
            texts = {json.loads(body)["choices"][0]["text"] for _, body in answers}
            assert len(texts) == 1  # the same greedy completion on every connection
            assert len(server.server_state.connections) == limit  # all still open
            (extra,) = open_connections(port, server, 1)
            with extra:
                answers = exchange_all(held, HEALTH)  # N+1 open: the N older ones go on
                assert [status for status, _ in answers] == [200] * limit
                assert_refused_and_closed(extra)
            answers = exchange_all(held, COMPLETION)
            assert [status for status, _ in answers] == [200] * limit
        finally:
            for sock in held:
                sock.close()


def test_a_newer_connection_is_served_once_an_older_one_closes(monkeypatch, adapter_files):
    """Refused while 2 older ones are open; the next one, opened once one of them closed, is
    served, and so is the remaining older one (the oldest two open connections are served)."""
    with cli_server(monkeypatch, adapter_files, "--max-connections", "2") as (port, server):
        first, second = open_connections(port, server, 2)
        with first, second:
            assert [s for s, _ in exchange_all([first, second], HEALTH)] == [200, 200]
            (third,) = open_connections(port, server, 1)
            with third:
                assert_refused_and_closed(third, COMPLETION)
            first.close()
            serving.wait_until(lambda: len(server.server_state.connections) == 1)
            (fourth,) = open_connections(port, server, 1)
            with fourth:
                answers = exchange_all([fourth, second], COMPLETION)
                assert [status for status, _ in answers] == [200, 200], answers
                (fifth,) = open_connections(port, server, 1)
                with fifth:
                    assert_refused_and_closed(fifth)


def test_one_connection_serves_requests_one_after_another(monkeypatch, adapter_files):
    """--max-connections 1 (before: a server answering only 503): one client, sequential
    requests on one keep-alive connection, /health included."""
    import httpx

    with (
        cli_server(monkeypatch, adapter_files, "--max-connections", "1") as (port, _),
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client,
    ):
        for _ in range(3):
            response = client.post("/v1/completions", json=json.loads(_BODY))
            assert response.status_code == 200, response.text
            assert response.json()["object"] == "text_completion"
        assert client.get("/health").status_code == 200


@pytest.mark.parametrize("value", ["0", "-1"])
def test_max_connections_that_serve_nothing_are_refused_in_one_line(tmp_path, capsys, value):
    from lorakit.cli import main

    argv = ["serve", "--model", str(tmp_path), "--adapters", str(tmp_path)]
    assert main([*argv, "--max-connections", value]) == 2
    err = capsys.readouterr().err
    assert f"--max-connections: max_connections must be >= 1, got {value}" in err
    assert err.strip().count("\n") == 0  # one line, no traceback
