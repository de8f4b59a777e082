"""Mixtures per request (issue 20 item 4): ``merged_adapters`` in a completion body, on a live
``lorakit serve`` (uvicorn on 127.0.0.1) driven by the official ``openai`` client and httpx.

A mixture's greedy output must equal that of the same combination made by ``lorakit.combine``,
saved, and served as an ordinary adapter; a mixture is combined once (``app.state.mixtures``
counts ``combine`` calls), also after the bank evicted it; mixtures run in the same batches as
other adapters; bad mixtures are 400s naming what is wrong."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import lorakit
from lorakit.cli import build_parser
from lorakit.commands.serve import build
from lorakit.io import save_adapter
from lorakit.serve.mixtures import parse_mixture
from tests import tiny_models, tiny_tokenizer
from tests.serving import assert_error, free_port

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = "tiny-base"
ADAPTERS = {  # name: LoraConfig fields (different ranks, alphas, targets, rsLoRA)
    "ad0": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "ad1": dict(r=4, lora_alpha=8, target_modules=["v_proj", "o_proj", "up_proj"]),
    "ad2": dict(r=2, lora_alpha=2, use_rslora=True, target_modules=["q_proj", "down_proj"]),
}
MIXTURES = {  # saved as ordinary adapters too: name -> (merged_adapters, combine() arguments)
    "combo-linear": (
        {"ids": ["ad0", "ad1"], "weights": [0.7, -0.4], "merge_strategy": "linear"},
        dict(weights=[0.7, -0.4], method="cat"),
    ),
    "combo-svd": (
        {"ids": ["ad0", "ad1", "ad2"], "merge_strategy": "svd", "rank": 3},
        dict(weights=None, method="svd", rank=3),
    ),
}
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A live server over a tiny Llama, the three adapters and the two combinations saved as
    adapters; 4 bank slots of rank <= 8. Yields ``(url, app)``."""
    import uvicorn

    root = tmp_path_factory.mktemp("mixtures")
    tokenizer = tiny_tokenizer.build()
    reference = tiny_models.save_llama_with_tokenizer(root / "model", tokenizer)
    for name, fields in ADAPTERS.items():
        lorakit.inject(reference, lorakit.LoraConfig(**fields), adapter_name=name)
    tiny_models.randomize_adapters(reference, std=0.3)
    for name in ADAPTERS:
        save_adapter(reference, root / "adapters", name)
    for name, (mixture, arguments) in MIXTURES.items():
        sources = [root / "adapters" / i for i in mixture["ids"]]
        lorakit.combine(sources, **arguments).save(root / "adapters" / name)
    port = free_port()
    options = ["--model", str(root / "model"), "--adapters", str(root / "adapters")]
    options += ["--port", str(port), "--max-adapters", "4", "--max-rank", "8"]
    options += ["--served-model-name", BASE, "--max-tokens-limit", "16"]
    app = build(build_parser().parse_args(["serve", *options]))
    uvicorn_server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uvicorn_server.started and time.time() < deadline:
        time.sleep(0.05)
    assert uvicorn_server.started
    yield f"http://127.0.0.1:{port}", app
    uvicorn_server.should_exit = True
    thread.join(timeout=10)


def complete(url: str, model: str, mixture: dict | None = None) -> str:
    """Greedy text of 12 tokens for ``PROMPT`` by the official client (``extra_body``)."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    answer = client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=12,
        temperature=0,
        extra_body=None if mixture is None else {"merged_adapters": mixture},
    )
    return answer.choices[0].text


def post_mixture(url: str, mixture: object, model: str = BASE) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "merged_adapters": mixture}
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


@pytest.mark.parametrize("combined", list(MIXTURES))
def test_mixture_output_equals_the_combined_adapter_served_as_an_adapter(server, combined):
    url, _ = server
    mixture, _ = MIXTURES[combined]
    got = complete(url, BASE, mixture)
    assert got == complete(url, combined)
    assert got != complete(url, BASE)  # the mixture changes the output
    assert got != complete(url, "ad0")


def test_a_mixture_is_combined_once_and_reused_after_the_bank_evicts_it(server):
    url, app = server
    mixtures, bank = app.state.mixtures, app.state.mixtures.adapters.bank
    mixture = {"ids": ["ad2", "ad0"], "weights": [1.5, 0.5], "merge_strategy": "cat"}
    before = mixtures.combined
    first = complete(url, BASE, mixture)
    assert mixtures.combined == before + 1
    assert complete(url, BASE, mixture) == first
    assert mixtures.combined == before + 1  # the cache, not a second combine
    name = mixtures.name_of(parse_mixture(mixture))
    assert name in bank.names()
    for adapter in ["ad0", "ad1", "ad2", "combo-linear"]:  # 4 slots: the mixture is evicted
        complete(url, adapter)
    assert name not in bank.names()
    assert complete(url, BASE, mixture) == first
    assert mixtures.combined == before + 1  # read back from memory
    assert complete(url, BASE, {**mixture, "weights": [1.5, 0.25]}) != first
    assert mixtures.combined == before + 2  # other weights: another mixture


def test_mixtures_share_batches_with_adapters_and_the_base(server):
    """Concurrent requests (a mixture, its saved twin, single adapters, the base) each give
    what they give alone."""
    url, _ = server
    mixture, _ = MIXTURES["combo-linear"]
    jobs = [(BASE, mixture), ("combo-linear", None), ("ad1", None), (BASE, None)] * 2
    alone = [complete(url, model, mix) for model, mix in jobs[:4]] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: complete(url, *job), jobs))
    assert together == alone
    assert alone[0] == alone[1]


def test_chat_completions_take_a_mixture(server):
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

    def chat(model: str, mixture=None) -> str:
        extra = None if mixture is None else {"merged_adapters": mixture}
        answer = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=8,
            temperature=0,
            extra_body=extra,
        )
        return answer.choices[0].message.content

    assert chat(BASE, MIXTURES["combo-svd"][0]) == chat("combo-svd")


@pytest.mark.parametrize(
    ("mixture", "param", "words"),
    [
        ({"ids": ["ad0", "nope"]}, "merged_adapters.ids", ["'nope'", "not served"]),
        ({"ids": []}, "merged_adapters.ids", ["non-empty list"]),
        ({"ids": ["ad0", "ad1"], "weights": [1.0]}, "merged_adapters.weights", ["one finite"]),
        ({"ids": ["ad0"], "weights": ["x"]}, "merged_adapters.weights", ["list of numbers"]),
        (
            {"ids": ["ad0"], "merge_strategy": "average"},
            "merged_adapters.merge_strategy",
            ["'average'", "ties"],
        ),
        ({"ids": ["ad0"], "colour": 1}, "merged_adapters.colour", ["unknown entries", "colour"]),
        ({"ids": ["ad0"], "rank": "8"}, "merged_adapters.rank", ["rank"]),
        ({"ids": ["ad0", "ad1"], "merge_strategy": "ties"}, "merged_adapters", ["density"]),
        ({"ids": ["ad1", "combo-linear"]}, "merged_adapters", ["rank 10", "max_rank 8", "'svd'"]),
        ({"ids": ["ad1", "ad1"]}, "merged_adapters.ids", ["'ad1' more than once"]),
        ("ad0+ad1", "merged_adapters", ["must be an object"]),
    ],
)
def test_bad_mixtures_are_400s_naming_what_is_wrong(server, mixture, param, words):
    url, app = server
    before = app.state.mixtures.combined
    assert_error(post_mixture(url, mixture), 400, param, *words)
    if param != "merged_adapters":  # refused before anything is read
        assert app.state.mixtures.combined == before


def test_a_mixture_goes_with_the_base_model_name(server):
    url, _ = server
    response = post_mixture(url, {"ids": ["ad0"]}, model="ad1")
    assert_error(response, 400, "model", "'tiny-base'", "merged_adapters")


def test_weights_that_blow_the_combined_factors_up_are_a_400(server):
    """What a file may not hold (beyond float16's range, inf/NaN), a mixture may not serve: a
    weight of 1e20 gave empty answers, 1e38 a 500."""
    url, _ = server
    for weight in (1e20, 1e38, 1e39):  # (1e39 is a finite float64, not a float32)
        response = post_mixture(url, {"ids": ["ad0"], "weights": [weight]})
        assert_error(response, 400, "merged_adapters.weights", "beyond +-65504", "smaller")
    assert post_mixture(url, {"ids": ["ad0"], "weights": [10.0]}).status_code == 200
