"""``lorakit generate`` against transformers' ``generate``: sampling from the full
softmax(logits / T) (no top-k / top-p cut), the position limit counted as the positions fed to
the model (prompt + new - 1), and a stopping EOS kept in the ids like transformers keeps it
(the decode's ``skip_special_tokens`` drops it only where it is a special token)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from lorakit.commands.generate import _check_length, engine_greedy, generate_text
from lorakit.errors import UserError
from tests import tiny_models, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer.build()


def _llama(tokenizer, eos=None) -> LlamaForCausalLM:
    """A tiny random Llama sized to ``tokenizer``, EOS ``eos`` (None: never stops)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_models.llama_config(vocab_size=len(tokenizer))).eval()
    model.generation_config.eos_token_id = eos
    return model


def _transformers_text(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy ``model.generate`` on the raw prompt, new ids decoded without special tokens."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


# ----------------------------------------------------------------- bug 1: sampling, no cut
def test_sampling_applies_only_the_temperature_no_top_k_or_top_p(tokenizer):
    """transformers 5 applies a global default top_k=50 when none is given, and a model's
    generation_config.json may set its own top_k / top_p: ``--temperature T`` must sample
    from softmax(logits / T) over the whole vocabulary, as ``lorakit serve`` does."""
    model = _llama(tokenizer)
    model.generation_config.top_k, model.generation_config.top_p = 5, 0.5
    model.generation_config.repetition_penalty, model.generation_config.min_p = 1.05, 0.1
    model.generation_config.no_repeat_ngram_size, model.generation_config.typical_p = 2, 0.9
    built = []
    original = model._get_logits_processor

    def spy(*args, **kwargs):
        processors = original(*args, **kwargs)
        built.append(processors)
        return processors

    model._get_logits_processor = spy
    torch.manual_seed(0)
    text = generate_text(model, tokenizer, PROMPT, max_new_tokens=3, temperature=0.7, raw=True)
    assert isinstance(text, str) and len(built) == 1
    kinds = [type(p).__name__ for p in built[0]]
    assert kinds[0] == "TemperatureLogitsWarper"  # then at most a min-p of 0 (keeps every token)
    for kind, processor in zip(kinds[1:], built[0][1:], strict=True):
        assert kind == "MinPLogitsWarper" and processor.min_p == 0
    logits = torch.randn(1, len(tokenizer), dtype=torch.float64)
    scores = built[0](torch.zeros(1, 4, dtype=torch.long), logits.clone())
    torch.testing.assert_close(scores, logits / 0.7)  # every token keeps its (scaled) logit


# ----------------------------------------------------------------- bug 2: position limit
def _gpt2(tokenizer) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=32,
        n_embd=32,
        n_layer=1,
        n_head=2,
        eos_token_id=None,
        bos_token_id=None,
    )
    model = GPT2LMHeadModel(config).eval()
    model.generation_config.eos_token_id = None
    return model


def test_gpt2_prompt_plus_new_tokens_one_past_its_positions_runs_as_transformers(tokenizer):
    """The last new token is never fed back: prompt P + N new tokens use positions
    0 .. P + N - 2, so P + N = 33 fits GPT-2's 32 positions (transformers and the engine run
    it); 34 is refused."""
    model = _gpt2(tokenizer)
    prompt_tokens = len(tokenizer(PROMPT).input_ids)
    fits = 33 - prompt_tokens
    expected = _transformers_text(model, tokenizer, PROMPT, fits)
    assert generate_text(model, tokenizer, PROMPT, max_new_tokens=fits, raw=True) == expected
    ids = tokenizer(PROMPT).input_ids
    assert len(engine_greedy(model, ids, fits)) == fits
    with pytest.raises(UserError, match="positions; shorten the prompt"):
        generate_text(model, tokenizer, PROMPT, max_new_tokens=fits + 1, raw=True)


def test_rotary_warning_only_past_the_positions_fed(capsys):
    """Llama's max_position_embeddings 128: 100 + 29 (positions 0..127) gives no warning,
    100 + 30 does."""
    model = tiny_models.llama()
    _check_length(model, 100, 29)
    assert capsys.readouterr().err == ""
    _check_length(model, 100, 30)
    assert "max_position_embeddings 128" in capsys.readouterr().err


# ----------------------------------------------------------------- bug 3: EOS in the output
def _free_greedy(model, tokenizer, n: int = 4) -> list[int]:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def test_a_non_special_eos_is_kept_in_the_text_as_transformers_keeps_it(tokenizer):
    """EOS = a plain vocabulary token (not special): transformers keeps it in its ids and the
    decode keeps its text; so does ``lorakit generate``."""
    model = _llama(tokenizer)
    free = _free_greedy(model, tokenizer)
    eos = free[1]
    assert eos not in free[:1] and eos not in tokenizer.all_special_ids
    assert tokenizer.decode([eos], skip_special_tokens=True) != ""
    for stop in (eos, [7, eos]):  # one id, or several
        model.generation_config.eos_token_id = stop
        expected = _transformers_text(model, tokenizer, PROMPT, 8)
        assert expected == tokenizer.decode(free[:2])  # stopped at EOS, EOS's text kept
        assert generate_text(model, tokenizer, PROMPT, max_new_tokens=8, raw=True) == expected
        assert engine_greedy(model, tokenizer(PROMPT).input_ids, 8) == free[:2]


def test_a_special_eos_is_still_left_out_of_the_text(tokenizer):
    """SmolLM2-style EOS ``<|im_end|>`` (a special token): the model is made to emit it as its
    second token (its output row swapped with that token's); the text is the first token's, as
    transformers' generate + decode(skip_special_tokens=True) gives."""
    model = _llama(tokenizer)
    free = _free_greedy(model, tokenizer)
    eos = tokenizer.eos_token_id
    assert eos in tokenizer.all_special_ids and eos not in free[:2] and free[0] != free[1]
    with torch.no_grad():
        rows = model.lm_head.weight
        rows[[eos, free[1]]] = rows[[free[1], eos]]
    model.generation_config.eos_token_id = eos
    expected = _transformers_text(model, tokenizer, PROMPT, 8)
    assert expected == tokenizer.decode(free[:1])
    assert generate_text(model, tokenizer, PROMPT, max_new_tokens=8, raw=True) == expected
    assert engine_greedy(model, tokenizer(PROMPT).input_ids, 8) == [free[0], eos]
