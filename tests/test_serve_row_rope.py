"""Rotary embeddings chosen from the sequence length (``dynamic``, ``longrope``) rotate every row
of a batch as that row alone (``lorakit.serve.row_rope``): batched decode and prefill in the
engine generate, for a request that passes the original context beside short ones, what
transformers' ``generate`` gives each request alone on a fresh model."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from transformers import LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

import lorakit
from lorakit.serve import AdapterBank, prepare_for_serving
from lorakit.serve.engine import Engine
from lorakit.serve.row_rope import length_dependent_rotaries, per_row
from lorakit.serve.sampling import SamplingParams
from tests import tiny_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ORIGINAL = 16  # the original context of both tiny models
# prompt lengths 3-14, 10 new tokens each: two requests pass 16 positions while others do not
PROMPTS = [[5, 9, 2], list(range(20, 34)), [7, 1, 1, 40, 3, 8], list(range(50, 61)), [9, 9, 4, 2]]
NEW_TOKENS = 10


SCALE = 0.5  # initializer_range: at transformers' 0.02 the tiny models' tokens ignore the rotation


def _phi3_longrope() -> Phi3ForCausalLM:
    half = 4  # head_dim 8
    config = Phi3Config(
        initializer_range=SCALE,
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        original_max_position_embeddings=ORIGINAL,
        pad_token_id=0,
        eos_token_id=None,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0 + 0.1 * i for i in range(half)],
            "long_factor": [2.0 + 0.5 * i for i in range(half)],
        },
    )
    torch.manual_seed(0)
    return Phi3ForCausalLM(config).eval()


def _llama_dynamic() -> LlamaForCausalLM:
    config = tiny_models.llama_config(
        rope_scaling={"rope_type": "dynamic", "factor": 2.0},
        max_position_embeddings=ORIGINAL,
        eos_token_id=None,
        initializer_range=SCALE,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _llama_longrope() -> LlamaForCausalLM:
    """A Llama config with ``longrope``: its ``generate`` keeps the cache past the original
    context (only Phi-3-like families drop it), and so does the engine."""
    half = 8  # head_dim 16
    config = tiny_models.llama_config(
        rope_scaling={
            "rope_type": "longrope",
            "short_factor": [1.0 + 0.1 * i for i in range(half)],
            "long_factor": [2.0 + 0.5 * i for i in range(half)],
            "original_max_position_embeddings": ORIGINAL,
        },
        max_position_embeddings=64,
        eos_token_id=None,
        initializer_range=SCALE,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


BUILDERS = {
    "longrope": _phi3_longrope,
    "dynamic": _llama_dynamic,
    "llama-longrope": _llama_longrope,
}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_each_row_is_rotated_as_alone_on_a_fresh_model(kind):
    build = BUILDERS[kind]
    model = build()
    (rotary,) = length_dependent_rotaries(model)
    positions = torch.tensor([[3], [40], [10], [25], [40]])
    x = torch.zeros(5, 1, model.config.hidden_size)
    alone = [build().model.rotary_emb(x[i : i + 1], positions[i : i + 1]) for i in range(5)]
    expected = [torch.cat([a[k] for a in alone]) for k in range(2)]
    before = rotary(x, positions)
    assert (before[0] - expected[0]).abs().max() > 0.1  # the batch's largest position wins
    per_row(rotary)
    per_row(rotary)  # idempotent
    after = rotary(x, positions)
    for k in range(2):
        torch.testing.assert_close(after[k], expected[k], rtol=0, atol=0)
    rotary(x[:1], torch.tensor([[60]]))  # a long call first must not leave a state behind
    torch.testing.assert_close(rotary(x[:1], positions[2:3])[0], alone[2][0], rtol=0, atol=0)
    twin = copy.deepcopy(model).model.rotary_emb
    torch.testing.assert_close(twin(x, positions)[1], expected[1], rtol=0, atol=0)


def _generate_together(engine: Engine, adapters) -> list[list[int]]:
    results, done = {}, threading.Semaphore(0)
    for index, (prompt, adapter) in enumerate(zip(PROMPTS, adapters, strict=True)):
        events = []

        def collect(event, index=index, events=events):
            events.append(event)
            if event.finish_reason is not None:
                results[index] = [i for e in events for i in e.token_ids]
                done.release()

        engine.submit(prompt, adapter, SamplingParams(max_tokens=NEW_TOKENS), collect)
    with engine:  # all admitted at the first boundary: prefilled and decoded together
        for _ in PROMPTS:
            assert done.acquire(timeout=60)
    return [results[i] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_a_batch_past_the_original_context_generates_what_each_generates_alone(kind):
    build = BUILDERS[kind]
    engine = Engine(build(), None, max_batch=8)
    assert engine._batched_prefill
    together = _generate_together(engine, [None] * len(PROMPTS))
    assert engine.stats.max_running == len(PROMPTS)
    for prompt, tokens in zip(PROMPTS, together, strict=True):
        fresh = build()
        ids = torch.tensor([prompt])
        out = fresh.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        assert tokens == out[0, len(prompt) :].tolist(), prompt


def test_adapters_from_a_bank_on_a_dynamic_rope_model_match_a_batch_of_one():
    """The same with each row routed to its own adapter: equal to the engine serving one
    request at a time (whose rotary is the fresh model's, the test above)."""
    reference = _llama_dynamic()
    spec = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    for name in ("a0", "a1"):
        lorakit.inject(reference, lorakit.LoraConfig(**spec), adapter_name=name)
    tiny_models.randomize_adapters(reference, std=0.3)

    def engine(max_batch):
        model = _llama_dynamic()
        prepare_for_serving(model, spec["target_modules"])
        bank = AdapterBank(model, max_rank=4, capacity=2)
        for name in ("a0", "a1"):
            bank.load_from_model(name, reference, name)
        return Engine(model, bank, max_batch=max_batch)

    adapters = ["a0", "a1", None, "a1", "a0"]
    together = _generate_together(engine(8), adapters)
    alone = engine(1)
    for index, adapter in enumerate(adapters):
        one = _generate_together_single(alone, PROMPTS[index], adapter)
        assert together[index] == one, index


def _generate_together_single(engine: Engine, prompt, adapter) -> list[int]:
    events, done = [], threading.Event()

    def collect(event):
        events.append(event)
        if event.finish_reason is not None:
            done.set()

    with engine:
        engine.submit(prompt, adapter, SamplingParams(max_tokens=NEW_TOKENS), collect)
        assert done.wait(60)
    return [i for e in events for i in e.token_ids]


def _finals(engine: Engine, requests, before_start=None) -> dict[int, object]:
    """Run ``requests`` ((prompt, adapter)) together; each one's final event.
    ``before_start(engine)`` runs once they are queued."""
    finals, done = {}, threading.Semaphore(0)
    for index, (prompt, adapter) in enumerate(requests):

        def collect(event, index=index):
            if event.finish_reason is not None:
                finals[index] = event
                done.release()

        engine.submit(prompt, adapter, SamplingParams(max_tokens=NEW_TOKENS), collect)
    if before_start is not None:
        before_start(engine)
    with engine:
        for _ in requests:
            assert done.acquire(timeout=30)
    return finals


def _phi3_bank_engine() -> tuple[Engine, AdapterBank]:
    reference = _phi3_longrope()
    spec = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["qkv_proj"])
    lorakit.inject(reference, spec, adapter_name="a")
    tiny_models.randomize_adapters(reference, std=0.3)
    model = _phi3_longrope()
    prepare_for_serving(model, ["qkv_proj"])
    bank = AdapterBank(model, max_rank=2, capacity=1)
    bank.load_from_model("a", reference, "a")
    return Engine(model, bank, max_batch=8), bank


def test_a_request_prefilled_again_counts_as_running(monkeypatch):
    engine, _ = _phi3_bank_engine()
    loads, again = [], engine._prefill_again

    def counted(request):
        loads.append(engine.load)
        again(request)

    monkeypatch.setattr(engine, "_prefill_again", counted)
    finals = _finals(engine, [(list(range(20, 34)), "a"), ([5, 9, 2], None)])
    assert [f.finish_reason for f in finals.values()] == ["length", "length"]
    assert loads[0] == (2, 0)  # the one prefilled again and the one still running


def test_a_failed_step_ends_the_request_waiting_to_be_prefilled_again(monkeypatch):
    """The decode step that runs beside a re-prefill fails: every request of it ends with an
    error, the one taken out for the re-prefill too, and its adapter's slot is released."""
    engine, bank = _phi3_bank_engine()
    step, taken = engine._step_running, {}

    def failing():
        long = taken["long"]
        if long.generated and not long.done and long not in engine._running:
            raise RuntimeError("step failed")  # beside the re-prefill of the long request
        step()

    def find_long(engine):
        taken["long"] = next(r for r in engine._waiting if len(r.prompt_ids) == 14)

    monkeypatch.setattr(engine, "_step_running", failing)
    requests = [(list(range(20, 34)), "a"), ([5, 9, 2], None)]
    finals = _finals(engine, requests, before_start=find_long)
    assert [finals[i].finish_reason for i in range(2)] == ["error", "error"]
    assert bank.in_use("a") == 0
    assert engine.load == (0, 0)
