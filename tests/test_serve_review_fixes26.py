"""Serving fixes of review 26: vLLM's ``top_k``, ``min_p`` and ``stop_token_ids`` implemented
(they were accepted and silently ignored), a 16-bit bank's DoRA computed from the rounded
adapter, and out-of-vocabulary prompt ids refused by name (they raised an internal IndexError).

The sampling filters are checked against a float64 formula of vLLM's order (temperature, min-p,
top-k, top-p renormalised) on the logits of a tiny model, and through the live HTTP server."""

from __future__ import annotations

import shutil
import threading

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import LlamaForCausalLM

import lorakit
from lorakit.serve import AdapterBank, prepare_for_serving, routed
from lorakit.serve import sampling as sampling_module
from lorakit.serve.app import ServerSettings, create_app
from lorakit.serve.engine import Engine
from lorakit.serve.protocol import APIError, parse_job
from lorakit.serve.registry import AdapterRegistry, ServedAdapters
from lorakit.serve.sampling import SamplingParams, next_token
from lorakit.state import lora_layers
from tests import tiny_models
from tests.serving import BASE, Served, assert_error, free_port, wait_until

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = [5, 6, 7, 8]


def params(**fields) -> SamplingParams:
    """``SamplingParams`` built field by field (old code: a ``TypeError`` on the new fields)."""
    return SamplingParams(**fields)


@pytest.fixture(scope="module")
def model():
    """A tiny random Llama with no EOS (full lengths), and its last-position logits of PROMPT."""
    llama = tiny_models.llama()
    llama.generation_config.eos_token_id = None
    with torch.no_grad():
        logits = llama(torch.tensor([PROMPT])).logits[0, -1]
    return llama, logits


def expected_probs(logits, temperature, top_k=0, min_p=0.0, top_p=1.0) -> torch.Tensor:
    """vLLM's sampling distribution in float64, written out: softmax(l / T); min-p keeps
    p >= min_p max(p); top-k keeps p >= the k-th largest; top-p (renormalised) keeps the
    tokens whose mass of strictly more likely tokens is < top_p; renormalised."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if min_p > 0:
        keep &= probs >= min_p * probs.max()
    if 0 < top_k < len(probs):
        keep &= probs >= torch.sort(probs[keep], descending=True).values[top_k - 1]
    if top_p < 1:
        kept = torch.where(keep, probs, 0.0) / torch.where(keep, probs, 0.0).sum()
        for token in range(len(probs)):
            above = kept[kept > kept[token]].sum()
            keep[token] &= bool(above < top_p)
    out = torch.where(keep, probs, 0.0)
    return out / out.sum()


def draws(logits, sampling: SamplingParams, count: int) -> list[int]:
    """``count`` tokens drawn by ``next_token``, one fresh seeded generator each."""
    return [
        next_token(logits, sampling, torch.Generator().manual_seed(seed)) for seed in range(count)
    ]


# ----------------------------------------------------------------- top_k, min_p: the sampler


@pytest.mark.parametrize("k", [2, 5])
def test_top_k_draws_only_the_k_most_likely_tokens_in_their_renormalised_shares(model, k):
    _, logits = model
    tokens = draws(logits, params(temperature=1.5, top_k=k), 3000)
    top = set(torch.topk(logits, k).indices.tolist())
    assert set(tokens) == top  # all k drawn, nothing else
    want = expected_probs(logits, 1.5, top_k=k)
    for token in top:
        assert tokens.count(token) / len(tokens) == pytest.approx(float(want[token]), abs=0.03)


def test_min_p_draws_only_tokens_within_min_p_of_the_top_one(model):
    _, logits = model
    tokens = draws(logits, params(temperature=2.0, min_p=0.6), 3000)
    want = expected_probs(logits, 2.0, min_p=0.6)
    allowed = set(torch.nonzero(want).flatten().tolist())
    assert 2 <= len(allowed) < len(logits)  # the cut is a real one on these logits
    assert set(tokens) == allowed
    for token in allowed:
        assert tokens.count(token) / len(tokens) == pytest.approx(float(want[token]), abs=0.03)


@pytest.mark.parametrize(
    "fields",
    [
        dict(top_k=3),
        dict(min_p=0.3),
        dict(top_k=6, top_p=0.5),
        dict(min_p=0.2, top_k=4, top_p=0.8),
        dict(top_k=-1, min_p=0.0),
        dict(top_k=500),  # beyond the vocabulary: off
    ],
)
def test_the_filtered_distribution_is_vllms_formula(model, fields):
    _, logits = model
    probs = torch.softmax(logits.double() / 1.7, dim=-1)
    got = sampling_module.filtered_probs(probs, params(temperature=1.7, **fields))
    want = expected_probs(logits, 1.7, **fields)
    torch.testing.assert_close(got / got.sum(), want, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------- through the engine


def test_top_k_1_at_temperature_1_gives_the_greedy_tokens(model):
    llama, _ = model
    with Engine(llama, None, max_batch=4) as engine:
        greedy, _, _ = engine.generate(PROMPT, None, params(max_tokens=8))
        for seed in range(3):
            sampled, _, _ = engine.generate(
                PROMPT, None, params(max_tokens=8, temperature=1.0, top_k=1, seed=seed)
            )
            assert sampled == greedy
        # without top_k the same seeds do not follow the greedy path (the cut did the work)
        free = [
            engine.generate(PROMPT, None, params(max_tokens=8, temperature=1.0, seed=s))[0]
            for s in range(3)
        ]
    assert any(ids != greedy for ids in free)


def test_first_tokens_over_many_seeds_are_among_the_reference_top_k(model):
    llama, logits = model
    top = set(torch.topk(logits, 3).indices.tolist())
    firsts, done = [], threading.Event()

    def collect(event):
        if event.finish_reason is not None:
            firsts.append(event)
            if len(firsts) == 40:
                done.set()

    with Engine(llama, None, max_batch=8) as engine:
        for seed in range(40):
            sampling = params(max_tokens=1, temperature=2.0, top_k=3, seed=seed)
            engine.submit(PROMPT, None, sampling, collect)
        assert done.wait(timeout=60)
    tokens = [event.token_ids[0] for event in firsts]
    assert set(tokens) == top


def test_seeded_filtered_sampling_does_not_depend_on_the_batch(model):
    llama, _ = model
    sampling = params(max_tokens=6, temperature=1.5, top_k=5, min_p=0.05, top_p=0.95, seed=7)
    with Engine(llama, None, max_batch=4) as engine:
        alone, _, _ = engine.generate(PROMPT, None, sampling)
        crowd = [
            engine.submit([9, 9], None, params(max_tokens=8, temperature=1.0, seed=i), print)
            for i in range(3)
        ]
        again, _, _ = engine.generate(PROMPT, None, sampling)
    assert crowd and alone == again and len(alone) == 6


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_stop_token_ids_end_generation_without_the_stop_token(model, temperature):
    llama, _ = model
    sampling = dict(max_tokens=10, temperature=temperature, seed=5)
    with Engine(llama, None, max_batch=2) as engine:
        full, _, _ = engine.generate(PROMPT, None, params(**sampling))
        cut = next(i for i in range(1, len(full)) if full[i] not in full[:i])
        ids, _, last = engine.generate(
            PROMPT, None, params(**sampling, stop_token_ids=(full[cut],))
        )
    assert ids == full[:cut]  # the same draws up to the stop token, which is left out
    assert last.finish_reason == "stop" and last.completion_tokens == cut


# ----------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": "0.1"}, "min_p"),
        ({"stop_token_ids": 3}, "stop_token_ids"),
        ({"stop_token_ids": [1.5]}, "stop_token_ids"),
        ({"stop_token_ids": [True]}, "stop_token_ids"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_bad_filter_values_are_a_400_naming_the_field(extra, param):
    body = {"model": "base", "prompt": "hi", "temperature": 1.0} | extra
    with pytest.raises(APIError) as raised:
        parse_job(body, chat=False, max_tokens_limit=16)
    assert raised.value.status == 400 and raised.value.param == param


def test_good_filter_values_reach_the_sampling_params():
    body = {"model": "m", "prompt": "hi", "top_k": 4, "min_p": 0.25, "stop_token_ids": [3, 9]}
    job = parse_job(body, chat=False, max_tokens_limit=16)
    assert (job.params.top_k, job.params.min_p, job.params.stop_token_ids) == (4, 0.25, (3, 9))
    off = parse_job({"model": "m", "prompt": "hi", "top_k": -1}, chat=False, max_tokens_limit=9)
    assert (off.params.top_k, off.params.min_p, off.params.stop_token_ids) == (-1, 0.0, ())


# ----------------------------------------------------------------- the live HTTP server


@pytest.fixture(scope="module")
def live(adapter_files, tmp_path_factory):
    """``Served`` over a copy of the adapters, run by uvicorn; ``.url``."""
    import uvicorn

    root, tokenizer = adapter_files
    copy_root = tmp_path_factory.mktemp("live26")
    shutil.copytree(root / "adapters", copy_root / "adapters")
    served = Served(copy_root, tokenizer)
    server = uvicorn.Server(
        uvicorn.Config(served.app, host="127.0.0.1", port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started)
    served.url = f"http://127.0.0.1:{server.config.port}"
    yield served
    server.should_exit = True
    thread.join(timeout=10)


def complete(served, **fields) -> httpx.Response:
    body = {"model": "ad0", "prompt": "hello world", "max_tokens": 6, **fields}
    return httpx.post(served.url + "/v1/completions", json=body, timeout=60)


def test_http_top_k_1_is_greedy_and_stop_token_ids_stop(live):
    greedy = complete(live, temperature=0).json()["choices"][0]
    for seed in (1, 2):
        sampled = complete(live, temperature=1.0, top_k=1, seed=seed).json()["choices"][0]
        assert sampled["text"] == greedy["text"]
    prompt = live.tokenizer.encode("hello world")  # as the server tokenizes it
    ids, text, _ = live.engine.generate(prompt, "ad0", params(max_tokens=6))
    assert text == greedy["text"]
    cut = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
    stopped = complete(live, temperature=0, stop_token_ids=[ids[cut]]).json()["choices"][0]
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == live.tokenizer.decode(ids[:cut], skip_special_tokens=True)


def test_http_bad_filters_and_stop_ids_outside_the_vocabulary_are_400(live):
    vocab = len(live.tokenizer)
    assert_error(complete(live, top_k=-3), 400, "top_k", "top_k")
    assert_error(complete(live, min_p=2), 400, "min_p", "min_p")
    assert_error(
        complete(live, stop_token_ids=[1, vocab]), 400, "stop_token_ids", str(vocab), "position 1"
    )


# ----------------------------------------------------------------- out-of-vocabulary prompts


def test_engine_submit_names_an_out_of_vocabulary_prompt_id(model):
    llama, _ = model
    engine = Engine(llama, None)  # not started: submit checks before queueing
    with pytest.raises(ValueError, match=r"id 128 at position 2 .*\[0, 128\)"):
        engine.submit([5, 6, 128, 7], None, params(), print)
    with pytest.raises(ValueError, match=r"id -1 at position 0"):
        engine.submit([-1], None, params(), print)
    with pytest.raises(ValueError, match=r"stop_token_ids id 200 at position 0"):
        engine.submit([5], None, params(stop_token_ids=(200,)), print)
    assert engine.load == (0, 0)  # nothing was queued


def test_http_prompt_ids_beyond_the_models_embedding_rows_are_a_400(adapter_files):
    """A tokenizer with more ids than the model has embedding rows: an id between the two was
    let through and failed inside the model (IndexError, a 500)."""
    root, tokenizer = adapter_files
    torch.manual_seed(0)
    rows = len(tokenizer) - 8
    small = LlamaForCausalLM(tiny_models.llama_config(vocab_size=rows)).eval()
    prepare_for_serving(small, ["q_proj", "v_proj"])
    bank = AdapterBank(small, max_rank=4, capacity=1)
    adapters = ServedAdapters(bank, AdapterRegistry(root / "adapters"), small)
    engine = Engine(small, bank, tokenizer, max_batch=2)
    settings = ServerSettings(model_name=BASE, max_prompt_tokens=40, max_tokens_limit=8)
    client = TestClient(create_app(engine, adapters, tokenizer, settings))
    with client:
        body = {"model": BASE, "prompt": [5, rows + 1], "max_tokens": 2}
        response = client.post("/v1/completions", json=body)
        assert_error(response, 400, "prompt", str(rows + 1), "position 1", f"[0, {rows})")
        body["prompt"] = [5, rows - 1]
        assert client.post("/v1/completions", json=body).status_code == 200


# ----------------------------------------------------------------- DoRA in a bfloat16 bank


def dora_reference():
    """A tiny Llama with a DoRA adapter "d" on up_proj: B != 0, m away from ||W0||."""
    reference = tiny_models.llama()
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["up_proj"], use_dora=True)
    lorakit.inject(reference, config, adapter_name="d")
    tiny_models.randomize_adapters(reference, std=0.3)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _, layer in lora_layers(reference):
            magnitude = layer.adapter_parameters("d")[2]
            noise = torch.randn(magnitude.shape, generator=generator)
            magnitude.copy_(layer.base_layer.weight.norm(dim=1) * (1 + 0.3 * noise))
    return reference


def test_a_bfloat16_banks_dora_is_the_rounded_adapters_dora_but_for_rounding_f_b():
    """y = f (W0 x) + s (f B)_bf16 A x with A, B, m the bf16-rounded factors and
    f = m / ||W0 + s B A||_row: within float32 error plus one bf16 rounding of f B
    (|(f B)_bf16 - f B| <= 2^-8 |f B| elementwise)."""
    reference = dora_reference()
    served = tiny_models.llama()
    prepare_for_serving(served, ["up_proj"])
    bank = AdapterBank(served, max_rank=4, capacity=1, dtype=torch.bfloat16)
    bank.load_from_model("d", reference, "d")
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for name, layer in lora_layers(served):
        lora_A, lora_B, magnitude = (
            p.detach().to(torch.bfloat16).double()
            for p in dict(lora_layers(reference))[name].adapter_parameters("d")
        )
        weight, scale = layer.base_layer.weight.double(), 8 / 4
        factor = magnitude / (weight + scale * lora_B @ lora_A).norm(dim=1)  # (d,)
        base = x @ weight.T  # (6, d)
        want = factor * base + scale * (x @ lora_A.T) @ (factor[:, None] * lora_B).T
        with torch.no_grad(), routed(bank, torch.full((6,), bank.slot_of("d"))):
            got = layer(x.float()).double()
        one_rounding = scale * 2.0**-8 * (x @ lora_A.T).abs() @ (factor[:, None] * lora_B).abs().T
        float32 = 1e-5 * (base.abs() * factor.abs() + 1)
        assert torch.all((got - want).abs() <= one_rounding + float32), name
