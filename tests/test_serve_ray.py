"""lorakit's engine as a Ray Serve deployment (``lorakit.serve.ray_deployment``): a local Ray
cluster, two replicas, 50 adapters; requests are routed by adapter (model multiplexing), each
adapter lives on a bounded number of replicas, and the answers are those of one lorakit server
(errors too: an adapter that fails to load, a 429 with its Retry-After)."""

from __future__ import annotations

import contextlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

import lorakit
from lorakit.cli import build_parser
from lorakit.commands.serve import build
from lorakit.io import save_adapter
from tests import tiny_models
from tests.serving import base_model, free_port, metaspace_tokenizer

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

ADAPTERS, TEMPLATES, PER_REPLICA = 50, 10, 30


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model directory and 50 adapters (10 distinct, q/v and all-linear, ranks 2-8),
    plus ``mismatch``, trained on other base weights (refused when loaded)."""
    root = tmp_path_factory.mktemp("ray")
    tokenizer = metaspace_tokenizer()
    tiny_models.save_llama_with_tokenizer(root / "model", tokenizer, max_position_embeddings=96)
    reference = base_model(tokenizer)
    for index in range(TEMPLATES):
        targets = ["q_proj", "v_proj"] if index % 2 else "all-linear"
        config = lorakit.LoraConfig(r=2 + index % 4 * 2, lora_alpha=8, target_modules=targets)
        lorakit.inject(reference, config, adapter_name=f"t{index}")
    tiny_models.randomize_adapters(reference, std=0.4)
    for index in range(TEMPLATES):
        save_adapter(reference, root / "templates", f"t{index}")
    for index in range(ADAPTERS):
        directory = root / "adapters" / f"ad{index:02d}"
        directory.mkdir(parents=True)
        for file in (root / "templates" / f"t{index % TEMPLATES}").iterdir():
            os.link(file, directory / file.name)
    save_mismatched_adapter(tokenizer, root / "adapters")
    return root


def save_mismatched_adapter(tokenizer, adapters) -> None:
    """``adapters/mismatch``: an adapter of the same shapes saved on shifted base weights."""
    other_base = base_model(tokenizer)
    with torch.no_grad():
        for parameter in other_base.parameters():
            parameter.add_(0.01)
    config = lorakit.LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    lorakit.inject(other_base, config, adapter_name="mismatch")
    save_adapter(other_base, adapters, "mismatch")


@pytest.fixture(scope="module")
def ray_port():
    """A local Ray cluster (started once for the module) and Serve's HTTP port."""
    port = free_port()
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


@contextlib.contextmanager
def deployed(app):
    """``app`` served at ``/`` for the block (one application at a time), then deleted."""
    serve.run(app, name="lorakit", route_prefix="/")
    try:
        yield
    finally:
        serve.delete("lorakit")


@pytest.fixture
def one_replica(world, ray_port):
    """The completions URL of one replica that runs one request at a time, one more waiting."""
    from lorakit.serve.ray_deployment import build_app

    args = [*serve_args(world), "--max-batch", "1", "--max-waiting", "1"]
    with deployed(build_app(args, replicas=1, adapters_per_replica=2)):
        yield f"http://127.0.0.1:{ray_port}/v1/completions"


def serve_args(root) -> list[str]:
    return ["--model", str(root / "model"), "--adapters", str(root / "adapters")]


def request_body(index: int) -> dict:
    return body_for(f"ad{index:02d}")


def body_for(model: str, max_tokens: int = 4) -> dict:
    return dict(model=model, prompt="hello world", max_tokens=max_tokens, temperature=0)


def texts_of_one_server(root) -> dict[str, str]:
    args = build_parser().parse_args(["serve", *serve_args(root)])
    with TestClient(build(args)) as client:
        return {
            f"ad{i:02d}": client.post("/v1/completions", json=request_body(i)).json()["choices"][0][
                "text"
            ]
            for i in range(ADAPTERS)
        }


def streamed_texts(port: int, body: dict) -> list[str]:
    """The text of each server-sent event of a streamed completion ("[DONE]" for the last)."""
    texts = []
    url = f"http://127.0.0.1:{port}/v1/completions"
    with httpx.stream("POST", url, json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                texts.append(data if data == "[DONE]" else json.loads(data)["choices"][0]["text"])
    return texts


@pytest.mark.slow
def test_two_replicas_serve_50_adapters_like_one_server(world, ray_port):
    from lorakit.serve.ray_deployment import REPLICA_HEADER, build_app

    expected = texts_of_one_server(world)
    assert len(set(expected.values())) > 5  # the adapters differ
    app = build_app(serve_args(world), replicas=2, adapters_per_replica=PER_REPLICA)
    with deployed(app):

        def ask(index):
            response = httpx.post(
                f"http://127.0.0.1:{ray_port}/v1/completions", json=request_body(index), timeout=120
            )
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["text"], response.headers[REPLICA_HEADER]

        with ThreadPoolExecutor(8) as pool:
            rounds = [list(pool.map(ask, range(ADAPTERS))) for _ in range(2)]
        streamed = streamed_texts(ray_port, request_body(7) | {"stream": True})
    assert streamed[-1] == "[DONE]" and "".join(streamed[:-1]) == expected["ad07"]
    assert len(streamed) >= 3  # one event per token, then [DONE]
    replicas_of: dict[str, set[str]] = {}
    for answers in rounds:
        for index, (text, replica) in enumerate(answers):
            name = f"ad{index:02d}"
            assert text == expected[name], name
            replicas_of.setdefault(name, set()).add(replica)
    all_replicas = set().union(*replicas_of.values())
    assert len(all_replicas) == 2  # both replicas served
    copies = sum(len(replicas) for replicas in replicas_of.values())
    assert copies <= 2 * PER_REPLICA  # each replica holds at most PER_REPLICA adapters
    print("adapter copies over replicas:", copies)


@pytest.mark.slow
def test_an_adapter_that_fails_to_load_is_answered_as_by_one_server(world, one_replica):
    args = build_parser().parse_args(["serve", *serve_args(world)])
    with TestClient(build(args)) as client:
        expected = client.post("/v1/completions", json=body_for("mismatch"))
    assert expected.status_code == 400, expected.text  # the base-weights check refuses it
    answer = httpx.post(one_replica, json=body_for("mismatch"), timeout=120)
    assert answer.status_code == expected.status_code, answer.text
    assert answer.json() == expected.json()
    assert httpx.post(one_replica, json=body_for("ad00"), timeout=120).status_code == 200


@pytest.mark.slow
def test_the_replica_answer_keeps_its_headers(one_replica):
    """Eight long requests at once on one running and one waiting place: some are answered 429
    by the replica's engine, with its Retry-After (and one content-length, the ingress's)."""

    def ask(_):
        return httpx.post(one_replica, json=body_for("ad00", max_tokens=80), timeout=120)

    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):  # (a round where no request had to wait gives no 429: try again)
            answers = list(pool.map(ask, range(8)))
            busy = [answer for answer in answers if answer.status_code == 429]
            if busy:
                break
    assert busy, [answer.status_code for answer in answers]
    assert busy[0].json()["error"]["code"] == "queue_full"
    assert busy[0].headers["retry-after"] == "1"
    assert len(busy[0].headers.get_list("content-length")) <= 1


@pytest.mark.parametrize("option", [["--max-adapters", "5"], ["--max-adapters=5"]])
def test_build_app_keeps_the_users_max_adapters(option):
    from lorakit.serve.ray_deployment import build_app

    app = build_app(["--model", "m", "--adapters", "a", *option], adapters_per_replica=4)
    replica = app._bound_deployment.init_args[0]  # (Ray's Application: the bound deployment)
    replica_args = replica._bound_deployment.init_args[0]
    assert build_parser().parse_args(["serve", *replica_args]).max_adapters == 5


def test_requests_in_flight_follow_the_engines_limits_not_ray_defaults():
    """Ray Serve lets 5 requests in flight per replica by default: that capped the batch, and
    the ingress's the whole cluster, at 5 (the engine's --max-waiting 429 never came)."""
    from lorakit.serve.ray_deployment import build_app

    args = ["--model", "m", "--adapters", "a", "--max-batch", "4", "--max-waiting", "3"]
    ingress = build_app(args, replicas=3)._bound_deployment
    replica = ingress.init_args[0]._bound_deployment
    assert (replica.num_replicas, replica.max_ongoing_requests) == (3, 4 + 3 + 1)
    assert ingress.max_ongoing_requests == 3 * (4 + 3 + 1)  # one over: the engine's 429
    default = build_app(["--model", "m", "--adapters", "a"], replicas=2)._bound_deployment
    assert default.max_ongoing_requests == 2 * (32 + 128 + 1)  # lorakit serve's defaults


@pytest.mark.slow
def test_a_body_nested_too_deeply_is_answered_as_by_one_server(world, one_replica):
    """The ingress read the body with request.json(), whose RecursionError escaped as a
    plain-text 500; the replica's app answers its own 400."""
    body = b'{"model": "ad00", "prompt": "hi", "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    args = build_parser().parse_args(["serve", *serve_args(world)])
    with TestClient(build(args)) as client:
        expected = client.post("/v1/completions", content=body)
    assert expected.status_code == 400, expected.text
    answer = httpx.post(one_replica, content=body, timeout=120)
    assert answer.status_code == 400, answer.text
    assert answer.json() == expected.json()


def test_an_adapter_evicted_from_the_multiplexed_cache_is_unpinned(one_replica):
    """Ray's multiplexed cache holds 2 adapters on this replica: after requests for four,
    the bank has the last two pinned (least recently used evicted and unpinned), no more."""
    from ray import serve

    replica = serve.get_deployment_handle("LorakitReplica", app_name="lorakit")
    for name in ("ad00", "ad01", "ad02", "ad03"):
        assert httpx.post(one_replica, json=body_for(name), timeout=120).status_code == 200
        pinned = replica.resident.remote().result()
        assert len(pinned) <= 2, pinned
    assert pinned == ["ad02", "ad03"]
