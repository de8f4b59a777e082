"""Serving on a quantized base (QLoRA adapters): ``lorakit serve --quantization`` as a live
uvicorn driven by the ``openai`` client on the tiny Llama loaded as bitsandbytes NF4 / LLM.int8
or lorakit's weight-only int8 (``int8-rows``), and the adapter bank's batched op on GGUF-block
layers. A request with an adapter gives the same
greedy tokens as the unmerged quantized model holding that adapter, generated alone."""

from __future__ import annotations

import threading
import time

import openai
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import LlamaForCausalLM

import lorakit
from lorakit.cli import build_parser
from lorakit.commands.serve import build
from lorakit.errors import BaseModelMismatchError, UserError
from lorakit.io import load_adapter, save_adapter
from lorakit.models import load_model
from lorakit.quantized import describe, is_quantized
from lorakit.serve import AdapterBank, prepare_for_serving, routed
from lorakit.serve.app import ServerSettings, create_app
from lorakit.serve.engine import Engine
from lorakit.serve.registry import AdapterRegistry, ServedAdapters
from lorakit.state import lora_layers
from tests import quantized_layers, tiny_models
from tests.serving import free_port

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = ["Review: good film\nSentiment:", "hello there", "a b c"]
ADAPTERS = {"qv": ["q_proj", "v_proj"], "mlp": ["up_proj", "down_proj", "o_proj"]}


def write_adapters(model, root) -> None:
    """Two adapters (random factors, so they change the output) trained on ``model``'s base."""
    for name, targets in ADAPTERS.items():
        lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=targets), adapter_name=name)
    tiny_models.randomize_adapters(model, std=0.5)
    for name in ADAPTERS:
        save_adapter(model, root, name)  # -> root/<name>


def greedy(model, tokenizer, prompt: str, max_tokens: int) -> str:
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


FORMATS = {"nf4": "bnb-nf4-dq", "int8": "bnb-int8", "int8-rows": "int8-rows"}


@pytest.fixture(scope="module", params=list(FORMATS))
def quantized_server(request, tmp_path_factory, model_dir):
    """``lorakit serve --quantization <q>`` live on 127.0.0.1 over two adapters trained on the
    same quantized base."""
    import uvicorn

    quantization = request.param
    root = tmp_path_factory.mktemp(f"serve-{quantization}")
    trained, _ = load_model(model_dir, quantization=quantization, progress=False)
    write_adapters(trained, root / "adapters")
    port = free_port()
    argv = ["serve", "--model", str(model_dir), "--adapters", str(root / "adapters")]
    argv += ["--port", str(port), "--quantization", quantization, "--max-batch", "8"]
    server = uvicorn.Server(
        uvicorn.Config(build(build_parser().parse_args(argv)), port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    yield quantization, root / "adapters", f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.slow
def test_served_adapters_on_a_quantized_base_match_the_unmerged_quantized_model(
    quantized_server, model_dir
):
    quantization, adapters, url = quantized_server
    api = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    reference, tokenizer = load_model(model_dir, quantization=quantization, progress=False)
    formats = {describe(m) for m in reference.modules() if is_quantized(m)}
    assert formats == {FORMATS[quantization]}
    for name in ADAPTERS:
        load_adapter(reference, adapters / name, adapter_name=name)
    outputs = {}
    for adapter in [*ADAPTERS, None]:
        names = [] if adapter is None else [adapter]
        for prompt in PROMPTS:
            got = api.completions.create(
                model=adapter or model_dir.name, prompt=prompt, max_tokens=6, temperature=0
            )
            with lorakit.use_adapters(reference.eval(), names):
                expected = greedy(reference, tokenizer, prompt, 6)
            assert got.choices[0].text == expected, (adapter, prompt)
            outputs[adapter, prompt] = expected
    for prompt in PROMPTS:  # the adapters change what the base says
        assert len({outputs[a, prompt] for a in [*ADAPTERS, None]}) > 1


@pytest.mark.slow
def test_an_adapter_trained_on_a_float_base_is_refused_by_a_quantized_server(
    quantized_server, model_dir, tmp_path
):
    quantization = quantized_server[0]
    float_model = tiny_models.llama()  # the saved model_dir's weights, in float
    lorakit.inject(float_model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    save_adapter(float_model, tmp_path / "float-adapter")
    reference, _ = load_model(model_dir, quantization=quantization, progress=False)
    prepare_for_serving(reference, ["q_proj"])
    served = ServedAdapters(
        AdapterBank(reference, max_rank=4, capacity=2), AdapterRegistry(tmp_path), reference
    )
    with pytest.raises(BaseModelMismatchError, match="q_proj"):
        served.read("float-adapter")


def gguf_llama(tokenizer):
    """The tiny Llama (vocabulary of ``tokenizer``) with every block linear as Q4_1 blocks."""
    torch.manual_seed(0)
    config = tiny_models.llama_config(
        vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id
    )
    return quantized_layers.quantize_linears(LlamaForCausalLM(config).eval(), "gguf-Q4_1")


@pytest.mark.slow
def test_the_bank_routes_adapters_on_gguf_blocks_like_the_unmerged_model(tmp_path):
    from tests import tiny_tokenizer

    tokenizer = tiny_tokenizer.build()
    trained = gguf_llama(tokenizer)
    write_adapters(trained, tmp_path / "adapters")
    model = gguf_llama(tokenizer)
    prepare_for_serving(model, sorted({t for ts in ADAPTERS.values() for t in ts}))
    bank = AdapterBank(model, max_rank=4, capacity=2)
    assert bank.dtype == torch.float32
    adapters = ServedAdapters(bank, AdapterRegistry(tmp_path / "adapters"), model)
    engine = Engine(model, bank, tokenizer, max_batch=4, adapter_loader=adapters.read)
    settings = ServerSettings(
        model_name="base",
        admin_token=None,
        max_prompt_tokens=40,
        max_tokens_limit=8,
        max_positions=128,
    )
    reference = gguf_llama(tokenizer)
    for name in ADAPTERS:
        load_adapter(reference, tmp_path / "adapters" / name, adapter_name=name)
    app = create_app(engine, adapters, tokenizer, settings)
    with TestClient(app) as client:  # runs the lifespan: starts and stops the engine
        for adapter in ADAPTERS:
            for prompt in PROMPTS:
                body = {"model": adapter, "prompt": prompt, "max_tokens": 6, "temperature": 0}
                got = client.post("/v1/completions", json=body)
                assert got.status_code == 200, got.text
                with lorakit.use_adapters(reference, [adapter]):
                    expected = greedy(reference, tokenizer, prompt, 6)
                assert got.json()["choices"][0]["text"] == expected, (adapter, prompt)


@pytest.mark.slow
def test_a_dora_adapter_served_on_gguf_blocks_uses_the_dequantized_base_norms():
    from tests import tiny_tokenizer

    tokenizer = tiny_tokenizer.build()
    model = gguf_llama(tokenizer)
    twin = quantized_layers.dequantized_twin(model)
    config = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True)
    lorakit.inject(twin, config, adapter_name="dora")
    tiny_models.randomize_adapters(twin, std=0.3)
    with torch.no_grad():
        for _, layer in lora_layers(twin):
            layer.lora_magnitude_vector["dora"].weight.mul_(1.5)  # f != 1: the gain matters
    prepare_for_serving(model, ["q_proj"])
    bank = AdapterBank(model, max_rank=2, capacity=1)
    slot = bank.load_from_model("dora", twin, "dora")
    ids = tiny_models.input_ids(vocab=len(tokenizer))
    with torch.no_grad():
        base = model(ids).logits
        with routed(bank, torch.full(ids.shape, slot)):
            served = model(ids).logits
        expected = twin(ids).logits
    assert (served - base).abs().max() > 1e-2
    torch.testing.assert_close(served, expected, rtol=1e-4, atol=1e-4)


def test_serve_refuses_gguf_on_a_model_without_a_gguf_file_before_loading(
    tmp_path, model_dir, monkeypatch
):
    import lorakit.models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(lorakit.models, "load_model", no_loading)
    argv = ["serve", "--model", str(model_dir), "--adapters", str(tmp_path)]
    args = build_parser().parse_args([*argv, "--quantization", "gguf"])
    with pytest.raises(UserError, match="this model has no GGUF file"):
        build(args)
