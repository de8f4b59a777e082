"""``torch.compile`` of lorakit layers and of a tiny model with adapters: forward and backward,
no graph break inside a LoRA layer, same values as eager (the plain path, which the compiler
fuses itself; the eager fast path is skipped while tracing)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
import torch._dynamo
from torch import nn

import lorakit
from tests import tiny_models


def _lora_linear(dropout: float = 0.0) -> nn.Module:
    model = nn.Sequential(nn.Linear(16, 12))
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["0"], lora_dropout=dropout, init_lora_weights=False
    )
    lorakit.inject(model, config)
    tiny_models.randomize_adapters(model, std=0.3)
    return model[0]


def test_single_layer_has_no_graph_break_in_training_and_eval():
    layer = _lora_linear(dropout=0.1)
    x = torch.randn(3, 5, 16, requires_grad=True)
    for training in (True, False):
        layer.train(training)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(layer)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


@pytest.mark.slow
def test_single_layer_fullgraph_forward_and_backward_match_eager():
    layer = _lora_linear().train()
    x = torch.randn(3, 5, 16, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    params = [x, *layer.adapter_parameters("default")]
    out = compiled(x)
    eager = layer(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out)
    for got, want in zip(
        torch.autograd.grad(out, params, grad),
        torch.autograd.grad(eager, params, grad),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_tiny_model_compiles_forward_and_backward():
    model = tiny_models.llama()
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False
    )
    lorakit.inject(model, config)
    tiny_models.randomize_adapters(model, std=0.3)
    model.train()
    ids = tiny_models.input_ids(batch=2, length=8)
    trainable = [p for p in model.parameters() if p.requires_grad]
    eager_loss = model(ids, labels=ids).loss
    eager = torch.autograd.grad(eager_loss, trainable)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    loss = compiled(ids, labels=ids).loss
    grads = torch.autograd.grad(loss, trainable)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    layer = model.model.layers[0].self_attn.q_proj
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(layer)(torch.randn(2, 8, 64, requires_grad=True))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def _two_adapter_llama() -> nn.Module:
    model = tiny_models.llama()
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    lorakit.inject(model, config)
    lorakit.inject(model, config.replace(r=2), "b", activate=False)
    tiny_models.randomize_adapters(model, std=0.3)
    return model


def _assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    # compiled runs take the plain path, eager inference the fused one: same values, not bits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_model_follows_disabled_and_use_adapters():
    """The per-call choice is an input of the compiled graph (guarded), not baked in."""
    model = _two_adapter_llama()
    ids = tiny_models.input_ids()
    with torch.no_grad():
        active_out = model(input_ids=ids).logits
        with lorakit.disabled(model):
            base_out = model(input_ids=ids).logits
        with lorakit.use_adapters(model, ["b"]):
            b_out = model(input_ids=ids).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager")
        _assert_same(compiled(input_ids=ids).logits, active_out)
        with lorakit.disabled(model):
            _assert_same(compiled(input_ids=ids).logits, base_out)
        with lorakit.use_adapters(model, ["b"]):
            _assert_same(compiled(input_ids=ids).logits, b_out)
        _assert_same(compiled(input_ids=ids).logits, active_out)
    assert not torch.equal(base_out, active_out) and not torch.equal(b_out, active_out)


@pytest.mark.slow
def test_compiled_model_follows_disabled_while_merged():
    model = _two_adapter_llama()
    ids = tiny_models.input_ids()
    with torch.no_grad():
        with lorakit.disabled(model):
            base_out = model(input_ids=ids).logits
        lorakit.merge(model)
        merged_out = model(input_ids=ids).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager")
        _assert_same(compiled(input_ids=ids).logits, merged_out)
        with lorakit.disabled(model):
            _assert_same(compiled(input_ids=ids).logits, base_out)


@pytest.mark.slow
def test_compiled_choice_stays_in_its_thread_and_task():
    """Per thread through the guarded record; blocks of two asyncio tasks interleaved on one
    thread make compiled code read each task's own choice (outside the graph)."""
    model = _two_adapter_llama()
    ids = tiny_models.input_ids()
    with torch.no_grad():
        active_out = model(input_ids=ids).logits
        with lorakit.use_adapters(model, ["b"]):
            b_out = model(input_ids=ids).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager")
        seen = {}
        with lorakit.use_adapters(model, ["b"]):
            worker = threading.Thread(
                target=lambda: seen.update(other=compiled(input_ids=ids).logits)
            )
            worker.start()
            worker.join()
            seen["this"] = compiled(input_ids=ids).logits
        _assert_same(seen["other"], active_out)
        _assert_same(seen["this"], b_out)

        async def run(names, entered, other_entered):
            with lorakit.use_adapters(model, names):
                entered.set()
                await other_entered.wait()  # both blocks open: the tasks interleave
                return compiled(input_ids=ids).logits

        async def both():
            first, second = asyncio.Event(), asyncio.Event()
            return await asyncio.gather(run(["b"], first, second), run([], second, first))

        in_b, in_base = asyncio.run(both())
        _assert_same(in_b, b_out)
        with lorakit.disabled(model):
            _assert_same(in_base, model(input_ids=ids).logits)
        _assert_same(compiled(input_ids=ids).logits, active_out)


@pytest.mark.slow
def test_a_task_without_a_block_is_not_given_another_tasks_choice():
    """Task A holds use_adapters(model, ["b"]) open across an await; task B, with no block of
    its own, ran the compiled model with A's "b" (eager: its own "default")."""
    model = _two_adapter_llama()
    ids = tiny_models.input_ids()
    with torch.no_grad():
        active_out = model(input_ids=ids).logits
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")

    async def holding_b(entered, done):
        with lorakit.use_adapters(model, ["b"]):
            entered.set()
            await done.wait()

    async def without_block(entered, done):
        await entered.wait()
        with torch.no_grad():
            out = compiled(input_ids=ids).logits
        done.set()
        return out

    async def both():
        entered, done = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(holding_b(entered, done), without_block(entered, done))

    _, seen = asyncio.run(both())
    _assert_same(seen, active_out)


def test_lorakit_functions_take_a_compiled_model():
    """torch.compile's wrapper holds no lorakit state: inject on it wrote an empty state over
    the model's own (its adapters lost to set_active / save), and active_adapters, set_active,
    save_adapter said "this model has []". They now work on the module it compiled."""
    model = _two_adapter_llama()
    compiled = torch.compile(model, backend="eager")
    assert lorakit.active_adapters(compiled) == lorakit.active_adapters(model) != ()
    lorakit.inject(compiled, lorakit.LoraConfig(r=2, target_modules=["k_proj"]), "z")
    assert set(lorakit.adapter_configs(model)) == {"default", "b", "z"}
    lorakit.set_active(compiled, ["b"])
    assert lorakit.active_adapters(model) == ("b",)
    lorakit.delete_adapter(compiled, "z")
    assert set(lorakit.adapter_configs(model)) == {"default", "b"}
