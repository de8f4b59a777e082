"""Fixes from a review of the HTTP server, each checked on a live uvicorn on 127.0.0.1 (driven by
httpx) or on the piece at fault:

- a body's Unicode check costs memory by the nesting depth, not by the number of values, parses
  large bodies off the event loop and runs no garbage collection meanwhile;
- ``merged_adapters.ids`` names each adapter once and at most ``MAX_IDS``; ``cat``'s summed
  rank is checked from the headers; mixtures combine outside one global lock, once each;
- concurrent first requests for an adapter read its files once (the bank's loads);
- a runtime load while every slot is busy registers the adapter, loaded on its first request.

Server: the tiny Llama and adapters ad0..ad3 of ``tests/serving.py`` (2 slots, max rank 4).
"""

from __future__ import annotations

import gc
import json
import shutil
import threading
import tracemalloc
from concurrent.futures import Future
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.combining import combine
from lorakit.errors import UserError
from lorakit.io import read as read_module
from lorakit.serve import lazy_loads as lazy_loads_module
from lorakit.serve import mixtures as mixtures_module
from lorakit.serve import request_body
from lorakit.serve.protocol import APIError
from tests.serving import AUTH, BASE, Served, assert_error, free_port, wait_until

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def live(adapter_files, tmp_path):
    """``Served`` over a copy of the adapters, run by uvicorn; ``.url``, ``.loop_thread``."""
    import uvicorn

    root, tokenizer = adapter_files
    shutil.copytree(root / "adapters", tmp_path / "adapters")
    served = Served(tmp_path, tokenizer)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(served.app, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started)
    served.url, served.loop_thread = f"http://127.0.0.1:{port}", thread
    yield served
    server.should_exit = True
    thread.join(timeout=10)


def post(served, path: str, body: dict, headers=None) -> httpx.Response:
    return httpx.post(served.url + path, json=body, headers=headers, timeout=60)


def greedy(served, model: str, mixture: dict | None = None) -> httpx.Response:
    body = {"model": model, "prompt": "hello world", "max_tokens": 4, "temperature": 0}
    if mixture is not None:
        body["merged_adapters"] = mixture
    return post(served, "/v1/completions", body)


def in_threads(count: int, function) -> tuple[list[threading.Thread], list]:
    """``count`` daemon threads running ``function()``, started; their results (any order)."""
    results: list = []
    threads = [
        threading.Thread(target=lambda: results.append(function()), daemon=True)
        for _ in range(count)
    ]
    for thread in threads:
        thread.start()
    return threads, results


def join_all(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(timeout=60)  # (deadlock guard)
        assert not thread.is_alive()


def counting_future(entered: list) -> type:
    """A ``Future`` whose ``result`` calls (threads waiting for another's work) are counted."""

    class CountingFuture(Future):
        def result(self, timeout=None):
            entered.append(threading.current_thread().name)
            return super().result(timeout)

    return CountingFuture


# ----------------------------------------------------------------- 1. the body's Unicode check


def nested_body(depth: int, size: int, inside: str = "") -> bytes:
    """A completion body of about ``size`` bytes: an ignored field ``x`` holding, under
    ``depth`` levels of lists, ``inside`` and then as many empty lists as fit."""
    head = f'{{"model": "ad0", "prompt": "hi", "max_tokens": 2, "x": {"[" * depth}{inside}'
    tail = "]" * depth + "}"
    count = (size - len(head) - len(tail)) // 3
    return (head + ",".join(["[]"] * count) + tail).encode()


def peak_bytes(function, *args) -> int:
    tracemalloc.start()
    try:
        function(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("inside", ["", '"\\ud83d\\ude00", '], ids=["no-escape", "walked"])
def test_checking_a_nested_body_costs_no_memory_beyond_its_parse(inside):
    """Old: a path string per value (~1.5 KB each at depth 500): ~130 MB for a 256 KiB body.
    The check now holds one iterator per level (a body with a surrogate escape is walked)."""
    body = nested_body(500, 256 << 10, inside)
    parsed = peak_bytes(json.loads, body)
    assert peak_bytes(request_body.parse_body, body) - parsed < len(body) // 4


def test_parsing_a_body_of_many_lists_runs_no_garbage_collection():
    """Old: a collection per 700 lists parsed (full ones in a server holding the model's
    objects, the GIL held); now at most the one due once the collector is back on."""
    body = nested_body(50, 256 << 10)
    starts: list[int] = []

    def count(phase: str, info: dict) -> None:
        if phase == "start":
            starts.append(info["generation"])

    gc.callbacks.append(count)
    try:
        request_body.parse_body(body)
        during = len(starts)
    finally:
        gc.callbacks.remove(count)
    assert during <= 1 and gc.isenabled()


@pytest.mark.parametrize(
    ("raw", "param", "message"),
    [
        (b'{"x": [[{"a": ["ok", "\\ud800"]}]]}', "x", "'x[0][0].a[1]' holds an unpaired "),
        (b'{"m": {"k\\udc00": 1}}', "m", "the key 'm.k\\udc00' holds an unpaired surrogate U+DC00"),
        (b'{"prompt": "a\xed\xa0\x80"}', "prompt", "'prompt' holds an unpaired surrogate U+D800"),
        ('{"prompt": "\\ud800"}'.encode("utf-16-le"), "prompt", "'prompt' holds an unpaired"),
        (b'{"ok": "\\ud83d\\ude00", "s": ["\\uDBFF"]}', "s", "'s[0]' holds an unpaired "),
        (('{"x": ' + "[" * 300 + '"\\udABC"' + "]" * 300 + "}").encode(), "x", "x" + "[0]" * 300),
    ],
    ids=["nested", "key", "utf8-bytes", "utf16-body", "upper-case", "deep"],
)
def test_a_lone_surrogate_is_named_by_its_exact_path(raw, param, message):
    with pytest.raises(APIError) as caught:
        request_body.parse_body(raw)
    assert caught.value.status == 400 and caught.value.param == param
    assert message in caught.value.message and caught.value.message.endswith("Unicode text")


def test_a_large_nested_body_is_served_parsed_off_the_event_loop(live, monkeypatch):
    parse, parsed_on = request_body.parse_body, []

    def recording(raw: bytes) -> dict:
        parsed_on.append(threading.current_thread())
        return parse(raw)

    monkeypatch.setattr(request_body, "parse_body", recording)
    body = nested_body(500, 256 << 10)
    headers = {"content-type": "application/json"}
    tracemalloc.start()
    try:
        response = httpx.post(live.url + "/v1/completions", content=body, headers=headers)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2
    assert parsed_on and parsed_on[0] is not live.loop_thread  # a worker thread
    assert peak < 48 * len(body)  # json's own lists ~23x; old: a path per list, ~500x


# ----------------------------------------------------------------- 2. mixtures


@pytest.mark.parametrize(
    ("ids", "words"),
    [
        (["ad0", "ad1", "ad0"], ["'ad0' more than once", "larger weight"]),
        ([f"ad{i % 4}" for i in range(30_000)], ["names 30000 adapters", "at most 16"]),
        ([f"x{i}" for i in range(17)], ["names 17 adapters", "at most 16"]),
    ],
    ids=["repeated", "huge", "over-the-cap"],
)
def test_mixture_ids_are_each_named_once_and_at_most_the_cap(live, ids, words):
    combined = live.app.state.mixtures.combined
    response = greedy(live, BASE, {"ids": ids, "merge_strategy": "svd", "rank": 2})
    assert_error(response, 400, "merged_adapters.ids", "'merged_adapters.ids'", *words)
    assert live.app.state.mixtures.combined == combined  # refused before anything is read


def test_cat_over_the_max_rank_is_refused_from_the_headers(live, monkeypatch):
    reads = []
    read_data = read_module.read_adapter_data
    monkeypatch.setattr(
        read_module, "read_adapter_data", lambda header: reads.append(header) or read_data(header)
    )
    mixture = {"ids": ["ad0", "ad1", "ad2"], "merge_strategy": "linear"}  # ranks 2 + 2 + 2
    response = greedy(live, BASE, mixture)
    assert_error(response, 400, "merged_adapters", "rank 6 > the bank's max_rank 4", "'svd'")
    assert reads == [] and live.app.state.mixtures.combined == 0
    assert greedy(live, BASE, {**mixture, "ids": ["ad0", "ad1"]}).status_code == 200  # rank 4
    assert len(reads) == 2


def test_mixtures_are_combined_outside_one_lock_and_once_each(live, monkeypatch):
    """While one mixture is being combined, another is served, and two more requests for the
    first wait for its combination instead of combining it again."""
    gate, calls, waiting = threading.Event(), [], []

    def gated_combine(directories, *args, **options):
        calls.append([Path(d).name for d in directories])
        if Path(directories[0]).name == "ad0":
            assert gate.wait(timeout=60)  # (deadlock guard)
        return combine(directories, *args, **options)

    monkeypatch.setattr(mixtures_module, "combine", gated_combine)
    monkeypatch.setattr(mixtures_module, "Future", counting_future(waiting), raising=False)
    slow = {"ids": ["ad0", "ad1"], "weights": [0.5, 0.25]}
    threads, results = in_threads(1, lambda: greedy(live, BASE, slow))
    wait_until(lambda: calls)  # the first request is combining
    others, other = in_threads(1, lambda: greedy(live, BASE, {"ids": ["ad2", "ad3"]}))
    others[0].join(timeout=10)
    other_done = not others[0].is_alive()  # (old: it waited for the lock behind the first)
    results_more: list = []
    if other_done:
        more, results_more = in_threads(2, lambda: greedy(live, BASE, slow))
        wait_until(lambda: len(waiting) == 2)  # both wait for the first's combination
        threads += more
    gate.set()
    join_all(threads + others)
    assert other_done and other[0].status_code == 200
    responses = results + results_more
    assert [r.status_code for r in responses] == [200] * 3
    assert len({r.json()["choices"][0]["text"] for r in responses}) == 1
    assert [c for c in calls if c[0] == "ad0"] == [["ad0", "ad1"]]  # combined once


def test_a_failed_combination_is_the_error_of_every_request_waiting_for_it(adapter_files):
    served = Served(*adapter_files)
    mixtures = served.app.state.mixtures
    gate, entered, waiting = threading.Event(), [], []

    def failing_combine(directories, *args, **options):
        entered.append(1)
        assert gate.wait(timeout=60)  # (deadlock guard)
        raise UserError("combine: broken on purpose")

    mixture = mixtures_module.parse_mixture({"ids": ["ad0", "ad1"], "merge_strategy": "svd"})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mixtures_module, "combine", failing_combine)
        patch.setattr(mixtures_module, "Future", counting_future(waiting), raising=False)
        errors = []

        def prepare() -> None:
            try:
                mixtures.prepare(mixture)
            except APIError as error:
                errors.append(error.message)

        threads, _ = in_threads(3, prepare)
        wait_until(lambda: len(entered) + len(waiting) == 3)
        gate.set()
        join_all(threads)
    assert len(entered) == 1 and len(errors) == 3
    assert all("broken on purpose" in message for message in errors)
    assert mixtures.prepare(mixture).startswith("mixture:")  # not cached: combined again


# ----------------------------------------------------------------- 3. one read per adapter


def test_concurrent_first_requests_read_an_adapter_once(live, monkeypatch):
    gate, reads, waiting = threading.Event(), [], []
    read = live.adapters._read

    def gated_read(name, path):
        reads.append(name)
        assert gate.wait(timeout=60)  # (deadlock guard) a large file takes a while
        return read(name, path)

    monkeypatch.setattr(live.adapters, "_read", gated_read)
    monkeypatch.setattr(lazy_loads_module, "Future", counting_future(waiting))
    threads, responses = in_threads(6, lambda: greedy(live, "ad2"))
    wait_until(lambda: len(reads) + len(waiting) >= 6)  # (old: 6 reads)
    gate.set()
    join_all(threads)
    assert [r.status_code for r in responses] == [200] * 6
    assert reads == ["ad2"]
    assert len({r.json()["choices"][0]["text"] for r in responses}) == 1


def test_the_bank_loads_once_for_every_caller_and_hands_a_failure_to_all(adapter_files):
    """``ensure_loaded`` (the HTTP handlers) and ``acquire`` (the engine's cold loads) of one
    adapter at once: one read; each acquire holds it. A failed read is every waiter's error,
    and the next call reads again."""
    served = Served(*adapter_files)
    bank, gate, reads, waiting = served.bank, threading.Event(), [], []

    def loader(name):
        reads.append(name)
        assert gate.wait(timeout=60)  # (deadlock guard)
        if name == "ad3":
            raise UserError("adapter 'ad3' is broken on purpose")
        return served.adapters.read(name)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lazy_loads_module, "Future", counting_future(waiting))
        slots: list = []
        calls = [bank.ensure_loaded, bank.acquire, bank.acquire, bank.ensure_loaded]
        threads = [
            threading.Thread(target=lambda c=c: slots.append(c("ad2", loader)), daemon=True)
            for c in calls
        ]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(reads) + len(waiting) >= 4)
        gate.set()
        join_all(threads)
        assert reads == ["ad2"] and len(set(slots)) == 1 and bank.in_use("ad2") == 2

        gate.clear()
        errors: list = []

        def failing() -> None:
            try:
                bank.ensure_loaded("ad3", loader)
            except UserError as error:
                errors.append(str(error))

        threads, _ = in_threads(3, failing)
        wait_until(lambda: reads.count("ad3") + len(waiting) >= 6)  # 3 waited for ad2
        gate.set()
        join_all(threads)
    assert reads.count("ad3") == 1 and len(errors) == 3 and "on purpose" in errors[0]
    with pytest.raises(UserError):
        bank.ensure_loaded("ad3", loader)
    assert reads.count("ad3") == 2 and "ad3" not in bank


# ----------------------------------------------------------------- 4. loads while every slot is busy


def test_a_runtime_load_while_every_slot_is_busy_registers_the_adapter(live):
    bank, adapters = live.bank, live.adapters
    for name in ("ad0", "ad1"):  # as two running requests hold them
        bank.acquire(name, adapters.read)
    try:
        response = post(
            live, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": "ad3"}, AUTH
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["loaded"] is False and "loaded on its first request" in answer["message"]
        models = httpx.get(live.url + "/v1/models").json()["data"]
        assert "late" in [card["id"] for card in models] and "late" not in bank
    finally:
        for name in ("ad0", "ad1"):
            bank.release(name)
    late = greedy(live, "late")
    assert late.status_code == 200 and "late" in bank
    assert late.json()["choices"][0]["text"] == greedy(live, "ad3").json()["choices"][0]["text"]
    again = post(live, "/v1/load_lora_adapter", {"lora_name": "later", "lora_path": "ad3"}, AUTH)
    assert again.json()["loaded"] is True and "later" in bank  # a free slot: loaded now


def test_a_runtime_load_while_busy_still_checks_the_files(live, tmp_path):
    broken = tmp_path / "adapters" / "nan"
    shutil.copytree(tmp_path / "adapters" / "ad0", broken)
    tensors = load_file(broken / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, broken / "adapter_model.safetensors")
    for name in ("ad0", "ad1"):
        live.bank.acquire(name, live.adapters.read)
    try:
        body = {"lora_name": "nan2", "lora_path": "nan"}
        assert_error(post(live, "/v1/load_lora_adapter", body, AUTH), 400, "lora_path", key)
    finally:
        for name in ("ad0", "ad1"):
            live.bank.release(name)
    assert "nan2" not in live.adapters.registry
