"""``lorakit.serve.asgi_stream``: lorakit's app called in-process (as a Ray Serve replica does)
gives its response piece by piece, the same bytes as over HTTP, and a caller that stops reading
cancels the request in the engine."""

from __future__ import annotations

import asyncio
import json
import threading

from lorakit.serve.asgi_stream import ResponseStart, asgi_stream
from tests.serving import Served, completion, wait_until

JSON = {"content-type": "application/json"}


def collect(app, path: str, body: dict) -> tuple[ResponseStart, list[bytes]]:
    async def run():
        pieces = [
            piece async for piece in asgi_stream(app, "POST", path, json.dumps(body).encode(), JSON)
        ]
        return pieces[0], pieces[1:]

    return asyncio.run(run())


def test_a_json_answer_and_an_error_come_through_whole(adapter_files):
    served = Served(*adapter_files)
    with served.client:
        expected = served.post("/v1/completions", completion(temperature=0)).json()
        start, chunks = collect(served.app, "/v1/completions", completion(temperature=0))
        assert start == ResponseStart(200, "application/json")
        answer = json.loads(b"".join(chunks))
        assert answer["choices"] == expected["choices"] and answer["usage"] == expected["usage"]
        start, chunks = collect(served.app, "/v1/completions", completion(model="nope"))
        assert start.status == 404
        assert json.loads(b"".join(chunks))["error"]["param"] == "model"


def test_a_stream_arrives_event_by_event_with_the_text_of_one_answer(adapter_files):
    served = Served(*adapter_files)
    with served.client:
        whole = served.post("/v1/completions", completion(temperature=0, max_tokens=8)).json()
        start, chunks = collect(
            served.app, "/v1/completions", completion(temperature=0, max_tokens=8, stream=True)
        )
    assert start.status == 200 and start.content_type.startswith("text/event-stream")
    events = [line for chunk in chunks for line in chunk.decode().splitlines() if line]
    assert events[-1] == "data: [DONE]"
    texts = [json.loads(e.removeprefix("data: "))["choices"][0]["text"] for e in events[:-1]]
    assert "".join(texts) == whole["choices"][0]["text"]
    assert len(chunks) >= 3  # sent as separate pieces, not gathered into one body


def test_a_caller_that_stops_reading_cancels_the_request(adapter_files):
    """The engine is held after its first decode step until the caller has closed the stream:
    the first event can only have arrived if the driver passes pieces on as they are sent (a
    driver that gathered the body would wait for all 24 tokens and cancel nothing)."""
    served = Served(*adapter_files)
    released, forwards = threading.Event(), []

    def hold_after_two_forwards(module, args):
        forwards.append(1)
        if len(forwards) == 3:
            released.wait(timeout=60)  # (deadlock guard)

    served.engine.model.register_forward_pre_hook(hold_after_two_forwards)

    async def read_first_event_then_leave():
        body = json.dumps(completion(max_tokens=24, stream=True)).encode()
        chunks = asgi_stream(served.app, "POST", "/v1/completions", body, JSON)
        start = await anext(chunks)
        first = await anext(chunks)
        await chunks.aclose()
        return start, first

    with served.client:
        start, first = asyncio.run(read_first_event_then_leave())
        released.set()
        wait_until(lambda: served.engine.stats.cancelled == 1)
    assert start.status == 200 and first.startswith(b"data: ")
    assert len(forwards) < 24
