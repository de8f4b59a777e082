"""``lorakit generate`` at a temperature too small to divide by: greedy, as the server.

Below ``serve.sampling.GREEDY_BELOW`` (1e-5) logits / T overflows and softmax gives NaN; the
server decodes greedily there, while ``lorakit generate`` passed T to transformers' sampler
and died in its multinomial ("probability tensor contains either inf, nan or element < 0").
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from lorakit.commands.generate import generate_text
from tests import tiny_models, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("temperature", [1e-39, 1e-300, 5e-6])
def test_a_vanishing_temperature_generates_the_greedy_text(temperature):
    tokenizer = tiny_tokenizer.build()
    torch.manual_seed(0)
    config = tiny_models.llama_config(vocab_size=len(tokenizer))
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    greedy = generate_text(model, tokenizer, "the quick brown fox", max_new_tokens=8, raw=True)
    text = generate_text(
        model, tokenizer, "the quick brown fox", max_new_tokens=8, temperature=temperature, raw=True
    )
    assert text == greedy and text
