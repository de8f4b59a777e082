"""Trainable token rows, review fixes of session 36, each checked against the real peft (0.22).

1. ``PeftModel.merge_adapter(adapter_names=[...])``: an embedding holding merged adapters'
   rows looks tokens up with those rows alone, as PEFT's (logits and embedding outputs).
2. ``trainable_token_indices`` dict keys follow PEFT's rule (the whole name, or its end after a
   dot): "tokens" wraps nothing, "embed_tokens" not ``type_embed_tokens``; keys naming nothing
   are one error naming them all.
3. ``merge`` / ``merge_and_unload`` of adapters whose rows share token ids are refused, as PEFT
   refuses them, naming the adapters and ids, the model unchanged; rows merged earlier are
   written by ``merge_and_unload`` too (PEFT's merged weights).
4. A tied embedding's refusal gives ways out that are right: the inference recipe gives PEFT's
   merged logits, and training new rows after cloning the output layer leaves the base logits.
5. Repeated token ids are refused, naming them (PEFT accepts them).
6. A file with token ids beyond an unresized base's vocabulary says which
   ``resize_token_embeddings(N)`` to call; doing so gives PEFT's logits.
7. List form on BART (transformers 5), whose ``model.shared`` the forward never calls: a warning,
   as for LoRA there (its rows get no gradient, in PEFT too).
10. Tuples, numpy integer ids and tuples in the dict form are taken (peft 0.22 mis-handles a
    tuple: write lists for PEFT), kept and saved as lists of Python ints; a bad value's message
    asks for ints.
"""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import peft
import pytest
import torch
from torch import nn
from transformers import BartConfig, BartForConditionalGeneration, LlamaForCausalLM

import lorakit
from lorakit.errors import AdapterFileError, UnusedTargetWarning
from lorakit.io import load_adapter, save_adapter
from lorakit.layers import TrainableTokens
from tests import tiny_models
from tests.peft_versions import peft_token_keys_end_at_a_dot

TOLERANCE = 1e-5
A_ROWS, B_ROWS = [3, 5, 7], [9, 11]


def _fields(**overrides) -> dict:
    fields = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return fields | overrides


def _quiet(build):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build()


def _perturb(model: nn.Module, seed: int = 7) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if "lora_" in name or "trainable_tokens_delta" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)


def _copy_peft_to_ours(theirs: nn.Module, ours: nn.Module) -> None:
    """PEFT's adapter tensors into lorakit's model (PEFT's name -> lorakit's name)."""
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "lora_" not in name and "trainable_tokens_delta" not in name:
                continue
            key = name.removeprefix("base_model.model.")
            if "trainable_tokens_delta" in key:
                head, adapter = key.rsplit(".", 1)
                key = head.replace(
                    ".token_adapter.", f".modules_to_save.{adapter}.token_adapter."
                ).removesuffix(f".{adapter}")
            mine[key].copy_(parameter)


def _ids(tokens=(3, 9, 5, 11)) -> torch.Tensor:
    ids = tiny_models.input_ids()
    ids[:, : len(tokens)] = torch.tensor(tokens)
    return ids


def _logits(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids() if ids is None else ids).logits.float()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _two_adapter_pair(b_rows=B_ROWS):
    """PEFT's and lorakit's front doors, each with "default" (rows ``A_ROWS``, active) and
    "b" (rows ``b_rows``, inactive), holding the same random tensors."""
    theirs = _quiet(
        lambda: peft.get_peft_model(
            tiny_models.llama(), peft.LoraConfig(**_fields(trainable_token_indices=A_ROWS))
        )
    )
    b_fields = _fields(trainable_token_indices=b_rows, target_modules=["k_proj"])
    _quiet(lambda: theirs.add_adapter("b", peft.LoraConfig(**b_fields)))
    _perturb(theirs)
    ours = lorakit.get_peft_model(
        tiny_models.llama(), lorakit.LoraConfig(**_fields(trainable_token_indices=A_ROWS))
    )
    ours.add_adapter("b", lorakit.LoraConfig(**b_fields))
    _copy_peft_to_ours(theirs, ours.model)
    return theirs, ours


# ----------------------------------------------------------------- 1. merge_adapter by name


@pytest.mark.parametrize("names", [["default", "b"], ["b"], ["default"]])
def test_front_door_merge_adapter_uses_the_merged_rows_as_peft(names):
    theirs, ours = _two_adapter_pair()
    assert _max_diff(_logits(theirs), _logits(ours)) <= TOLERANCE
    theirs.merge_adapter(adapter_names=names)
    ours.merge_adapter(adapter_names=names)
    ids = _ids()
    with torch.no_grad():
        embedded_theirs = theirs.base_model.model.model.embed_tokens(ids)
        embedded_ours = ours.model.model.embed_tokens(ids)
    assert _max_diff(embedded_theirs, embedded_ours) <= TOLERANCE
    assert _max_diff(_logits(theirs), _logits(ours)) <= TOLERANCE
    theirs.unmerge_adapter()
    ours.unmerge_adapter()
    assert _max_diff(_logits(theirs), _logits(ours)) <= TOLERANCE


# ----------------------------------------------------------------- 2. dict keys


@pytest.mark.parametrize("key", ["tokens", "_tokens", "ed_tokens"])
def test_a_dict_key_is_a_whole_name_or_a_dotted_ending_as_in_peft(key):
    config = _fields(trainable_token_indices={key: [3]})
    if peft_token_keys_end_at_a_dot():
        with pytest.raises(ValueError, match="not found"):  # the oracle
            _quiet(lambda: peft.get_peft_model(tiny_models.llama(), peft.LoraConfig(**config)))
    else:  # (peft < 0.22 took any ending of the name: its rule before its fix)
        _quiet(lambda: peft.get_peft_model(tiny_models.llama(), peft.LoraConfig(**config)))
    model = tiny_models.llama()
    before = dict(model.named_modules())
    with pytest.raises(ValueError, match=rf"key '{key}' matches no module") as error:
        lorakit.inject(model, lorakit.LoraConfig(**config))
    assert "['model.embed_tokens']" in str(error.value)  # the embeddings it has
    assert dict(model.named_modules()) == before


class _TwoEmbeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(16, 8)
        self.type_embed_tokens = nn.Embedding(4, 8)
        self.proj = nn.Linear(8, 8)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def forward(self, ids: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed_tokens(ids) + self.type_embed_tokens(types))


def test_embed_tokens_does_not_name_type_embed_tokens_as_in_peft():
    config = dict(r=2, target_modules=["proj"], trainable_token_indices={"embed_tokens": [1, 2]})
    theirs = peft.get_peft_model(_TwoEmbeddings(), peft.LoraConfig(**config))
    wrapped_theirs = [
        name.removeprefix("base_model.model.")
        for name, module in theirs.named_modules()
        if type(module).__name__ == "TrainableTokensWrapper"
    ]
    ours = lorakit.inject(_TwoEmbeddings(), lorakit.LoraConfig(**config))
    wrapped_ours = [n for n, m in ours.named_modules() if isinstance(m, TrainableTokens)]
    assert wrapped_ours == ["embed_tokens"]
    # (peft < 0.22 took any ending of the name, and wrapped type_embed_tokens too)
    expected_theirs = (
        ["embed_tokens"]
        if peft_token_keys_end_at_a_dot()
        else ["embed_tokens", "type_embed_tokens"]
    )
    assert wrapped_theirs == expected_theirs


def test_keys_naming_nothing_are_one_error_naming_them_all():
    config = _fields(trainable_token_indices={"tokens": [3], "embed_tokens": [4], "x": [1]})
    with pytest.raises(ValueError, match=r"keys \['tokens', 'x'\] match no module"):
        lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(**config))


# ----------------------------------------------------------------- 3. shared ids at merge


def _lorakit_pair(b_rows) -> nn.Module:
    model = lorakit.inject(
        tiny_models.llama(), lorakit.LoraConfig(**_fields(trainable_token_indices=A_ROWS))
    )
    b_fields = _fields(trainable_token_indices=b_rows, target_modules=["k_proj"])
    lorakit.inject(model, lorakit.LoraConfig(**b_fields), "b", activate=False)
    _perturb(model)
    return model


@pytest.mark.parametrize("order", [["default", "b"], ["b", "default"]])
def test_merging_rows_that_share_ids_is_refused_as_peft_and_changes_nothing(order):
    theirs, _ = _two_adapter_pair(b_rows=[5, 11])
    with pytest.raises(ValueError, match="already defined"):  # the oracle
        theirs.merge_and_unload(adapter_names=order)
    model = _lorakit_pair([5, 11])
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    modules = dict(model.named_modules())
    for merge in (lorakit.merge_and_unload, lorakit.merge):
        with pytest.raises(ValueError, match=r"rows \[5\] of embedding 'model.embed_tokens'"):
            merge(model, adapter_names=order)
    assert dict(model.named_modules()) == modules
    assert all(torch.equal(model.state_dict()[name], t) for name, t in state.items())
    lorakit.merge(model, adapter_names=["b"])  # one alone merges; then the other meets it
    with pytest.raises(ValueError, match=r"adapter 'default' trains rows \[5\].*\['b'\]"):
        lorakit.merge_and_unload(model)


def test_rows_merged_earlier_are_written_by_merge_and_unload_as_in_peft():
    theirs, ours = _two_adapter_pair()
    theirs.merge_adapter(adapter_names=["b"])
    lorakit.merge(ours, adapter_names=["b"])
    merged_theirs = theirs.merge_and_unload()  # "default" (active) and "b" (merged earlier)
    merged_ours = lorakit.merge_and_unload(ours)
    weight_theirs = merged_theirs.model.embed_tokens.weight
    weight_ours = merged_ours.model.embed_tokens.weight
    assert _max_diff(weight_theirs, weight_ours) == 0.0
    assert _max_diff(_logits(merged_theirs), _logits(merged_ours)) <= TOLERANCE


# ----------------------------------------------------------------- 4. tied embeddings


def _tied_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_models.llama_config(tie_word_embeddings=True)).eval()


def _untied_by_clone(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """What the refusal says to do (``lm_head`` gets a clone of the weight)."""
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return model


def test_the_tied_refusal_gives_an_inference_recipe_that_gives_peft_logits(tmp_path):
    fields = _fields(trainable_token_indices=[3, 5])
    theirs = _quiet(lambda: peft.get_peft_model(_tied_llama(), peft.LoraConfig(**fields)))
    _perturb(theirs)
    theirs.save_pretrained(tmp_path)
    with pytest.raises(AdapterFileError, match="tied to the output layer") as error:
        load_adapter(_tied_llama(), tmp_path)
    message = str(error.value)
    assert "untie the embeddings (tie_word_embeddings=False)" not in message  # (wrong logits)
    assert "tie_word_embeddings=False) re-initialises it" in message
    assert "merge_and_unload, and tie the output layer to the merged embedding" in message
    ids = _ids((3, 5))
    want = _logits(theirs.merge_and_unload(), ids)
    model = _untied_by_clone(_tied_llama())
    _quiet(lambda: load_adapter(model, tmp_path))
    model = lorakit.merge_and_unload(model)
    model.lm_head.weight = model.get_input_embeddings().weight  # tied again
    assert _max_diff(_logits(model, ids), want) <= TOLERANCE


def test_training_new_rows_after_the_advised_clone_starts_from_the_base():
    with pytest.raises(ValueError, match=r"lm_head.weight.detach\(\).clone\(\)"):
        lorakit.inject(_tied_llama(), lorakit.LoraConfig(**_fields(trainable_token_indices=[3])))
    fields = _fields(trainable_token_indices=[3, 5], init_lora_weights=True)
    model = lorakit.inject(_untied_by_clone(_tied_llama()), lorakit.LoraConfig(**fields))
    assert _max_diff(_logits(model, _ids((3, 5))), _logits(_tied_llama(), _ids((3, 5)))) == 0.0


# ----------------------------------------------------------------- 5. repeated ids


@pytest.mark.parametrize(
    ("value", "where"), [([3, 5, 3], ""), ({"embed_tokens": [1, 1, 2]}, " for 'embed_tokens'")]
)
def test_repeated_ids_are_warned_about_naming_them(value, where):
    _quiet(lambda: peft.LoraConfig(**_fields(trainable_token_indices=value)))  # peft takes them
    repeated = "[3]" if isinstance(value, list) else "[1]"
    with pytest.warns(
        UserWarning, match=re.escape(f"id(s) {repeated} given more than once{where}")
    ):
        lorakit.LoraConfig(**_fields(trainable_token_indices=value))


def test_a_peft_file_with_repeated_ids_loads_to_peft_logits(tmp_path):
    """PEFT writes such files (its forward reads the last copy of a row): they load as in PEFT."""
    theirs = _quiet(
        lambda: peft.get_peft_model(
            tiny_models.llama(), peft.LoraConfig(**_fields(trainable_token_indices=[3, 5, 3]))
        )
    )
    _perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = _quiet(lambda: lorakit.load_adapter(tiny_models.llama(), tmp_path))
    ids = _ids((3, 5, 9))
    assert _max_diff(_logits(ours, ids), _logits(theirs, ids)) == 0.0


# ----------------------------------------------------------------- 6. resized vocabulary


def _resized() -> LlamaForCausalLM:
    model = tiny_models.llama()
    model.resize_token_embeddings(132, mean_resizing=False)
    return model


@pytest.mark.parametrize("with_embeddings", [True, False])
def test_a_file_beyond_the_vocabulary_says_which_resize_to_call(with_embeddings, tmp_path):
    fields = _fields(trainable_token_indices=[128, 129, 130])
    theirs = _quiet(lambda: peft.get_peft_model(_resized(), peft.LoraConfig(**fields)))
    _perturb(theirs)
    _quiet(lambda: theirs.save_pretrained(tmp_path, save_embedding_layers=with_embeddings))
    model = tiny_models.llama()
    with pytest.raises(AdapterFileError, match="resize_token_embeddings") as error:
        _quiet(lambda: load_adapter(model, tmp_path))
    assert type(model.model.embed_tokens) is nn.Embedding  # unchanged
    if not with_embeddings:
        assert "more than 130 tokens" in str(error.value)
        return
    assert "call model.resize_token_embeddings(132) before loading it" in str(error.value)
    model.resize_token_embeddings(132)  # as told (the file brings the 132 rows)
    _quiet(lambda: load_adapter(model, tmp_path))
    ids = _ids((128, 3, 129, 130))
    assert _max_diff(_logits(model, ids), _logits(theirs, ids)) <= TOLERANCE


# ----------------------------------------------------------------- 7. BART's shared


def _bart() -> BartForConditionalGeneration:
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=128,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return BartForConditionalGeneration(config)


def _rows_gradient(model: nn.Module) -> torch.Tensor | None:
    model.train()
    inputs, labels = torch.tensor([[0, 3, 7, 5, 2]]), torch.tensor([[2, 5, 3, 9]])
    model(input_ids=inputs, decoder_input_ids=labels, labels=labels).loss.backward()
    return next(p.grad for n, p in model.named_parameters() if "trainable_tokens_delta" in n)


def test_list_form_rows_on_an_uncalled_shared_embedding_warn():
    config = dict(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 5])
    theirs = _quiet(lambda: peft.get_peft_model(_bart(), peft.LoraConfig(**config)))
    assert _rows_gradient(theirs) is None  # the oracle: never called there either
    with pytest.warns(UnusedTargetWarning, match="'model.shared'") as caught:
        ours = lorakit.inject(_bart(), lorakit.LoraConfig(**config))
    assert "trainable_token_indices={'embed_tokens'" in str(caught[0].message)
    assert _rows_gradient(ours) is None
    config["trainable_token_indices"] = {"embed_tokens": [3, 5]}  # as the warning says
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnusedTargetWarning)
        named = lorakit.inject(_bart(), lorakit.LoraConfig(**config))
    assert _rows_gradient(named) is not None


# ----------------------------------------------------------------- 10. config values


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ((3, 5), [3, 5]),
        ([np.int64(3), np.int32(5)], [3, 5]),
        ({"embed_tokens": (3, np.int64(5))}, {"embed_tokens": [3, 5]}),
    ],
)
def test_ids_peft_takes_are_taken_and_saved_as_python_ints(value, kept, tmp_path):
    _quiet(lambda: peft.LoraConfig(**_fields(trainable_token_indices=value)))  # peft takes it
    theirs = _quiet(  # (given a tuple, peft's forward fails: it indexes W0[(3, 5)])
        lambda: peft.get_peft_model(
            tiny_models.llama(), peft.LoraConfig(**_fields(trainable_token_indices=kept))
        )
    )
    _perturb(theirs)
    config = lorakit.LoraConfig(**_fields(trainable_token_indices=value))
    assert config.trainable_token_indices == kept
    ids = config.trainable_token_indices
    ids = ids if isinstance(ids, list) else ids["embed_tokens"]
    assert all(type(i) is int for i in ids)
    ours = lorakit.inject(tiny_models.llama(), config)
    _copy_peft_to_ours(theirs, ours)
    assert _max_diff(_logits(ours, _ids((3, 5))), _logits(theirs, _ids((3, 5)))) <= TOLERANCE
    save_adapter(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["trainable_token_indices"] == kept


@pytest.mark.parametrize("value", [[1.5], [True], (3, "5"), {"embed_tokens": [np.float64(1)]}])
def test_a_bad_id_is_refused_asking_for_ints(value):
    with pytest.raises(ValueError, match="list of int token ids"):
        lorakit.LoraConfig(**_fields(trainable_token_indices=value))
