"""Fixes of review 33 to the Ray Serve deployment (``lorakit.serve.ray_deployment``):

1. an ``--adapter-memory`` bank too small for the pinned multiplexed adapters was accepted, and
   the replica then answered 503 for ever for every other adapter;
2. an internal error (500) reached the client as a broken connection (``asgi_stream`` re-raised
   the app's error after its complete 500 response);
3. requests the app refuses (400, 429) loaded and pinned their adapter, evicting others;
4. the ingress read a body of any size (a 100 MB body: a 413 after 6.65 s, "more than");
5. ``replicas`` was not checked (``True`` accepted, ``"2"`` multiplied into a string).

Most run in-process: ``build_app``, the replica class with Ray's replica context stubbed (no Ray
cluster), the ingress class with a fake replica handle. One slow test runs a local Ray cluster.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import types

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

import lorakit
from lorakit.cli import build_parser
from lorakit.commands.serve import build
from lorakit.io import save_adapter
from lorakit.serve.asgi_stream import ResponseStart, asgi_stream
from tests import tiny_models
from tests.serving import base_model, metaspace_tokenizer

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from lorakit.serve import ray_deployment, replica_bank  # noqa: E402  (needs ray)
from lorakit.serve.ray_deployment import BankTooSmallError, build_app  # noqa: E402
from tests.test_serve_ray import ray_port  # noqa: E402, F401  (the local cluster, slow test)

JSON = {"content-type": "application/json"}
ALL_LINEAR = 5  # adapters ad0..ad4: all-linear, rank 8
BYTES = re.compile(r"--adapter-memory to at least (\d+) bytes")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model directory; ``adapters``: ad0..ad4, all-linear, rank 8 (every layer's pool
    has all the bank's pages); ``mixed``: m0, m2, m4 all-linear and m1, m3 q/v-only, rank 8
    (nested layer sets: the MLP pools hold only their share of the pages)."""
    root = tmp_path_factory.mktemp("ray33")
    tokenizer = metaspace_tokenizer()
    tiny_models.save_llama_with_tokenizer(root / "model", tokenizer, max_position_embeddings=96)
    reference = base_model(tokenizer)
    names = {f"ad{i}": "all-linear" for i in range(ALL_LINEAR)}
    names |= {f"m{i}": ["q_proj", "v_proj"] if i % 2 else "all-linear" for i in range(5)}
    for name, targets in names.items():
        config = lorakit.LoraConfig(r=8, lora_alpha=8, target_modules=targets)
        lorakit.inject(reference, config, adapter_name=name)
    tiny_models.randomize_adapters(reference, std=0.4)
    for name in names:
        save_adapter(reference, root / ("adapters" if name.startswith("ad") else "mixed"), name)
    return root


def args_of(root, adapters: str = "adapters") -> list[str]:
    return ["--model", str(root / "model"), "--adapters", str(root / adapters)]


def body(model: str, **fields) -> dict:
    return dict(model=model, prompt="hello world", max_tokens=4, temperature=0) | fields


def one_server(args: list[str]):
    return build(build_parser().parse_args(["serve", *args]))


def replica_args(app) -> list[str]:
    """The ``lorakit serve`` arguments each replica of ``build_app``'s application gets."""
    return app._bound_deployment.init_args[0]._bound_deployment.init_args[0]


def answers_with_pins(args: list[str], pinned: list[str], model: str) -> int:
    """The status one server (``args``) answers for ``model`` with ``pinned`` loaded and pinned
    in its bank, as a replica's multiplexed cache pins them."""
    app = one_server(args)
    adapters = app.state.adapters
    with TestClient(app) as client:
        for name in pinned:
            adapters.ensure_loaded(name)
            adapters.bank.pin(name)
        return client.post("/v1/completions", json=body(model)).status_code


# --- 1. --adapter-memory: a bank the pinned adapters fill --------------------------------------


def test_build_app_refuses_a_budget_that_holds_only_the_pinned_adapters(world):
    """150KB: 5 pages of which a rank-8 adapter takes 2, so 2 adapters at once; with
    adapters_per_replica=2 both pinned, ad2 was answered 503 for ever. Now refused, naming the
    least budget that holds 3, which build_app takes (one byte less it refuses) and with which
    one server holding two pinned adapters loads a third."""
    memory = ["--adapter-memory", "150KB"]
    with pytest.raises(BankTooSmallError) as error:
        build_app([*args_of(world), *memory], replicas=1, adapters_per_replica=2)
    message = str(error.value)
    assert "--adapter-memory 150KB holds 2 adapter(s) of rank 8 at once" in message
    assert "adapters_per_replica=2" in message and "lower adapters_per_replica to 1" in message
    least = int(BYTES.search(message).group(1))
    assert (
        answers_with_pins([*args_of(world), *memory, "--max-adapters", "4"], ["ad0", "ad1"], "ad2")
        == 503
    )

    app = build_app([*args_of(world), "--adapter-memory", str(least)], adapters_per_replica=2)
    assert replica_args(app)[-4:] == ["--adapter-memory", str(least), "--max-adapters", "4"]
    with pytest.raises(BankTooSmallError, match="holds 2 adapter"):
        build_app([*args_of(world), "--adapter-memory", str(least - 1)], adapters_per_replica=2)
    pinned_args = replica_args(app)
    assert answers_with_pins(pinned_args, ["ad0", "ad1"], "ad2") == 200


def test_the_budget_check_counts_the_pools_of_the_widest_adapters(world):
    """Adapters of nested layer sets (q/v-only inside all-linear): the MLP pools hold their
    share of the pages, so all-linear adapters fit fewer at once than the page numbers say.
    600000 bytes, 4 slots: 8 page numbers (4 adapters by the pages alone), but the MLP pools
    hold 4 pages, 2 all-linear adapters, both pinned: a third is a 503. Refused, naming the
    slots and budget that hold 3, with which the third loads."""
    args = [*args_of(world, "mixed"), "--adapter-memory", "600000"]
    with pytest.raises(BankTooSmallError) as error:
        build_app(args, replicas=1, adapters_per_replica=2)
    message = str(error.value)
    assert "holds 2 adapter(s) of rank 8" in message and "adapters_per_replica=2" in message
    slots, least = re.search(
        r"set --max-adapters to (\d+) and --adapter-memory to at least (\d+) bytes", message
    ).groups()
    bank = one_server([*args, "--max-adapters", "4"]).state.adapters.bank
    assert bank.pages // bank.pages_for(8) > 2  # the page numbers alone would accept it
    assert answers_with_pins([*args, "--max-adapters", "4"], ["m0", "m2"], "m4") == 503

    fixed = [*args_of(world, "mixed"), "--max-adapters", slots, "--adapter-memory", least]
    build_app(fixed, replicas=1, adapters_per_replica=2)  # accepted
    assert answers_with_pins(fixed, ["m0", "m2"], "m4") == 200


def test_a_replica_checks_its_bank_when_build_app_cannot_read_the_files(world, caplog):
    """A model build_app cannot read here (the workers' files): accepted with a warning, and
    the replica refuses its own bank as it starts (it started and answered 503 for ever)."""
    elsewhere = ["--model", "/nowhere/model", "--adapters", str(world / "adapters")]
    with caplog.at_level(logging.WARNING, logger=ray_deployment.__name__):
        build_app([*elsewhere, "--adapter-memory", "150KB"], adapters_per_replica=2)
    assert "checked by each replica as it starts" in caplog.text
    replica_class = ray_deployment.replica_deployment(2).func_or_class
    args = [*args_of(world), "--adapter-memory", "150KB", "--max-adapters", "4"]
    with pytest.raises(BankTooSmallError, match=r"150KB holds 2 adapter\(s\).*at least \d+ bytes"):
        replica_class(args)


def test_the_numbers_of_the_docs_example():
    """docs/serving.md: a rank-16 q/v adapter of SmolLM2-135M takes 3.7 MB of the bank
    (all-linear 19.5 MB); 16MB holds 4; 16 pinned need 63MB, 64 need 240MB (all-linear
    1.28GB, and 1.27GB is not enough)."""
    from lorakit.meta_model import build_meta_model
    from lorakit.serve import AdapterBank, prepare_for_serving

    def shape(targets):
        model, _ = build_meta_model("smollm2-135m-instruct", "float32")
        prepare_for_serving(model, targets)
        bank = AdapterBank(model, max_rank=16, capacity=1)
        return replica_bank._BankShape.of(bank, dict.fromkeys(bank.layer_names, 1.0))

    qv, linear = shape(["q_proj", "v_proj"]), shape("all-linear")
    for each, mb in ((qv, 3.7), (linear, 19.5)):
        one = each.per_adapter * sum(each.page_bytes.values()) + each.slot_overhead
        assert round(one / 1e6, 1) == mb
    assert qv.held(18, 16_000_000) == 4
    assert qv.held(18, 63_000_000) == 17 and qv.held(66, 240_000_000) == 65
    assert linear.held(66, 1_280_000_000) == 65 and linear.held(66, 1_270_000_000) < 65


# --- 3. refused requests pin nothing (the replica class in-process) ----------------------------


class _Nothing:
    """Stands for Ray's metrics and metrics pusher: every call does nothing."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@pytest.fixture
def in_process_ray(monkeypatch):
    """Ray Serve's replica context for a replica class made in this process (no cluster):
    ``@serve.multiplexed`` runs its real cache (LRU, its bound, ``__del__`` on eviction); its
    metrics are no-ops. Returns a dict whose "model" is the request's multiplexed model id."""
    from ray.serve import multiplex

    context = types.SimpleNamespace(
        app_name="lorakit",
        deployment="LorakitReplica",
        replica_id=types.SimpleNamespace(unique_id="replica-1"),
    )
    request = {"model": ""}
    monkeypatch.setattr(multiplex, "_get_internal_replica_context", lambda: context)
    monkeypatch.setattr(
        multiplex,
        "metrics",
        types.SimpleNamespace(Histogram=_Nothing, Gauge=_Nothing, Counter=_Nothing),
    )
    monkeypatch.setattr(multiplex, "MetricsPusher", _Nothing)
    monkeypatch.setattr(
        multiplex, "ServeUsageTag", types.SimpleNamespace(MULTIPLEXED_API_USED=_Nothing())
    )
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    monkeypatch.setattr(serve, "get_multiplexed_model_id", lambda: request["model"])
    yield request
    assert not ray.is_initialized()  # (nothing started a Ray instance)


REFUSED = {"temperature": -1}  # a 400 (invalid sampling parameter) for any adapter
SEQUENCE = [("ad0", {}), ("ad1", {}), ("ad2", REFUSED), ("ad3", REFUSED), ("ad4", REFUSED)]
SEQUENCE += [("ad0", {}), ("ad2", {}), ("ad3", {})]


def test_requests_the_app_refuses_pin_and_evict_no_adapter(world, in_process_ray):
    """One replica, adapters_per_replica=2, --max-adapters 4 (ray_run2.py): three 400s for
    ad2..ad4 pinned them, evicting ad0 from the cache and the bank (2 evictions by the last
    request). Now the bank's counts follow one server's at every step; the pins are the
    adapters of the last two successful requests (the cache still bounds them at 2)."""
    args = [*args_of(world), "--max-batch", "1", "--max-waiting", "1", "--max-adapters", "4"]
    expected = []
    with TestClient(one_server(args)) as client:
        for model, fields in SEQUENCE:
            status = client.post("/v1/completions", json=body(model, **fields)).status_code
            health = client.get("/health").json()
            expected.append((status, health["adapters_loaded"], health["adapter_evictions"]))
    assert [status for status, _, _ in expected] == [200, 200, 400, 400, 400, 200, 200, 200]

    replica = ray_deployment.replica_deployment(2).func_or_class(args)

    async def run_sequence():
        seen = []
        for model, fields in SEQUENCE:
            in_process_ray["model"] = model
            raw = json.dumps(body(model, **fields)).encode()
            pieces = [p async for p in replica.forward("POST", "/v1/completions", raw, JSON)]
            status, _, replica_id = pieces[0]
            assert replica_id == "replica-1"
            bank = replica.adapters.bank
            seen.append(((status, bank.loaded_count, bank.evictions), replica.resident()))
        return seen

    try:
        seen = asyncio.run(run_sequence())
    finally:
        replica.app.state.engine.stop()
    assert [counts for counts, _ in seen] == expected
    assert [pins for _, pins in seen] == [
        ["ad0"],
        ["ad0", "ad1"],
        ["ad0", "ad1"],
        ["ad0", "ad1"],
        ["ad0", "ad1"],
        ["ad0", "ad1"],
        ["ad0", "ad2"],  # (Ray's cache evicted its least recently used, ad1, and unpinned it)
        ["ad2", "ad3"],
    ]


# --- 2. an internal error's 500 arrives whole ---------------------------------------------------


def collect(app, raw: bytes, path: str = "/v1/completions") -> list:
    async def run():
        return [piece async for piece in asgi_stream(app, "POST", path, raw, JSON)]

    return asyncio.run(run())


def test_an_error_after_the_whole_500_was_sent_is_logged_not_raised(world, monkeypatch, caplog):
    """Starlette's ServerErrorMiddleware sends the 500 and re-raises for the server to log:
    asgi_stream raised it after the 500's body, and the Ray replica's stream broke the client's
    connection. Now the pieces are the 500 whole and the error is logged, as uvicorn does."""
    from lorakit.serve import prompts

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    app = one_server(args_of(world))
    monkeypatch.setattr(prompts, "prompt_ids", boom)
    with TestClient(app, raise_server_exceptions=False) as client:
        expected = client.post("/v1/completions", json=body("ad0"))
    assert expected.status_code == 500
    with caplog.at_level(logging.ERROR, logger="lorakit.serve.asgi_stream"):
        pieces = collect(app, json.dumps(body("ad0")).encode())
    assert pieces[0] == ResponseStart(500, "application/json")
    assert json.loads(b"".join(pieces[1:])) == expected.json()
    assert expected.json()["error"]["message"] == "internal error: RuntimeError"
    logged = [r for r in caplog.records if r.name == "lorakit.serve.asgi_stream"]
    assert len(logged) == 1 and "Exception in ASGI application" in logged[0].getMessage()
    assert str(logged[0].exc_info[1]) == "boom"


def test_an_error_before_the_response_is_complete_is_raised():
    """A response cut short (its body not finished) is not passed on as whole: raised."""

    async def half_an_answer(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"half", "more_body": True})
        raise RuntimeError("cut short")

    pieces = []

    async def run():
        async for piece in asgi_stream(half_an_answer, "POST", "/x", b"{}", JSON):
            pieces.append(piece)

    with pytest.raises(RuntimeError, match="cut short"):
        asyncio.run(run())
    assert pieces == [ResponseStart(200, None), b"half"]


# --- 4. the ingress bounds the body as the app does ---------------------------------------------


class FakeReplica:
    """A ``LorakitReplica`` handle: records what ``forward`` gets, answers 200 ``{}``."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.model = None
        self.forward = types.SimpleNamespace(remote=self._forward)

    def options(self, stream: bool = False, multiplexed_model_id: str | None = None):
        self.model = multiplexed_model_id or self.model
        return self

    def _forward(self, method, path, raw, headers):
        self.calls.append((method, path, raw, headers))

        async def pieces():
            yield 200, [(b"content-type", b"application/json")], "replica-1"
            yield b"{}"

        return pieces()


def ingress_client(replica: FakeReplica) -> TestClient:
    """The ingress class's routes (without Ray: an instance made without Ray's wrapper's
    ``__init__``) behind an app with the ingress's error handlers."""
    from lorakit.serve.app import install_error_handlers

    ingress = object.__new__(ray_deployment.OpenAIIngress.func_or_class)
    ingress.replica, ingress.max_body_bytes = replica, 1 << 20
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await ingress.completions(request)

    return TestClient(app)


def test_the_ingress_refuses_a_body_too_large_as_one_server_before_reading_it(world):
    """A 2 MB body: the ingress read it whole and forwarded it without its Content-Length, so
    the replica's app answered "more than N bytes" (a 100 MB body: after 6.65 s). Now the
    ingress answers one server's 413 from the Content-Length, and forwards nothing."""
    big = json.dumps(body("ad0", prompt="x" * (2 << 20))).encode()
    with TestClient(one_server(args_of(world))) as client:
        expected = client.post("/v1/completions", content=big, headers=JSON)
    assert expected.status_code == 413
    assert expected.json()["error"]["message"] == (
        f"request body of {len(big)} bytes exceeds the limit of 1048576 bytes"
    )
    replica = FakeReplica()
    answer = ingress_client(replica).post("/v1/completions", content=big, headers=JSON)
    assert (answer.status_code, answer.json()) == (413, expected.json())
    assert replica.calls == []


def test_the_ingress_forwards_the_body_with_its_content_length():
    replica = FakeReplica()
    raw = json.dumps(body("ad3")).encode()
    answer = ingress_client(replica).post("/v1/completions", content=raw, headers=JSON)
    assert answer.status_code == 200
    ((method, path, forwarded, headers),) = replica.calls
    assert (method, path, forwarded, replica.model) == ("POST", "/v1/completions", raw, "ad3")
    assert headers == {"content-type": "application/json", "content-length": str(len(raw))}


# --- 5. replicas is checked ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("replicas", "error", "message"),
    [
        (True, TypeError, "replicas must be an int, got True"),
        ("2", TypeError, "replicas must be an int, got '2'"),
        (2.0, TypeError, "replicas must be an int, got 2.0"),
        (0, ValueError, "replicas must be >= 1, got 0"),
        (-3, ValueError, "replicas must be >= 1, got -3"),
    ],
)
def test_build_app_checks_replicas_as_adapters_per_replica(replicas, error, message):
    with pytest.raises(error) as raised:
        build_app(["--model", "m", "--adapters", "a"], replicas=replicas)
    assert str(raised.value).startswith(message)


# --- through a local Ray cluster ------------------------------------------------------------------


@pytest.mark.slow
def test_through_ray_refused_requests_pin_nothing_and_a_large_body_is_one_servers_413(
    world,
    ray_port,  # noqa: F811
):
    """ray_run2.py's sequence through Ray Serve (one replica, adapters_per_replica=2,
    --max-adapters 4): three 400s leave the pins and the bank as they were; a 2 MB body gets
    one server's 413 (its Content-Length read by the ingress)."""
    args = [*args_of(world), "--max-batch", "1", "--max-waiting", "1", "--max-adapters", "4"]
    big = json.dumps(body("ad0", prompt="x" * (2 << 20))).encode()
    with TestClient(one_server(args)) as client:
        too_large = client.post("/v1/completions", content=big, headers=JSON)
    serve.run(build_app(args, replicas=1, adapters_per_replica=2), name="lorakit", route_prefix="/")
    url = f"http://127.0.0.1:{ray_port}"
    try:
        replica = serve.get_deployment_handle("LorakitReplica", app_name="lorakit")
        seen = []
        for model, fields in SEQUENCE[:5]:
            answer = httpx.post(f"{url}/v1/completions", json=body(model, **fields), timeout=120)
            health = httpx.get(f"{url}/health", timeout=60).json()
            pins = replica.resident.remote().result()
            seen.append((answer.status_code, health["adapter_evictions"], pins))
        answer = httpx.post(f"{url}/v1/completions", content=big, headers=JSON, timeout=120)
    finally:
        serve.delete("lorakit")
    assert seen == [
        (200, 0, ["ad0"]),
        (200, 0, ["ad0", "ad1"]),
        (400, 0, ["ad0", "ad1"]),
        (400, 0, ["ad0", "ad1"]),
        (400, 0, ["ad0", "ad1"]),
    ]
    assert (answer.status_code, answer.json()) == (413, too_large.json())
