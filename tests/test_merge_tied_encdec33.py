"""A merged encoder-decoder (BART, T5) with LoRA on its embeddings reloads with the outputs of
the unmerged adapter model, as GPT-2 does: ``merge_and_unload`` + ``save_pretrained``,
``save_merged_model`` and ``unload(keep_saved=...)``, each reloaded by ``from_pretrained``.

Before: a merge that untied ``model.shared`` from BART's ``encoder``/``decoder.embed_tokens``
cleared ``tie_word_embeddings`` while ``lm_head`` still held ``model.shared``: transformers saved
that tensor once and, not tying, reloaded a random head (0.5 off); T5's ``encoder`` /
``decoder.embed_tokens`` and head kept ``W0`` beside a merged ``shared``, were saved as one
tensor and re-tied by transformers 5 to the merged ``shared`` (1.26 off). Every adapter here
has ``B != 0``; the models are tiny and random (no download).
"""

from __future__ import annotations

import pytest
import torch
import transformers

import lorakit
from lorakit.io import save_merged_model
from lorakit.unload import own_tensors_for_reload
from tests import tiny_models

VOCAB = tiny_models.SEQ2SEQ_VOCAB


_t5, _bart = tiny_models.t5, tiny_models.bart


BUILDERS = {"t5": _t5, "bart": _bart, "gpt2": tiny_models.gpt2}
TASKS = {"t5": "SEQ_2_SEQ_LM", "bart": "SEQ_2_SEQ_LM", "gpt2": "CAUSAL_LM"}
# (model, target_modules, modules_to_save): LoRA on the embeddings (or the head) and attention.
CASES = [
    ("gpt2", ["c_attn", "wte"], None),  # the control: it reloaded right before the fix too
    ("t5", ["q", "v", "shared"], None),
    ("t5", ["q", "embed_tokens"], None),
    ("t5", ["q", "lm_head"], None),
    ("t5", ["q"], ["shared"]),
    ("bart", ["q_proj", "embed_tokens"], None),
    ("bart", ["q_proj", "lm_head"], None),
    ("bart", ["q_proj", "shared"], None),
    ("bart", ["q_proj"], ["embed_tokens"]),
]


def _inputs(kind: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 7), generator=generator)
    if kind == "gpt2":
        return {"input_ids": ids}
    return {
        "input_ids": ids,
        "decoder_input_ids": torch.randint(3, VOCAB, (2, 5), generator=generator),
    }


def _adapted(kind: str, targets: list[str], saved: list[str] | None):
    """The ``lorakit.get_peft_model`` of a tiny ``kind`` model, every trainable tensor (the LoRA
    factors, B included, and the ``modules_to_save`` copies) moved by random noise."""
    config = lorakit.LoraConfig(
        task_type=TASKS[kind],
        r=4,
        lora_alpha=8,
        target_modules=targets,
        modules_to_save=saved,
        fan_in_fan_out=kind == "gpt2",  # (GPT-2's Conv1D)
    )
    model = lorakit.get_peft_model(BUILDERS[kind](), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def _logits(model: torch.nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(kind)).logits


def _reloaded(directory, kind: str) -> torch.nn.Module:
    auto = (
        transformers.AutoModelForCausalLM if kind == "gpt2" else transformers.AutoModelForSeq2SeqLM
    )
    return auto.from_pretrained(directory).eval()


def _assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    error = (got - want).abs().max().item()
    assert error <= 1e-5, error


@pytest.mark.parametrize(("kind", "targets", "saved"), CASES)
def test_merge_and_unload_then_save_pretrained_reloads_the_unmerged_outputs(
    tmp_path, kind, targets, saved
):
    model = _adapted(kind, targets, saved)
    want = _logits(model, kind)
    merged = model.merge_and_unload()
    _assert_same(_logits(merged, kind), want)
    merged.save_pretrained(tmp_path)
    _assert_same(_logits(_reloaded(tmp_path, kind), kind), want)


@pytest.mark.parametrize(("kind", "targets", "saved"), CASES)
def test_save_merged_model_reloads_the_unmerged_outputs(tmp_path, kind, targets, saved):
    model = _adapted(kind, targets, saved)
    want = _logits(model, kind)
    save_merged_model(model.model, tmp_path / "merged")
    _assert_same(_logits(_reloaded(tmp_path / "merged", kind), kind), want)


def test_unload_keeping_a_trained_bart_embedding_reloads_its_outputs(tmp_path):
    model = _adapted("bart", ["q_proj"], ["embed_tokens"])
    plain = lorakit.unload(model, keep_saved=["default"])
    want = _logits(plain, "bart")
    assert not torch.equal(want, _logits(_bart(), "bart"))  # (the trained copies count)
    plain.save_pretrained(tmp_path)
    _assert_same(_logits(_reloaded(tmp_path, "bart"), "bart"), want)


def test_bart_head_gets_its_own_tensor_and_the_flag_is_cleared(tmp_path):
    """LoRA on BART's encoder/decoder embeddings leaves ``lm_head`` holding ``model.shared``:
    the merge gives the head a copy (equal values) and clears the flag, so the file holds
    ``lm_head.weight`` and a ``tie_weights()`` call (``resize_token_embeddings`` makes one)
    cannot put the unmerged ``model.shared`` back into the merged embeddings."""
    model = _adapted("bart", ["q_proj", "embed_tokens"], None)
    want = _logits(model, "bart")
    merged = model.merge_and_unload()
    assert merged.config.tie_word_embeddings is False
    head, shared = merged.lm_head.weight, merged.model.shared.weight
    assert head is not shared and torch.equal(head, shared)
    merged.tie_weights()
    _assert_same(_logits(merged, "bart"), want)


def test_t5_head_tied_by_its_config_is_not_copied(tmp_path):
    """T5's config class ties whatever ``config.json`` says, so a T5 whose merged head cleared
    the flag still gets ``encoder``/``decoder.embed_tokens`` back from ``shared`` on reload:
    they keep sharing it (no copies) and reload right."""
    model = _adapted("t5", ["q", "lm_head"], None)
    want = _logits(model, "t5")
    merged = model.merge_and_unload()
    shared = merged.shared.weight
    assert merged.encoder.embed_tokens.weight is shared
    assert merged.decoder.embed_tokens.weight is shared
    assert merged.lm_head.weight is not shared
    merged.save_pretrained(tmp_path)
    _assert_same(_logits(_reloaded(tmp_path, "t5"), "t5"), want)


@pytest.mark.parametrize("kind", ["gpt2", "t5", "bart"])
def test_ties_untouched_by_the_merge_stay_one_tensor(kind):
    """LoRA on attention only: the merge unties nothing, every tie stays one tensor and the
    flag stays set; ``own_tensors_for_reload`` finds nothing to copy on such a model."""
    targets = {"gpt2": ["c_attn"], "t5": ["q", "v"], "bart": ["q_proj"]}[kind]
    merged = _adapted(kind, targets, None).merge_and_unload()
    assert merged.config.tie_word_embeddings is True
    embedding = merged.get_input_embeddings().weight
    assert merged.get_output_embeddings().weight is embedding
    if kind != "gpt2":
        encoder_decoder = merged.model if kind == "bart" else merged
        assert encoder_decoder.encoder.embed_tokens.weight is embedding
        assert encoder_decoder.decoder.embed_tokens.weight is embedding
    assert own_tensors_for_reload(merged) == []


def test_save_merged_model_of_a_plain_model_saves_what_its_config_does_not_tie(tmp_path):
    """A model merged elsewhere (here: BART whose flag was cleared while its head and
    ``encoder``/``decoder.embed_tokens`` still hold ``model.shared``, what ``merge_and_unload``
    made before) is saved with each of those under its own name, so none reloads random."""
    plain = _bart()
    plain.config.tie_word_embeddings = False
    want = _logits(plain, "bart")
    save_merged_model(plain, tmp_path / "merged")
    _assert_same(_logits(_reloaded(tmp_path / "merged", "bart"), "bart"), want)
