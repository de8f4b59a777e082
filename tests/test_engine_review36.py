"""Review 36 (engine): hybrid models in a continuous batch, ``bias`` on LoRA layers, and the
generation config of ``lorakit generate --temperature``; each checked against peft or
transformers.

1. Requests of models with state-space, convolution or linear-attention layers (Lfm2, Lfm3 with
   a sliding window, Jamba, Bamba, Qwen3-Next, Zaya, Mamba) join and leave a running batch: their
   greedy tokens equal each request alone through peft's ``generate`` (joins once failed with
   AttributeError: ``LinearAttentionLayer`` has no ``keys``).
2. A LoRA layer exposes its base layer's ``bias`` (Mamba and Jamba read ``dt_proj.bias``):
   logits and gradients equal peft's on all-linear targets.
3. ``--temperature T`` samples from the full softmax(logits / T) whatever the model's
   ``generation_config`` sets (``top_h`` and the logits processors passed through).
"""

from __future__ import annotations

import copy
import inspect
import re

import peft
import pytest
import torch
import transformers as T
from transformers import GenerationConfig
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

import lorakit
from lorakit.commands.generate import generate_text
from lorakit.io.read import read_adapter
from lorakit.layers import LoraLayer
from lorakit.serve import AdapterBank, prepare_for_serving
from lorakit.serve.engine import Engine
from lorakit.serve.kv import ConcatenatedCache
from tests import serving, tiny_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZES = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    initializer_range=0.15,
)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MAMBA = dict(hidden_size=32, num_hidden_layers=2, vocab_size=128, state_size=4)
MODELS = {  # name: (model, LoRA targets: peft's all-linear where peft takes it)
    "lfm2 (conv)": (
        lambda: T.Lfm2ForCausalLM(
            T.Lfm2Config(**SIZES, layer_types=["conv", "full_attention", "conv"])
        ),
        "all-linear",
    ),
    "lfm3 (conv, sliding window 3)": (
        lambda: T.Lfm3ForCausalLM(
            T.Lfm3Config(
                **SIZES,
                pad_token_id=0,
                sliding_window=3,
                layer_types=["conv", "sliding_attention", "full_attention"],
            )
        ),
        ATTENTION,
    ),
    "jamba (mamba, dt_proj adapted)": (
        lambda: T.JambaForCausalLM(
            T.JambaConfig(
                **SIZES,
                attn_layer_period=2,
                attn_layer_offset=1,
                expert_layer_period=100,
                num_experts=1,
                mamba_d_state=4,
                mamba_expand=2,
                use_mamba_kernels=False,
            )
        ),
        "all-linear",
    ),
    "bamba (mamba2)": (
        lambda: T.BambaForCausalLM(
            T.BambaConfig(
                **SIZES,
                attn_layer_indices=[1],
                mamba_n_heads=4,
                mamba_d_head=16,
                mamba_n_groups=1,
                mamba_d_state=8,
                mamba_chunk_size=16,
            )
        ),
        ATTENTION,
    ),
    "qwen3_next (linear attention)": (
        lambda: T.Qwen3NextForCausalLM(
            T.Qwen3NextConfig(
                **SIZES,
                head_dim=8,
                layer_types=["linear_attention", "full_attention", "linear_attention"],
                linear_num_value_heads=4,
                linear_num_key_heads=2,
                linear_key_head_dim=8,
                linear_value_head_dim=8,
                num_experts=0,
                mlp_only_layers=[0, 1, 2],
            )
        ),
        ATTENTION,
    ),
    "zaya (hybrid, hybrid sliding 3)": (
        lambda: T.ZayaForCausalLM(
            T.ZayaConfig(
                **SIZES, layer_types=["hybrid", "hybrid_sliding", "hybrid"], sliding_window=3
            )
        ),
        ATTENTION,
    ),
    "mamba (no attention)": (
        lambda: T.MambaForCausalLM(T.MambaConfig(**MAMBA, use_mambapy=False)),
        ["in_proj", "x_proj", "dt_proj"],  # peft refuses out_proj and conv1d on Mamba
    ),
}
# (prompt length, adapter, new tokens): 7 requests, at most 3 running: joins while others
# run, rows leaving from the middle and the front, rows of other lengths
JOBS = [
    (5, "a0", 6),
    (9, None, 3),
    (2, "a1", 8),
    (12, "a0", 5),
    (1, None, 7),
    (7, "a1", 2),
    (4, "a0", 6),
]


def _peft_and_served(name: str, tmp_path):
    """(peft model with adapters a0, a1 of random B: the oracle, an Engine over a copy of the
    base serving both from a bank, loaded from peft's files)."""
    make, targets = MODELS[name]
    torch.manual_seed(0)
    base = make().eval()
    base.generation_config.eos_token_id = None
    base.generation_config.pad_token_id = 0
    served = copy.deepcopy(base)
    oracle = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets), "a0"
    )
    oracle.add_adapter("a1", peft.LoraConfig(r=2, lora_alpha=8, target_modules=targets))
    serving.randomize_peft_lora(oracle)
    oracle.eval().save_pretrained(tmp_path)
    prepare_for_serving(served, targets)
    bank = AdapterBank(served, max_rank=4, capacity=2)
    for adapter in ("a0", "a1"):
        file = read_adapter(tmp_path / adapter)
        bank.load(adapter, file.config, file.tensors)
    return oracle, Engine(served, bank, max_batch=3, eos_token_ids=[])


# ----------------------------------------------------------------- 1. hybrid models, batched
@pytest.mark.parametrize("name", list(MODELS))
def test_hybrid_requests_joining_a_running_batch_equal_peft_alone(name, tmp_path):
    oracle, engine = _peft_and_served(name, tmp_path)
    generator = torch.Generator().manual_seed(7)
    jobs = [
        (torch.randint(1, 128, (length,), generator=generator).tolist(), adapter, new)
        for length, adapter, new in JOBS
    ]
    events = serving.engine_events(engine, jobs)  # three run; the others join as rows leave
    for (prompt, adapter, new), row_events in zip(jobs, events, strict=True):
        assert row_events[-1].finish_reason == "length", row_events[-1].error
        ids = [token for event in row_events for token in event.token_ids]
        assert ids == serving.peft_greedy(oracle, prompt, adapter, new)
    assert engine.stats.joined_running > 0 and engine.stats.max_running == 3


def test_a_layer_type_that_cannot_be_joined_is_refused_by_name_leaving_the_batch():
    """A cache layer of another type (here a static one) is refused before anything changes."""
    batch, first = ConcatenatedCache(), Cache(layers=[DynamicLayer()])
    first.update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4), 0)
    batch.add(first, 3)
    other = Cache(layers=[StaticLayer(max_cache_len=8)])
    other.update(torch.ones(1, 2, 5, 4), torch.ones(1, 2, 5, 4), 0)
    with pytest.raises(ValueError, match="cache layer 0 is a StaticLayer, which lorakit cannot"):
        batch.add(other, 5)
    assert batch.rows == 1 and batch.mask.tolist() == [[1, 1, 1]]
    assert batch.cache.layers[0].keys.shape == (1, 2, 3, 4)


# ----------------------------------------------------------------- 2. bias on LoRA layers
LEAVES = ("dt_proj", "x_proj")  # Mamba mixers' LoRA layers on bases with and without a bias


@pytest.mark.parametrize(
    "name, targets",
    [
        ("jamba (mamba, dt_proj adapted)", "all-linear"),
        ("mamba (no attention)", ["in_proj", "x_proj", "dt_proj"]),
    ],
)
def test_lora_layers_expose_the_base_bias_and_match_peft(name, targets):
    torch.manual_seed(0)
    base = MODELS[name][0]()
    oracle = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=targets))
    serving.randomize_peft_lora(oracle)
    model = copy.deepcopy(base)
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=targets))
    state = peft.get_peft_model_state_dict(oracle)
    assert not lorakit.set_peft_model_state_dict(model, state).unexpected_keys
    modules = dict(model.named_modules())
    dt_proj, x_proj = (next(m for n, m in modules.items() if n.endswith(e)) for e in LEAVES)
    assert dt_proj.bias is dt_proj.base_layer.bias is not None  # read-only views of the base's
    assert isinstance(x_proj, LoraLayer) and x_proj.bias is None  # a base without a bias
    ids = torch.tensor([[5, 17, 3, 99, 42, 8]])
    expected, got = oracle(ids).logits, model(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    expected.square().mean().backward()
    got.square().mean().backward()
    theirs = {n.removeprefix("base_model.model."): p.grad for n, p in oracle.named_parameters()}
    ours = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert ours and all(key in theirs for key in ours)
    for key, grad in ours.items():
        torch.testing.assert_close(grad, theirs[key], rtol=1e-4, atol=1e-6, msg=key)
    assert any(grad.abs().max() > 0 for key, grad in ours.items() if "lora_A" in key)


# ----------------------------------------------------------------- 3. generate --temperature
def _processor_fields() -> set[str]:
    """Every ``generation_config`` field transformers' logits processors and stopping criteria
    read (from the installed source: a new knob, like ``top_h`` was, shows up here)."""
    mixin = T.GenerationMixin
    source = inspect.getsource(mixin._get_logits_processor)
    source += inspect.getsource(mixin._get_stopping_criteria)
    return set(re.findall(r"generation_config\.([a-z_]+)", source))


# A value changing what is sampled or when it stops, for each field the processors and stopping
# criteria read, but for those in LORAKITS (set by lorakit, or derived from the EOS it keeps)
# and ASSISTANT (assisted decoding only)
NOT_NEUTRAL = dict(
    temperature=0.3,
    top_k=3,
    top_p=0.5,
    min_p=0.2,
    top_h=0.3,
    typical_p=0.5,
    epsilon_cutoff=0.05,
    eta_cutoff=0.05,
    repetition_penalty=1.5,
    no_repeat_ngram_size=1,
    encoder_repetition_penalty=1.5,
    encoder_no_repeat_ngram_size=1,
    bad_words_ids=[[9]],
    suppress_tokens=list(range(10, 128)),
    begin_suppress_tokens=[5],
    sequence_bias={(11,): -5.0},
    min_length=30,
    min_new_tokens=20,
    forced_bos_token_id=1,
    forced_eos_token_id=2,
    exponential_decay_length_penalty=(1, 1.5),
    renormalize_logits=True,
    max_length=8,
    guidance_scale=1.5,
    remove_invalid_values=True,
    num_return_sequences=2,
    num_beams=2,
    return_dict_in_generate=True,
    output_scores=True,
    stop_strings=["3"],
    max_time=1e-9,
    watermarking_config={"greenlist_ratio": 0.25, "bias": 20.0},
    use_cache=False,
)
LORAKITS = {"do_sample", "_eos_token_tensor"}
ASSISTANT = {"is_assistant", "assistant_confidence_threshold"}


def test_every_processor_field_of_the_installed_transformers_is_covered():
    assert _processor_fields() - LORAKITS - ASSISTANT <= set(NOT_NEUTRAL)


class _IdsTokenizer:
    pad_token_id = 0

    def __init__(self, prompt: list[int]) -> None:
        self.prompt = prompt

    def __call__(self, text, return_tensors):
        ids = torch.tensor([self.prompt])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def decode(self, ids, skip_special_tokens=True):
        return ",".join(map(str, ids.tolist() if torch.is_tensor(ids) else ids))


def _sampled_oracle(model, prompt, temperature: float, new: int, seed: int, eos: int) -> str:
    """softmax(logits / T) (float32, as transformers) sampled by ``torch.multinomial`` from the
    seeded global generator, each token from a forward of the whole sequence; ends at ``eos``."""
    torch.manual_seed(seed)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            ids.append(int(torch.multinomial(torch.softmax(logits / temperature, -1), 1)))
            if ids[-1] == eos:
                break
    return ",".join(map(str, ids[len(prompt) :]))


def test_sampling_ignores_every_generation_config_setting_but_eos_like_the_greedy_path():
    model = tiny_models.llama()
    prompt = [5, 9, 2, 7]
    clean = model.generation_config
    clean.pad_token_id, clean.eos_token_id = 0, None
    eos = 77
    with torch.no_grad():
        greedy_clean = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    own = GenerationConfig(**NOT_NEUTRAL, do_sample=True, eos_token_id=eos, pad_token_id=0)
    model.generation_config = own
    tokenizer = _IdsTokenizer(prompt)
    for seed in range(6):
        torch.manual_seed(seed)
        text = generate_text(model, tokenizer, "x", max_new_tokens=12, temperature=0.9, raw=True)
        assert text == _sampled_oracle(model, prompt, 0.9, 12, seed, eos)
    assert model.generation_config is own and own.top_h == 0.3  # the model's, unchanged
    expected = greedy_clean[0, len(prompt) :].tolist()  # greedy: the settings ignored too
    expected = expected[: expected.index(eos) + 1] if eos in expected else expected
    assert generate_text(model, tokenizer, "x", max_new_tokens=12, raw=True) == ",".join(
        map(str, expected)
    )


def test_the_sampled_distribution_is_the_full_softmax_over_logits_over_t():
    """The processors transformers builds for the call leave logits / T (float64 formula)."""
    model = tiny_models.llama()
    model.generation_config = GenerationConfig(**NOT_NEUTRAL, do_sample=True, pad_token_id=0)
    built = []
    original = model._get_logits_processor
    model._get_logits_processor = lambda *a, **k: built.append(original(*a, **k)) or built[-1]
    generate_text(model, _IdsTokenizer([3, 4]), "x", max_new_tokens=2, temperature=0.7, raw=True)
    logits = torch.randn(1, 128, dtype=torch.float64)
    scores = built[0](torch.tensor([[3, 4]]), logits.clone())
    torch.testing.assert_close(scores, logits / 0.7, rtol=0, atol=0)
