"""Review fixes (session 34) of the base fingerprint (``lorakit.io.fingerprint``):

1. a base offloaded by accelerate (``cpu_offload``; transformers' ``device_map`` with "disk"
   entries: parameters on the meta device, values in the ``AlignDevicesHook``'s ``weights_map``)
   is checked from those values, so another base is refused; a base on the meta device with
   nothing to read it from loads with the "cannot verify" warning;
2. values in two dtypes are compared within the coarser dtype's own rounding (its ``eps``), not
   bfloat16's whatever the dtypes: a base 0.3% off is refused in float16 and float64 as in
   float32, while the same base still loads in bfloat16 / float16 / float64;
3. the refusal names the base the adapter was saved for and the model's name;
4. docs/migrating-from-peft.md gives the header size the fingerprint really takes.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from accelerate import cpu_offload

import lorakit
from lorakit.errors import BaseModelMismatchError
from lorakit.io import base_verdicts, fingerprint, fingerprint_json
from lorakit.io.read import read_adapter
from lorakit.serve import registry
from tests import tiny_models

MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
DOCS = Path(__file__).resolve().parents[1] / "docs"


def _save(model: torch.nn.Module, directory: Path) -> Path:
    lorakit.inject(
        model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    tiny_models.randomize_adapters(model, std=0.3)
    lorakit.save_adapter(model, directory)
    return directory


def _load(model: torch.nn.Module, directory: Path) -> list[str]:
    """Load ``directory`` onto ``model``; the warnings' messages."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorakit.load_adapter(model, directory)
    return [str(w.message) for w in caught]


def _offloaded(seed: int) -> torch.nn.Module:
    model = tiny_models.llama(seed=seed)
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    return model


# ---------------------------------------------------------------- 1. offloaded / meta bases
def test_offloaded_weights_are_read_from_accelerates_map() -> None:
    model = _offloaded(seed=0)
    q_proj = model.model.layers[0].self_attn.q_proj
    value = fingerprint.offloaded_weight(q_proj, "weight")
    assert torch.equal(value, tiny_models.llama(seed=0).model.layers[0].self_attn.q_proj.weight)
    assert fingerprint.compute(model, MODULES) == fingerprint.compute(tiny_models.llama(), MODULES)
    with torch.device("meta"):
        meta = tiny_models.LlamaForCausalLM(tiny_models.llama_config())
    assert fingerprint.offloaded_weight(meta.model.layers[0].self_attn.q_proj, "weight") is None
    assert fingerprint.compute(meta, MODULES) == {}


def test_an_offloaded_other_base_is_refused_and_its_own_base_loads(tmp_path) -> None:
    directory = _save(tiny_models.llama(seed=0), tmp_path / "adapter")
    assert _load(_offloaded(seed=0), directory) == []
    other = _offloaded(seed=1)
    with pytest.raises(BaseModelMismatchError, match=r"'model\.layers\.0\.self_attn\.q_proj'.*"):
        lorakit.load_adapter(other, directory)
    assert not lorakit.adapter_configs(other)


def test_a_disk_offloaded_other_base_from_a_device_map_is_refused(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    directory = _save(tiny_models.llama(seed=0), tmp_path / "adapter")
    tiny_models.llama(seed=1).save_pretrained(tmp_path / "other")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "disk",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    other = AutoModelForCausalLM.from_pretrained(
        tmp_path / "other",
        device_map=device_map,
        offload_folder=tmp_path / "offload",
        dtype=torch.float32,
    )
    assert other.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    with pytest.raises(BaseModelMismatchError, match=r"q_proj' does not match") as caught:
        lorakit.load_adapter(other, directory)
    assert f"This model is {str(tmp_path / 'other')!r}." in str(caught.value)


def test_a_meta_base_with_nothing_to_read_loads_with_the_cannot_verify_warning(tmp_path) -> None:
    directory = _save(tiny_models.llama(seed=0), tmp_path / "adapter")
    with torch.device("meta"):
        meta = tiny_models.LlamaForCausalLM(tiny_models.llama_config())
    assert base_verdicts.unverifiable(meta, {name: {} for name in MODULES}, MODULES) == MODULES
    messages = [m for m in _load(meta, directory) if "cannot verify" in m]
    assert len(messages) == 1, messages
    assert "the base weights of 4 of its modules" in messages[0]
    assert "on the meta device" in messages[0] and MODULES[0] in messages[0]


def test_uncovered_and_unreadable_modules_are_both_named(tmp_path) -> None:
    directory = _save(tiny_models.llama(seed=0), tmp_path / "adapter")
    stored = read_adapter(directory).fingerprint
    partial = {name: entry for name, entry in stored.items() if name != MODULES[1]}
    model = tiny_models.llama(seed=0)
    layer = model.get_submodule(MODULES[0])
    layer.weight = torch.nn.Parameter(torch.empty(layer.weight.shape, device="meta"))
    assert base_verdicts.unverifiable(model, partial, MODULES) == MODULES[:2]
    note = base_verdicts.unverified_note(model, partial, "x", MODULES)
    assert "does not cover 1 of its modules (model.layers.0.self_attn.v_proj)" in note
    assert "the base weights of 1 of its modules (model.layers.0.self_attn.q_proj)" in note
    assert base_verdicts.unverified_note(tiny_models.llama(), stored, "x", MODULES) is None


# --------------------------------------------------------------------- 2. dtype tolerance
def test_the_rounding_is_the_coarser_dtypes_own() -> None:
    f32 = torch.finfo(torch.float32)
    assert fingerprint.rounding_tolerance("float32", "float16") == (2.0**-10, 2.0**-24)
    assert fingerprint.rounding_tolerance("float16", "bfloat16") == (2.0**-7, 2.0**-24)
    assert fingerprint.rounding_tolerance("float32", "float64") == (f32.eps, f32.tiny * f32.eps)
    assert fingerprint.rounding_tolerance("float32", "bnb-nf4-dq") == (f32.eps, f32.tiny * f32.eps)
    expected = torch.tensor([1.1, 1.3 * 2.0**-20])  # (no 16-bit values: see the next test)
    off = expected * (1 + 0.003)  # 0.3% off: beyond float16's rounding, within bfloat16's
    assert not fingerprint.within_dtype_rounding(expected, off, "float32", "float16")
    assert fingerprint.within_dtype_rounding(expected, off, "float32", "bfloat16")
    assert fingerprint.within_dtype_rounding(expected, off)  # (no dtypes: bfloat16's, as before)


def test_a_16_bit_checkpoint_held_wider_is_judged_by_its_own_rounding() -> None:
    """An fp32 checkpoint against its bf16 conversion held in fp16 / fp64 (a loader's choice)
    was refused once each dtype had its own tolerance: the bf16 values count as bf16's."""
    torch.manual_seed(0)
    original = torch.randn(64) * 0.02
    converted = original.to(torch.bfloat16).to(torch.float32)
    assert "bfloat16" in fingerprint.held_as(converted)  # (fp16 too: small bf16 values are)
    assert fingerprint.held_as(original) == ()
    for held in ("float16", "float64", "float32"):
        assert fingerprint.within_dtype_rounding(original, converted, "float32", held)
    off = original * (1 + 0.003 * torch.sign(torch.randn(64)))
    assert not fingerprint.within_dtype_rounding(original, off.half().float(), "float32", "float16")


def _perturbed(relative: float) -> torch.nn.Module:
    """The seed-0 llama with every weight multiplied by 1 + u, u uniform in +-``relative``."""
    model = tiny_models.llama()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = 2 * torch.rand(parameter.shape, generator=generator) - 1
            parameter.mul_(1 + relative * noise)
    return model


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_a_base_0_3_percent_off_is_refused_in_float16_and_float64(tmp_path, dtype) -> None:
    directory = _save(tiny_models.llama(), tmp_path / "adapter")
    with pytest.raises(BaseModelMismatchError, match=r"beyond float32/float(16|64) rounding"):
        lorakit.load_adapter(_perturbed(0.003).to(dtype), directory)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_the_same_base_loads_in_every_float_dtype(tmp_path, dtype) -> None:
    directory = _save(tiny_models.llama(), tmp_path / "adapter")
    assert _load(tiny_models.llama().to(dtype), directory) == []


def test_tiny_bfloat16_weights_load_in_float16_within_its_subnormal_spacing(tmp_path) -> None:
    """Weights ~2e-6, below float16's normal range (6.1e-5): float16 rounds them to multiples
    of 2^-24, more than bfloat16's eps relative; the absolute term takes that rounding."""
    base = tiny_models.llama(dtype=torch.bfloat16)
    with torch.no_grad():
        for name in MODULES:
            base.get_submodule(name).weight.mul_(1e-4)
    reference = {name: base.get_submodule(name).weight.detach().clone() for name in MODULES}
    directory = _save(base, tmp_path / "adapter")
    same = tiny_models.llama(dtype=torch.bfloat16)
    with torch.no_grad():
        for name in MODULES:
            same.get_submodule(name).weight.copy_(reference[name])
    same = same.to(torch.float16)
    weight = same.get_submodule(MODULES[0]).weight.float()
    relative = ((weight - reference[MODULES[0]].float()).abs() / weight.abs()).max().item()
    assert relative > 2.0**-7  # (beyond bfloat16's eps: the absolute term is needed)
    assert _load(same, directory) == []


# ---------------------------------------------------------------------- 3. the error's text
def _named(seed: int, name: str) -> torch.nn.Module:
    model = tiny_models.llama(seed=seed)
    model.config._name_or_path = model.name_or_path = name  # (as from_pretrained(name) sets them)
    return model


def test_the_refusal_names_the_adapters_base_and_the_models(tmp_path) -> None:
    directory = _save(_named(0, "org/base-A"), tmp_path / "adapter")
    with pytest.raises(BaseModelMismatchError) as caught:
        lorakit.load_adapter(_named(1, "org/base-B"), directory)
    message = str(caught.value)
    assert "The adapter was saved for base model 'org/base-A'; this model is 'org/base-B'." in (
        message
    )
    assert message.endswith("or pass allow_base_mismatch=True to load it anyway.")
    with pytest.raises(BaseModelMismatchError) as caught:
        lorakit.load_adapter(_named(1, "org/base-A"), directory)
    assert "this model is 'org/base-A' (the same name: another revision" in str(caught.value)
    messages = [m for m in _loaded_anyway(_named(1, "org/base-B"), directory)]
    assert len(messages) == 1 and "this model is 'org/base-B'; loaded anyway" in messages[0]


def _loaded_anyway(model: torch.nn.Module, directory: Path) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorakit.load_adapter(model, directory, allow_base_mismatch=True)
    return [str(w.message) for w in caught if "loaded anyway" in str(w.message)]


def test_the_servers_check_refuses_naming_both_bases(tmp_path) -> None:
    directory = _save(_named(0, "org/base-A"), tmp_path / "adapter")
    adapter = read_adapter(directory)
    named = r"saved for base model 'org/base-A'; this model is 'org/base-B'\. Serve it"
    with pytest.raises(BaseModelMismatchError, match=named):
        registry.check_base(_named(1, "org/base-B"), adapter, allow_base_mismatch=False)
    registry.check_base(_named(0, "org/base-A"), adapter, allow_base_mismatch=False)


def test_a_resume_onto_another_base_names_both_bases(tmp_path) -> None:
    """``train --resume`` shares the refusal, and names the checkpoint's base too."""
    from lorakit.train.resume import check_resume_base

    _save(_named(0, "org/base-A"), tmp_path / "checkpoint" / "adapter")
    other = _named(1, "org/base-B")
    lorakit.inject(
        other, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    named = r"saved for base model 'org/base-A'; this model is 'org/base-B'\."
    with pytest.raises(BaseModelMismatchError, match=named):
        check_resume_base(other, tmp_path / "checkpoint", "default")


# ------------------------------------------------------------------------- 4. header size
def test_the_documented_header_size_of_llama_2_7b_is_what_the_fingerprint_takes() -> None:
    shapes = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096)}
    shapes |= {"o_proj": (4096, 4096), "gate_proj": (11008, 4096), "up_proj": (11008, 4096)}
    shapes["down_proj"] = (4096, 11008)
    weights = {shape: torch.zeros(shape, dtype=torch.float16) for shape in set(shapes.values())}
    entries = {}
    for layer in range(32):
        for name, shape in shapes.items():
            part = "mlp" if name.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn"
            key = f"model.layers.{layer}.{part}.{name}"
            entries[key] = fingerprint.weight_fingerprint(weights[shape])
    size = len(fingerprint_json.to_metadata(entries))
    text = (DOCS / "migrating-from-peft.md").read_text()
    found = re.search(
        r"about (\d+)\s+bytes per adapted module: (\d+) KB for Llama-2-7B's 224 modules", text
    )
    assert found is not None
    per_module, total = int(found.group(1)), int(found.group(2))
    assert abs(total * 1000 - size) <= 1000, (total, size)
    assert abs(per_module - size / 224) <= 10, (per_module, size / 224)


def test_combining_judges_two_fingerprints_by_the_coarser_dtypes_rounding() -> None:
    """``combine``'s check that two adapters are of one base used bf16's 2^-7 whatever the
    dtypes: an fp16 save of a base 0.3% off passed for the fp32 one."""
    from lorakit.combining.compatible import fingerprint_difference

    torch.manual_seed(0)
    weight = torch.randn(48, 40)
    off = weight * (1 + 0.003 * torch.sign(torch.randn(48, 40)))
    base = fingerprint.weight_fingerprint(weight)
    assert fingerprint_difference(base, fingerprint.weight_fingerprint(weight.half())) is None
    assert fingerprint_difference(base, fingerprint.weight_fingerprint(weight.bfloat16())) is None
    assert fingerprint_difference(base, fingerprint.weight_fingerprint(off.half())) is not None
    assert fingerprint_difference(base, fingerprint.weight_fingerprint(off.bfloat16())) is None
    converted = weight.bfloat16()  # its bf16 conversion, held in fp32 / fp16 (load accepts it)
    for held in (torch.float32, torch.float16, torch.float64):
        assert (
            fingerprint_difference(base, fingerprint.weight_fingerprint(converted.to(held))) is None
        )
