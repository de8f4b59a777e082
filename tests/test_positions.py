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
