"""Review fix (round 35) of converting on save (``lorakit.io.convert``): an adapter whose config
says ``init_lora_weights="orthogonal"`` (``B0 != 0`` but ``B0 A0 = 0``: the base is left as it
was) is refused with "nothing to convert", as ``True`` / ``"gaussian"`` / ``False`` are. It was
converted into a rank-2r adapter without a fingerprint, because its non-zero ``B0`` read as
PEFT's recipe (the initial adapter saved with ``init_lora_weights=True``). That recipe, with no
record of the init anywhere but a non-zero ``B0``, still converts.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch

import lorakit
from lorakit.errors import UserError
from lorakit.io import load_adapter, read_adapter, save_adapter
from tests import tiny_models

FIELDS = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
FLOAT32_ROUNDING = 2e-6  # logits of the tiny models are O(0.1..1)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _inject(original, init, seed=0):
    torch.manual_seed(seed)
    config = lorakit.LoraConfig(**FIELDS, init_lora_weights=init)
    return lorakit.inject(copy.deepcopy(original), config)


def _train(model):
    tiny_models.sgd_steps(model, tiny_models.input_ids(seed=5), 1, lr=0.5)


def test_converting_an_orthogonal_adapter_is_refused_and_writes_nothing(tmp_path):
    original = tiny_models.llama()
    model = _inject(original, "orthogonal")
    save_adapter(model, tmp_path / "init")
    initial = read_adapter(tmp_path / "init")
    # what made it pass before: B0 is not zero, and the initial file's config says true
    B0 = [value for key, value in initial.tensors.items() if key.endswith("lora_B.weight")]
    assert len(B0) == 4 and all(value.abs().max() > 0.01 for value in B0)
    assert initial.config.init_lora_weights is True
    _train(model)
    with pytest.raises(
        UserError,
        match=r"nothing to convert.*init_lora_weights='orthogonal'.*without initial_adapter",
    ):
        save_adapter(model, tmp_path / "out", initial_adapter=tmp_path / "init")
    assert not (tmp_path / "out").exists()
    # the plain save already is the adapter of the original base, fingerprint included
    save_adapter(model, tmp_path / "plain")
    ids = tiny_models.input_ids()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_adapter(copy.deepcopy(original), tmp_path / "plain")
    assert read_adapter(tmp_path / "plain").config.r == 4
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)


def test_the_models_base_keeping_init_wins_over_an_initial_adapter_that_records_pissa(tmp_path):
    """The model's config decides: an initial adapter of a PiSSA init (its metadata says so)
    belongs to another model, and this adapter's orthogonal init left the base as it was."""
    original = tiny_models.llama()
    pissa = _inject(original, "pissa")
    save_adapter(pissa, tmp_path / "pissa_init")
    assert read_adapter(tmp_path / "pissa_init").metadata["lorakit.base_changing_init"] == "pissa"
    model = _inject(original, "orthogonal")
    _train(model)
    with pytest.raises(UserError, match=r"nothing to convert.*'orthogonal'"):
        save_adapter(model, tmp_path / "out", initial_adapter=tmp_path / "pissa_init")
    assert not (tmp_path / "out").exists()


def test_peft_recipe_pissa_files_without_any_record_of_the_init_still_convert(tmp_path):
    """PEFT's documented recipe writes init_lora_weights=True in both the initial and the trained
    file; lorakit loads the trained one onto the residual base and converts it by its non-zero
    B0: the result, on the ORIGINAL base, gives the trained logits."""
    original = tiny_models.llama()
    torch.manual_seed(0)
    config = peft.LoraConfig(**FIELDS, init_lora_weights="pissa")
    theirs = peft.get_peft_model(copy.deepcopy(original), config)
    theirs.peft_config["default"].init_lora_weights = True  # peft's documented recipe
    theirs.save_pretrained(tmp_path / "initial")
    _train(theirs)
    theirs.save_pretrained(tmp_path / "trained")
    ids = tiny_models.input_ids()
    trained = _logits(theirs, ids)
    assert read_adapter(tmp_path / "trained").config.init_lora_weights is True
    residual = copy.deepcopy(theirs).unload()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (peft's files carry no fingerprint)
        ours = load_adapter(residual, tmp_path / "trained")
    torch.testing.assert_close(_logits(ours, ids), trained, rtol=0, atol=FLOAT32_ROUNDING)
    save_adapter(ours, tmp_path / "converted", initial_adapter=tmp_path / "initial")
    converted = read_adapter(tmp_path / "converted")
    assert converted.config.r == 8 and converted.config.lora_alpha == 16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on_original = load_adapter(copy.deepcopy(original), tmp_path / "converted")
    torch.testing.assert_close(_logits(on_original, ids), trained, rtol=0, atol=FLOAT32_ROUNDING)
