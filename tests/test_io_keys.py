"""PEFT's tensor key names: every module that reads keys parses them with ``lorakit.io.keys``."""

from __future__ import annotations

from lorakit.io.keys import key_names_module, lora_key_pairs, lora_keys, parse_lora_key

P = "base_model.model."


def test_parse_lora_key_reads_linear_and_embedding_factors() -> None:
    assert parse_lora_key(f"{P}model.layers.0.q_proj.lora_A.weight") == (
        "model.layers.0.q_proj",
        "lora_A",
    )
    assert parse_lora_key(f"{P}embed.lora_embedding_B") == ("embed", "lora_B")
    assert parse_lora_key("model.q_proj.lora_B.weight") == ("model.q_proj", "lora_B")  # no prefix
    assert parse_lora_key(f"{P}model.q_proj.base_layer.bias") is None
    assert parse_lora_key(f"{P}floral_head.weight") is None


def test_parse_lora_key_can_refuse_embedding_factors() -> None:
    assert parse_lora_key(f"{P}embed.lora_embedding_A", embeddings=False) is None
    assert parse_lora_key(f"{P}q.lora_A.weight", embeddings=False) == ("q", "lora_A")


def test_lora_key_pairs_groups_the_factors_by_module_and_leaves_other_keys_out() -> None:
    keys = [*lora_keys("a.q", False), *lora_keys("embed", True), f"{P}a.q.base_layer.bias"]
    keys.append(f"{P}b.v.lora_A.weight")  # B missing: kept, the caller decides
    assert lora_key_pairs(keys) == {
        "a.q": {"lora_A": f"{P}a.q.lora_A.weight", "lora_B": f"{P}a.q.lora_B.weight"},
        "embed": {"lora_A": f"{P}embed.lora_embedding_A", "lora_B": f"{P}embed.lora_embedding_B"},
        "b.v": {"lora_A": f"{P}b.v.lora_A.weight"},
    }
    assert list(lora_key_pairs(keys, embeddings=False)) == ["a.q", "b.v"]


def test_key_names_module_matches_whole_dotted_parts_only() -> None:
    assert key_names_module(f"{P}score.weight", "score")
    assert key_names_module(f"{P}model.classifier.dense.bias", "classifier.dense")
    assert not key_names_module(f"{P}scores.weight", "score")
    assert not key_names_module(f"{P}floral_head.weight", "head")
