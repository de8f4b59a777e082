"""Session 37's inits review: PEFT files saved without conversion whose init rewrites the base.

1. A LoftQ file (``init_lora_weights: "loftq"``) on the ORIGINAL base: peft reruns LoftQ on each
   target's base (W0 -> Q) before loading A and B; lorakit loaded it as a plain LoRA onto W0
   (Llama's logits 0.06 off). The oracle is peft's own load (its ``loftq_init`` run on the CPU,
   as ``tests/test_init_loftq.py`` does, under peft 0.21 and 0.22 alike). On the base LoftQ left
   (the float ``Q``, or a bitsandbytes 4-bit base) the file loads as it is.
2. An OLoRA file on a GPT-2 ``Conv1D``: peft 0.22 factors ``W0`` (out, in) and reloads it
   exactly, and lorakit refused it; a file of peft before 0.22 (the stored, transposed weight
   factored) is still refused, saying so. Oracle: peft 0.22's load where installed, and a
   float64 formula, ``W_res = W0 - s Q[:, :r] R[:r]`` (``W0 = Q R``), for a file of either
   version.
"""

from __future__ import annotations

import copy
import json
import sys
import warnings
from pathlib import Path

import peft
import peft.tuners.lora.layer
import peft.utils.loftq_utils
import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import AdapterFileError
from lorakit.io import load_adapter
from tests import tiny_models
from tests.peft_versions import peft_inits_conv1d_as_linear
from tests.quantized_layers import bnb_4bit

TOLERANCE = 1e-5
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def _logits(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=tiny_models.input_ids()).logits


def _quiet_load(base: nn.Module, directory: Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (peft's files have no fingerprint: a warning says so)
        return load_adapter(base, directory)


def _perturbed(model: nn.Module) -> None:
    """Every LoRA tensor of a peft model moved off its init ("trained")."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


def _peft_loftq_file(kind: str, directory: Path, bits: int = 4, iterations: int = 1):
    """(peft's trained LoftQ model, its logits) after saving it, unconverted, to ``directory``
    (logits None where the installed peft's model fails: GPT-2 under peft < 0.22)."""
    config = peft.LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=TARGETS[kind],
        init_lora_weights="loftq",
        loftq_config=peft.LoftQConfig(loftq_bits=bits, loftq_iter=iterations),
    )
    trained = peft.get_peft_model(getattr(tiny_models, kind)(), config)
    _perturbed(trained)
    trained.save_pretrained(directory)
    assert json.loads((directory / "adapter_config.json").read_text())["init_lora_weights"] == (
        "loftq"
    )
    works = kind != "gpt2" or peft_inits_conv1d_as_linear()
    return trained, _logits(trained) if works else None


def _base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{module path: base weight}`` of every adapted layer (peft's or lorakit's)."""
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
            path = name.removeprefix("base_model.model.")
            found[path] = module.base_layer.weight.detach().clone()
    return found


# ------------------------------------------------------------------------------ 1. LoftQ
@pytest.mark.parametrize(
    ("kind", "bits", "iterations"), [("llama", 4, 1), ("llama", 8, 2), ("gpt2", 4, 1)]
)
def test_a_loftq_file_on_the_original_base_loads_as_peft_loads_it(
    peft_loftq_on_cpu, tmp_path, kind, bits, iterations
):
    _, trained = _peft_loftq_file(kind, tmp_path, bits, iterations)
    make = getattr(tiny_models, kind)
    if trained is None:  # peft < 0.22 ran LoftQ on GPT-2's stored (in, out) weight
        _refused_before_022(make(), tmp_path, "loftq")
        return
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path)
    ours = _quiet_load(make(), tmp_path)
    torch.testing.assert_close(_logits(theirs), trained, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=0, atol=TOLERANCE)
    their_bases, our_bases = _base_weights(theirs), _base_weights(ours)
    assert sorted(our_bases) == sorted(their_bases) and our_bases
    for name, weight in our_bases.items():
        assert torch.equal(weight, their_bases[name]), name  # LoftQ's Q, bit for bit


def test_a_loftq_file_on_the_base_loftq_left_is_loaded_as_it_is(peft_loftq_on_cpu, tmp_path):
    """The float ``Q`` (peft's unload) stays bit for bit; a bitsandbytes 4-bit base of ``W0``
    (iter 1: the same ``Q``) is left quantized (peft fails there: it reruns LoftQ on the packed
    codes)."""
    theirs, trained = _peft_loftq_file("llama", tmp_path)
    residual = copy.deepcopy(theirs).unload()
    before = {n: m.weight.detach().clone() for n, m in residual.named_modules() if "_proj" in n}
    ours = _quiet_load(residual, tmp_path)
    torch.testing.assert_close(_logits(ours), trained, rtol=0, atol=TOLERANCE)
    for name, weight in _base_weights(ours).items():
        assert torch.equal(weight, before[name]), name
    quantized_base = tiny_models.llama()
    for name in ("q_proj", "v_proj"):
        for layer in quantized_base.model.layers:
            linear = getattr(layer.self_attn, name)
            setattr(layer.self_attn, name, bnb_4bit(linear, double_quant=False))
    ours = _quiet_load(quantized_base, tmp_path)
    torch.testing.assert_close(_logits(ours), trained, rtol=0, atol=TOLERANCE)
    assert type(ours.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"


def test_a_loftq_file_over_other_adapters_is_refused_unless_loftq_keeps_the_base(
    peft_loftq_on_cpu, tmp_path
):
    """On ``W0`` under another adapter the rerun would change that adapter's base: refused
    before any change. On the ``Q`` base it changes nothing, so it loads beside them."""
    theirs, trained = _peft_loftq_file("llama", tmp_path)
    plain = lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    other = lorakit.inject(tiny_models.llama(), plain, adapter_name="other")
    tiny_models.randomize_adapters(other)
    want = _logits(other)
    with pytest.raises(AdapterFileError, match=r"q_proj'.*already holds adapters \['other'\]"):
        _quiet_load(other, tmp_path)
    torch.testing.assert_close(_logits(other), want, rtol=0, atol=0)
    on_q = lorakit.inject(copy.deepcopy(theirs).unload(), plain, adapter_name="other")
    _quiet_load(on_q, tmp_path)
    lorakit.set_active(on_q, "default")
    torch.testing.assert_close(_logits(on_q), trained, rtol=0, atol=TOLERANCE)


def test_a_loftq_file_without_bitsandbytes_is_refused_with_the_way_out(
    peft_loftq_on_cpu, tmp_path, monkeypatch
):
    _peft_loftq_file("llama", tmp_path)
    model = tiny_models.llama()
    want = _logits(model)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(AdapterFileError, match=r"reruns LoftQ.*pip install bitsandbytes"):
        _quiet_load(model, tmp_path)
    assert not hasattr(model.model.layers[0].self_attn.q_proj, "base_layer")
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)


# ------------------------------------------------------------------------------ 2. OLoRA, Conv1D
OLORA = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"])


def test_peft_olora_file_on_gpt2_loads_where_peft_0_22_wrote_it(tmp_path):
    """peft's own file: from 0.22 it loads, as peft's load does; 0.21's is refused, naming it."""
    torch.manual_seed(7)
    trained = peft.get_peft_model(
        tiny_models.gpt2(), peft.LoraConfig(**OLORA, init_lora_weights="olora")
    )
    _perturbed(trained)
    trained.save_pretrained(tmp_path)
    model = tiny_models.gpt2()
    if peft_inits_conv1d_as_linear():
        want = _logits(trained)
        torch.testing.assert_close(
            _logits(_quiet_load(model, tmp_path)), want, rtol=0, atol=TOLERANCE
        )
        theirs = peft.PeftModel.from_pretrained(tiny_models.gpt2(), tmp_path)
        torch.testing.assert_close(_logits(theirs), want, rtol=0, atol=TOLERANCE)
        return
    _refused_before_022(model, tmp_path, "olora")


def _refused_before_022(model: nn.Module, directory: Path, init: str) -> None:
    """Loading ``directory`` (peft < 0.22's ``init`` file on GPT-2) is refused naming the
    writer, and ``model`` is left as it was."""
    version = json.loads((directory / "adapter_config.json").read_text())["peft_version"]
    want = _logits(model)
    with pytest.raises(AdapterFileError, match=f"{init}' on the Conv1D .*peft {version}: peft b"):
        _quiet_load(model, directory)
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)


def _olora_file(directory: Path, peft_version: str | None) -> dict[str, torch.Tensor]:
    """A GPT-2 OLoRA file of random A and B (peft's layout, written by the installed peft as a
    plain LoRA), its config saying "olora" and ``peft_version`` (none when None); returns its
    tensors."""
    from safetensors.torch import load_file

    torch.manual_seed(3)
    model = peft.get_peft_model(
        tiny_models.gpt2(), peft.LoraConfig(**OLORA, init_lora_weights=False)
    )
    _perturbed(model)
    model.save_pretrained(directory)
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text()) | {"init_lora_weights": "olora"}
    config.pop("peft_version", None)
    if peft_version is not None:
        config["peft_version"] = peft_version
    config_path.write_text(json.dumps(config))
    return load_file(directory / "adapter_model.safetensors")


def _olora_oracle(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """GPT-2's logits with each adapted ``Conv1D`` holding ``W_res + s B A`` (float64):
    ``W0 = Q R`` (d, k), ``W_res = W0 - s Q[:, :r] R[:r]``, A and B the file's."""
    model, scale, rank = tiny_models.gpt2(), OLORA["lora_alpha"] / OLORA["r"], OLORA["r"]
    with torch.no_grad():
        for key, lora_A in tensors.items():
            if not key.endswith("lora_A.weight"):
                continue
            path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            lora_B = tensors[key.replace("lora_A", "lora_B")].double()
            conv1d = model.get_submodule(path)
            weight = conv1d.weight.double().T  # (d, k)
            q, r = torch.linalg.qr(weight)
            residual = weight - scale * q[:, :rank] @ r[:rank]
            conv1d.weight.copy_((residual + scale * lora_B @ lora_A.double()).T.float())
    return _logits(model)


def test_an_olora_file_on_conv1d_follows_its_writers_version(tmp_path):
    """peft_version 0.22 (and later): loaded as the formula says; below 0.22 or absent:
    refused naming the writer, the model unchanged."""
    tensors = _olora_file(tmp_path / "p22", "0.22.0")
    want = _olora_oracle(tensors)
    ours = _quiet_load(tiny_models.gpt2(), tmp_path / "p22")
    torch.testing.assert_close(_logits(ours), want, rtol=0, atol=1e-4)
    if peft_inits_conv1d_as_linear():
        theirs = peft.PeftModel.from_pretrained(tiny_models.gpt2(), tmp_path / "p22")
        torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=0, atol=TOLERANCE)
    for version, writer in [("0.21.2", "peft 0.21.2"), (None, "no peft_version")]:
        _olora_file(tmp_path / str(version), version)
        model = tiny_models.gpt2()
        before = _logits(model)
        with pytest.raises(
            AdapterFileError, match=f"Conv1D 'transformer.h.0.attn.c_attn'.*{writer}"
        ) as caught:
            _quiet_load(model, tmp_path / str(version))
        assert "peft before 0.22 ran this init on the stored" in str(caught.value)
        assert "peft >= 0.22 or lorakit" in str(caught.value)
        torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)


@pytest.mark.parametrize("init", ["pissa", "loftq"])
def test_a_base_changing_file_on_an_offloaded_base_is_refused_with_the_way_out(tmp_path, init):
    """The rerun reads and rewrites the base weight, which accelerate keeps on the meta device:
    refused before any change (a PiSSA file failed part-way, "Cannot copy out of meta tensor";
    a LoftQ file loaded without the rerun)."""
    from tests.offloaded_models import cpu_offloaded

    peft.get_peft_model(
        tiny_models.llama(), peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"])
    ).save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    settings = {"init_lora_weights": init, "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | settings))
    model = cpu_offloaded()
    want = _logits(model)
    with pytest.raises(AdapterFileError, match=r"q_proj' is offloaded by accelerate.*true in its"):
        _quiet_load(model, tmp_path)
    assert not hasattr(model.model.layers[0].self_attn.q_proj, "base_layer")
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)
