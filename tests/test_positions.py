"""``lorakit.positions``: the configured maximum, and the learned position tables that make it
a hard limit (GPT-2, BERT) where a rotary model (Llama) has none."""

from __future__ import annotations

from lorakit.positions import learned_position_limit, max_positions
from tests import tiny_models


def test_learned_tables_are_found_and_rotary_models_have_none():
    gpt2, bert, llama = tiny_models.gpt2(), tiny_models.bert(), tiny_models.llama()
    assert max_positions(gpt2) == learned_position_limit(gpt2) == 64  # wpe
    assert (
        learned_position_limit(bert) == max_positions(bert) == bert.config.max_position_embeddings
    )
    assert max_positions(llama) == 128 and learned_position_limit(llama) is None
    assert max_positions(object()) is None and learned_position_limit(object()) is None


def test_opt_and_biogpt_tables_keep_two_rows_before_position_0():
    """OPT's and BioGPT's position tables hold max_position_embeddings + 2 rows (``offset`` 2):
    their limit was missed, so lorakit eval / train --max-length past it ran into an IndexError
    traceback instead of the --max-length message."""
    import pytest
    from transformers import BioGptConfig, BioGptForCausalLM, OPTConfig, OPTForCausalLM

    from lorakit.errors import UserError
    from lorakit.positions import check_max_length

    sizes = dict(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    opt = OPTForCausalLM(
        OPTConfig(**sizes, ffn_dim=32, word_embed_proj_dim=16, max_position_embeddings=32)
    )
    biogpt = BioGptForCausalLM(
        BioGptConfig(**sizes, intermediate_size=32, max_position_embeddings=32)
    )
    for model in (opt, biogpt):
        assert learned_position_limit(model) == 32
        check_max_length(model, 32)
        with pytest.raises(UserError, match="--max-length 33 is longer than this model's 32"):
            check_max_length(model, 33)
