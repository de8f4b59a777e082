"""Files of peft < 0.22 read as their writer meant by the readers that do not go through
``load_adapter`` (``io.older_peft_files.read_as_written``): serving, combining, GGUF export and
reloading into an existing adapter. The oracle is the installed peft (0.21.2 writes the 0.21
files itself; under 0.22 they are written by peft 0.22 from the full names 0.21 picked, the
config then written as 0.21 writes it): the writing peft model's logits and LoRA factors, its
``add_weighted_adapter``, and what each version refuses.

- ``modules_to_save=["layernorm"]`` (0.21: every ``*_layernorm``; 0.22's rule: none) and
  ``["norm"]``: the trained copies are copies, not base weights (``save_embedding_layers``):
  serving and GGUF export say "modules_to_save", combining refuses them instead of carrying
  them into its result as base weights;
- a bare-ending token key (``"tokens"``) and ``["norm"]`` reload into the adapter loaded from
  the same file;
- a Qwen2-MoE file of 0.21 is served and combined as written; a transformers-4 DeepSeek-V3 file
  of 0.22, which adapts the fused experts on this model, is refused by combining as by peft.
"""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.errors import AdapterFileError, UserError
from lorakit.export.gguf_adapter import export_adapter
from lorakit.serve import AdapterBank, prepare_for_serving, routed
from lorakit.serve.registry import AdapterRegistry, ServedAdapters
from tests import tiny_models
from tests.gguf_helpers import reader_fields, reader_tensors
from tests.peft_versions import peft_saved_names_end_at_a_dot
from tests.test_core_review_fixes import _qwen2_moe
from tests.test_moe_review_fixes33 import _deepseek_v3, _write_transformers4_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYER_NORMS = [
    f"model.layers.{i}.{n}_layernorm" for i in (0, 1) for n in ("input", "post_attention")
]
NORMS = [*LAYER_NORMS, "model.norm"]
FIELDS = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
ENTRIES = {  # 0.21's entry -> the full names peft 0.21 picked with it on the tiny Llama
    "layernorm": {"modules_to_save": LAYER_NORMS},
    "norm": {"modules_to_save": NORMS},
}
IDS = tiny_models.input_ids(2, 6)


def _quiet(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make()


def _trained_peft(base, **fields) -> peft.PeftModel:
    """peft's model for ``fields`` on a copy of ``base``, every trainable tensor moved off its
    start (B, the saved copies, token rows), in eval mode."""
    model = _quiet(lambda: peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields)))
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval()


def _peft021_file(directory, base, full: dict, as_021: dict, **fields) -> peft.PeftModel:
    """A file as peft 0.21.2 writes it for ``fields | as_021`` on ``base`` (by peft itself
    when installed, else by peft 0.22 from ``full``, the names 0.21 picked, with the config
    rewritten as 0.21 writes it: the same tensor keys); returns the writing peft model."""
    if not peft_saved_names_end_at_a_dot():
        model = _trained_peft(base, **fields, **as_021)
        model.save_pretrained(directory)
        assert json.loads((directory / "adapter_config.json").read_text())["peft_version"] < "0.22"
        return model
    model = _trained_peft(base, **fields, **full)
    model.save_pretrained(directory)
    path = directory / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | as_021 | {"peft_version": "0.21.2"}))
    return model


def _saved_file(tmp_path, entry: str) -> tuple:
    directory = tmp_path / "adapters" / entry
    model = _peft021_file(
        directory, tiny_models.llama(), ENTRIES[entry], {"modules_to_save": [entry]}, **FIELDS
    )
    return directory, model


def _served(root, base, targets) -> tuple:
    model = copy.deepcopy(base)
    prepare_for_serving(model, targets)
    bank = AdapterBank(model, max_rank=8, capacity=2)
    return model, bank, ServedAdapters(bank, AdapterRegistry(root), model)


# ---------------------------------------------------------------- serving
@pytest.mark.parametrize("entry", ["layernorm", "norm"])
def test_serving_refuses_a_021_files_saved_copies_as_saved_copies(tmp_path, entry) -> None:
    """Before: a ``*_layernorm`` copy was read as a base weight copy (``save_embedding_layers``)
    the bank does not route."""
    _saved_file(tmp_path, entry)
    _, _, served = _served(tmp_path / "adapters", tiny_models.llama(), ["q_proj", "v_proj"])
    with pytest.raises(AdapterFileError) as refused:
        _quiet(lambda: served.read(entry))
    message = str(refused.value)
    assert "layernorm.weight" in message and "trained copy of a module (modules_to_save)" in message
    assert "save_embedding_layers" not in message


def test_serving_a_qwen2_moe_file_of_peft_021_gives_the_writers_logits(tmp_path) -> None:
    """peft 0.21 left Qwen2-MoE's targets as they are: the shared experts' linear layers and
    q_proj; served as written (0.22's rule would add the routed experts)."""
    base = _qwen2_moe()
    names = ["q_proj", "gate_proj", "up_proj", "down_proj"]
    full = {"target_modules": ["q_proj"] + [f"shared_expert.{n}" for n in names[1:]]}
    writer = _peft021_file(
        tmp_path / "adapters" / "moe", base, full, {"target_modules": names}, r=2, lora_alpha=4
    )
    model, bank, served = _served(tmp_path / "adapters", base, names)
    _quiet(lambda: served.ensure_loaded("moe"))
    with routed(bank, torch.full(IDS.shape, bank.slot_of("moe"))), torch.no_grad():
        got = model(IDS).logits
    with torch.no_grad():
        expected = writer(IDS).logits
    assert (expected - base(IDS).logits).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- combining
@pytest.mark.parametrize("with_model", [False, True])
def test_combining_refuses_a_021_files_saved_copies_as_peft_does(tmp_path, with_model) -> None:
    """Before: the ``*_layernorm`` copies of ``["layernorm"]`` were carried into the result as
    base weights. peft refuses two adapters that save the same module."""
    directory, writer = _saved_file(tmp_path, "layernorm")
    model = tiny_models.llama() if with_model else None
    with pytest.raises(UserError, match=r"layernorm\.weight.*module saved in full"):
        _quiet(lambda: lorakit.combine([directory, directory], model=model))
    if peft_saved_names_end_at_a_dot():  # (peft 0.22 reads "layernorm" as no module)
        writer.add_adapter("again", peft.LoraConfig(**FIELDS, **ENTRIES["layernorm"]))
    else:
        writer.load_adapter(str(directory), adapter_name="again")
    with pytest.raises(ValueError, match="modules_to_save"):
        writer.add_weighted_adapter(["default", "again"], [1.0, 1.0], "sum", "cat")


def _lora_deltas(tensors: dict, scale: float) -> dict[str, torch.Tensor]:
    return {
        key.removesuffix(".lora_A.weight"): scale
        * tensors[key.replace("lora_A", "lora_B")].double()
        @ tensors[key].double()
        for key in tensors
        if key.endswith(".lora_A.weight")
    }


def test_combining_qwen2_moe_files_of_peft_021_gives_the_weighted_sum(tmp_path) -> None:
    """Two Qwen2-MoE files of peft 0.21, combined with the model: the result holds their
    shared-expert layers, each ``s B A`` the weighted sum of the files' (float64), as peft
    0.21's ``add_weighted_adapter`` gives it where installed."""
    base = _qwen2_moe()
    names = ["q_proj", "gate_proj", "up_proj", "down_proj"]
    full = {"target_modules": ["q_proj"] + [f"shared_expert.{n}" for n in names[1:]]}
    directories = [tmp_path / name for name in ("a", "b")]
    for seed, directory in enumerate(directories):
        torch.manual_seed(seed)
        _peft021_file(directory, base, full, {"target_modules": names}, r=2, lora_alpha=4)
    weights = [0.7, -0.4]
    result = _quiet(lambda: lorakit.combine(directories, weights, model=copy.deepcopy(base)))
    files = [load_file(str(d / "adapter_model.safetensors")) for d in directories]
    wanted = {}
    for weight, tensors in zip(weights, files, strict=True):
        for key, delta in _lora_deltas(tensors, 4 / 2).items():
            wanted[key] = wanted.get(key, 0) + weight * delta
    assert {f"base_model.model.{m}" for m in result.factors} == set(wanted)
    assert any(".shared_expert." in key for key in wanted)
    for module, (lora_A, lora_B) in result.factors.items():
        got = result.scale_for(module) * lora_B.double() @ lora_A.double()
        torch.testing.assert_close(got, wanted[f"base_model.model.{module}"], rtol=0, atol=1e-5)
    if peft_saved_names_end_at_a_dot():
        return  # (peft 0.22 converts Qwen2-MoE: add_weighted_adapter refuses its experts)
    theirs = _quiet(lambda: peft.PeftModel.from_pretrained(copy.deepcopy(base), directories[0]))
    theirs.load_adapter(str(directories[1]), adapter_name="b")
    theirs.add_weighted_adapter(["default", "b"], weights, "mix", "cat")
    theirs.set_adapter("mix")
    ours = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), directories[0])
    result.add_to(ours, "mix")
    ours.set_adapter("mix")
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=0, atol=1e-5)


def test_combining_a_transformers4_moe_file_on_its_model_is_refused_as_peft_refuses(
    tmp_path,
) -> None:
    """A transformers-4 DeepSeek-V3 file of peft 0.22 adapts the fused routed experts on this
    model (bare parameters, ``target_parameters``); before, it was combined expert by expert
    into a result whose per-expert entries match no parameter of the model."""
    base = _deepseek_v3()
    directory = tmp_path / "v4"
    _write_transformers4_file(directory, peft_version="0.22.0")
    with pytest.raises(UserError, match="bare parameters"):
        _quiet(lambda: lorakit.combine([directory, directory], model=copy.deepcopy(base)))
    if peft_saved_names_end_at_a_dot():
        theirs = _quiet(lambda: peft.PeftModel.from_pretrained(copy.deepcopy(base), directory))
        theirs.load_adapter(str(directory), adapter_name="again")
        with pytest.raises(ValueError, match=r"nn\.Parameter"):
            theirs.add_weighted_adapter(["default", "again"], [1.0, 1.0], "sum", "cat")


# ---------------------------------------------------------------- GGUF export
def test_gguf_export_of_a_021_norm_file_drops_its_copies_as_copies(tmp_path) -> None:
    """Every layer norm copy of ``["norm"]`` is named a ``modules_to_save`` copy (before: the
    ``*_layernorm`` ones "not a LoRA factor"); the q/v pairs are written under llama.cpp's
    names, ``(alpha / r) B A`` of v_proj the writing peft model's ``s B A``."""
    directory, writer = _saved_file(tmp_path, "norm")
    done = export_adapter(
        directory, tiny_models.llama(), tmp_path / "a.gguf", drop_unsupported=True
    )
    copies = sorted(d.split(".weight:")[0].removeprefix("base_model.model.") for d in done.dropped)
    assert copies == sorted(NORMS)
    assert all("(modules_to_save)" in reason for reason in done.dropped)
    arrays = reader_tensors(done.path)
    assert set(arrays) == {
        f"blk.{i}.attn_{p}.weight.lora_{f}" for i in (0, 1) for p in ("q", "v") for f in ("a", "b")
    }
    alpha = reader_fields(done.path)["adapter.lora.alpha"]
    layer = writer.base_model.model.model.layers[1].self_attn.v_proj
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = (8 / 4) * lora_B.detach().double() @ lora_A.detach().double()
    got = (
        alpha / arrays["blk.1.attn_v.weight.lora_b"].shape[1] * arrays["blk.1.attn_v.weight.lora_b"]
    )
    np.testing.assert_allclose(
        got @ arrays["blk.1.attn_v.weight.lora_a"], expected.numpy(), atol=1e-6
    )


# ---------------------------------------------------------------- reloading
@pytest.mark.parametrize("entry", ["norm", "tokens"])
def test_a_021_file_reloads_into_the_adapter_loaded_from_it(tmp_path, entry) -> None:
    """``load_adapter`` into the adapter a 0.21 file was loaded as copies the file's tensors
    back (before: refused, the file read with 0.22's rule holding other tensors)."""
    if entry == "tokens":
        full = {"trainable_token_indices": {"model.embed_tokens": [3, 5]}}
        directory = tmp_path / "tokens"
        writer = _peft021_file(
            directory,
            tiny_models.llama(),
            full,
            {"trainable_token_indices": {"tokens": [3, 5]}},
            **FIELDS,
        )
    else:
        directory, writer = _saved_file(tmp_path, entry)
    model = _quiet(lambda: lorakit.PeftModel.from_pretrained(tiny_models.llama(), directory))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.zero_()
    _quiet(lambda: model.load_adapter(directory, adapter_name="default"))
    with torch.no_grad():
        expected = writer(IDS).logits
        torch.testing.assert_close(model.eval()(IDS).logits, expected, rtol=0, atol=1e-6)
