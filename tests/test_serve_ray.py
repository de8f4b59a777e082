"""lorakit's engine as a Ray Serve deployment (``lorakit.serve.ray_deployment``): a local Ray
cluster, two replicas, 50 adapters; requests are routed by adapter (model multiplexing), each
adapter lives on a bounded number of replicas, and the answers are those of one lorakit server."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

import lorakit
from lorakit.cli import build_parser
from lorakit.commands.serve import build
from lorakit.io import save_adapter
from tests import tiny_models
from tests.serving import base_model, free_port
from tests.test_serve_server import tiny_tokenizer

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

pytestmark = pytest.mark.slow

ADAPTERS, TEMPLATES, PER_REPLICA = 50, 10, 30


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model directory and 50 adapters (10 distinct, q/v and all-linear, ranks 2-8)."""
    root = tmp_path_factory.mktemp("ray")
    tokenizer = tiny_tokenizer()
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
    return root


def serve_args(root) -> list[str]:
    return ["--model", str(root / "model"), "--adapters", str(root / "adapters")]


def request_body(index: int) -> dict:
    return dict(model=f"ad{index:02d}", prompt="hello world", max_tokens=4, temperature=0)


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


def test_two_replicas_serve_50_adapters_like_one_server(world):
    from lorakit.serve.ray_deployment import REPLICA_HEADER, build_app

    expected = texts_of_one_server(world)
    assert len(set(expected.values())) > 5  # the adapters differ
    port = free_port()
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(serve_args(world), replicas=2, adapters_per_replica=PER_REPLICA)
        serve.run(app, name="lorakit", route_prefix="/")

        def ask(index):
            response = httpx.post(
                f"http://127.0.0.1:{port}/v1/completions", json=request_body(index), timeout=120
            )
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["text"], response.headers[REPLICA_HEADER]

        with ThreadPoolExecutor(8) as pool:
            rounds = [list(pool.map(ask, range(ADAPTERS))) for _ in range(2)]
        streamed = streamed_texts(port, request_body(7) | {"stream": True})
    finally:
        serve.shutdown()
        ray.shutdown()
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
