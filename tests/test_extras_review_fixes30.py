"""Review fixes (session 30, LoraConfig extras), against the real ``peft`` 0.21.2:

1. a ``target_modules`` entry that also matches a module a ``modules_to_save`` entry names as
   whole dotted name parts is accepted: that module is left out of the LoRA targets and trained
   in full (PEFT's ``check_target_module_exists`` returns ``_ExcludedModule`` for it). Checked:
   which modules have LoRA, which are copied, trainable counts, outputs with non-zero B, and
   files both ways; "nothing left to adapt" still refused, and a plain-string ending picks
   nothing (peft 0.22's rule).
2. trainable token rows start as copies of the embedding's rows whatever ``init_lora_weights``
   is (PEFT's ``TrainableTokensWrapper`` never gets ``init_weights`` from a ``LoraConfig``), so
   the same seed gives the same rows and logits as PEFT's at init.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from peft.utils.other import ModulesToSaveWrapper

import lorakit
from lorakit.layers import LoraLayer, ModulesToSave, TrainableTokens
from tests import tiny_models as tm
from tests.peft_versions import peft_saved_names_end_at_a_dot

PREFIX = "base_model.model."

# (builder, target_modules, modules_to_save, task_type, the module trained in full)
OVERLAPS = {
    "lm_head": ("llama", ["q_proj", "lm_head"], ["lm_head"], "CAUSAL_LM"),
    "q_proj": ("llama", ["q_proj", "v_proj"], ["q_proj"], "CAUSAL_LM"),
    "classifier": ("bert", ["query", "classifier"], ["classifier"], "SEQ_CLS"),
    "seq_cls_head": ("bert", ["query", "classifier"], None, "SEQ_CLS"),
}


def _quiet(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make()


def _fields(case: str) -> dict:
    """Fresh fields each call (peft extends ``modules_to_save`` in place for SEQ_CLS)."""
    _, targets, saved, task = OVERLAPS[case]
    fields = dict(r=4, lora_alpha=8, target_modules=list(targets), task_type=task)
    return fields | ({} if saved is None else {"modules_to_save": list(saved)})


def _base(case: str) -> torch.nn.Module:
    return tm.BUILDERS[OVERLAPS[case][0]](0)


def _pair(case: str) -> tuple[torch.nn.Module, peft.PeftModel]:
    """lorakit's and peft's model for ``case``, injected under the same seed."""
    torch.manual_seed(123)
    ours = lorakit.inject(_base(case), lorakit.LoraConfig(**_fields(case)))
    torch.manual_seed(123)
    theirs = _quiet(lambda: peft.get_peft_model(_base(case), peft.LoraConfig(**_fields(case))))
    return ours, theirs


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tm.input_ids()).logits


def _modules_of(model: torch.nn.Module, kinds) -> list[str]:
    names = (n.removeprefix(PREFIX) for n, m in model.named_modules() if isinstance(m, kinds))
    return sorted(n for n in names if ".base_layer" not in n and ".original_module" not in n)


def _randomize_peft_copy_to_ours(ours: torch.nn.Module, theirs: peft.PeftModel) -> None:
    """Random values added to every trainable tensor of peft's model (LoRA B included, so it is
    non-zero), copied into lorakit's tensor of the same name."""
    generator = torch.Generator().manual_seed(7)
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
                mine[name.removeprefix(PREFIX)].copy_(parameter)


def _printed(show) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        show()
    return buffer.getvalue()


# ------------------------------------------------------ 1. target entry inside modules_to_save


@pytest.mark.parametrize("case", sorted(OVERLAPS))
def test_a_target_entry_inside_modules_to_save_is_left_out_of_lora_as_peft_does(case):
    ours, theirs = _pair(case)
    assert _modules_of(ours, LoraLayer) == _modules_of(theirs, PeftLoraLayer)
    assert _modules_of(ours, ModulesToSave) == _modules_of(theirs, ModulesToSaveWrapper)
    saved = OVERLAPS[case][2] or ["classifier"]
    assert any(n.endswith(saved[0]) for n in _modules_of(ours, ModulesToSave))
    assert not any(n.endswith(saved[0]) for n in _modules_of(ours, LoraLayer))
    ours_count = _printed(lambda: lorakit.print_trainable_parameters(ours))
    assert ours_count == _printed(theirs.print_trainable_parameters)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == sum(
        p.numel() for p in theirs.parameters() if p.requires_grad
    )


@pytest.mark.parametrize("case", sorted(OVERLAPS))
def test_a_target_entry_inside_modules_to_save_gives_peft_outputs(case):
    ours, theirs = _pair(case)
    _randomize_peft_copy_to_ours(ours, theirs)
    reference = _logits(theirs)
    assert not torch.allclose(reference, _logits(_base(case)), atol=1e-3)  # adapters act
    torch.testing.assert_close(_logits(ours), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(OVERLAPS))
def test_a_target_entry_inside_modules_to_save_loads_both_ways_with_peft(case, tmp_path):
    ours, theirs = _pair(case)
    _randomize_peft_copy_to_ours(ours, theirs)
    reference = _logits(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    lorakit.save_adapter(ours, tmp_path / "ours")

    loaded = lorakit.load_adapter(_base(case), tmp_path / "theirs", activate=True)
    torch.testing.assert_close(_logits(loaded), reference, rtol=1e-5, atol=1e-5)
    front_door = lorakit.PeftModel.from_pretrained(_base(case), tmp_path / "theirs")
    torch.testing.assert_close(_logits(front_door), reference, rtol=1e-5, atol=1e-5)
    by_peft = _quiet(lambda: peft.PeftModel.from_pretrained(_base(case), tmp_path / "ours"))
    assert _modules_of(by_peft, PeftLoraLayer) == _modules_of(ours, LoraLayer)
    torch.testing.assert_close(_logits(by_peft), reference, rtol=1e-5, atol=1e-5)


def test_an_entry_inside_modules_to_save_with_nothing_else_left_is_refused_as_peft_refuses():
    fields = dict(r=4, target_modules=["lm_head"], modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match="No modules were targeted"):
        _quiet(lambda: peft.get_peft_model(tm.llama(), peft.LoraConfig(**fields)))
    with pytest.raises(
        ValueError, match=r"modules_to_save entries \['lm_head'\] removed \['lm_head'\]"
    ):
        lorakit.inject(tm.llama(), lorakit.LoraConfig(**fields))


def test_an_entry_that_is_only_a_plain_string_ending_picks_nothing_as_in_peft_022():
    """``"proj"`` ends ``q_proj`` as a plain string only: peft 0.22 picks nothing with it
    (peft 0.21 picked the ``q_proj`` LoRA layers and failed: "modules_to_save cannot be
    applied"). lorakit follows 0.22: an entry matching no module is refused under
    ``strict_targets`` (the default); without it, the same LoRA layers as PEFT's, none saved."""
    fields = dict(r=4, target_modules=["q_proj"], modules_to_save=["proj"])
    with pytest.raises(ValueError, match=r"modules_to_save entries \['proj'\] match no"):
        lorakit.inject(tm.llama(), lorakit.LoraConfig(**fields))
    ours = lorakit.inject(tm.llama(), lorakit.LoraConfig(**fields), strict_targets=False)
    expected = [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    assert _modules_of(ours, LoraLayer) == expected and not _modules_of(ours, ModulesToSave)
    if peft_saved_names_end_at_a_dot():
        theirs = _quiet(lambda: peft.get_peft_model(tm.llama(), peft.LoraConfig(**fields)))
        assert _modules_of(theirs, PeftLoraLayer) == expected
        assert not _modules_of(theirs, ModulesToSaveWrapper)
    else:
        with pytest.raises(TypeError, match="modules_to_save cannot be applied"):
            _quiet(lambda: peft.get_peft_model(tm.llama(), peft.LoraConfig(**fields)))


# ------------------------------------------------------ 2. trainable token rows at init

TOKEN_CASES = {
    "llama-list": (
        "llama",
        dict(target_modules=["q_proj", "v_proj"], trainable_token_indices=[3, 4]),
        "model.embed_tokens",
        [3, 4],
    ),
    "bert-dict": (
        "bert",
        dict(
            target_modules=["word_embeddings", "query"],
            trainable_token_indices={"position_embeddings": [1, 2]},
            task_type="SEQ_CLS",
        ),
        "bert.embeddings.position_embeddings",
        [1, 2],
    ),
}


@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("case", sorted(TOKEN_CASES))
def test_token_rows_start_as_the_embedding_rows_as_peft_starts_them(case, init):
    arch, extra, embedding, indices = TOKEN_CASES[case]
    fields = dict(r=4, lora_alpha=8, init_lora_weights=init) | extra
    torch.manual_seed(0)
    ours = lorakit.inject(tm.BUILDERS[arch](0), lorakit.LoraConfig(**fields))
    torch.manual_seed(0)
    theirs = _quiet(lambda: peft.get_peft_model(tm.BUILDERS[arch](0), peft.LoraConfig(**fields)))

    wrapper = ours.get_submodule(embedding)
    assert isinstance(wrapper, TrainableTokens)
    rows = wrapper.modules_to_save["default"].values
    token_adapter = theirs.base_model.model.get_submodule(embedding).token_adapter
    peft_rows = token_adapter.trainable_tokens_delta["default"]
    original = tm.BUILDERS[arch](0).get_submodule(embedding).weight[indices]
    assert torch.equal(rows, original)
    assert torch.equal(rows, peft_rows)
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-6, atol=1e-6)


def test_a_second_adapter_with_init_false_copies_the_rows_as_peft_does():
    def fields(init):
        return dict(
            r=2,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            init_lora_weights=init,
            trainable_token_indices=[3, 5, 7],
        )

    theirs = _quiet(lambda: peft.get_peft_model(tm.llama(), peft.LoraConfig(**fields(True))))
    _quiet(lambda: theirs.add_adapter("second", peft.LoraConfig(**fields(False))))
    ours = lorakit.inject(tm.llama(), lorakit.LoraConfig(**fields(True)))
    lorakit.inject(ours, lorakit.LoraConfig(**fields(False)), "second")

    embedding = "model.embed_tokens"
    rows = ours.get_submodule(embedding).modules_to_save["second"].values
    token_adapter = theirs.base_model.model.get_submodule(embedding).token_adapter
    assert torch.equal(rows, token_adapter.trainable_tokens_delta["second"])
    assert torch.equal(rows, tm.llama().model.embed_tokens.weight[[3, 5, 7]])
