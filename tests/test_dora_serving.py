"""DoRA adapters in the serving bank: a DoRA adapter is a LoRA adapter with ``f B`` in its B
stack plus a per-output gain ``f - 1`` on its rows' base output (bias excluded), so DoRA and
LoRA adapters share one batch. Checked against each request run alone and against peft."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch

import lorakit
from lorakit.serve import AdapterBank, prepare_for_serving, routed
from lorakit.serve.registry import AdapterRegistry, ServedAdapters
from lorakit.state import lora_layers
from tests import tiny_models

SPECS = {
    "lora": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "dora": dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True),
    "dora-qv": dict(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"], use_dora=True),
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _randomize(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in layer.adapter_names:
                lora_A, lora_B = layer.adapter_parameters(name)[:2]
                lora_A.copy_(torch.randn(lora_A.shape, generator=generator) * 0.1)
                lora_B.copy_(torch.randn(lora_B.shape, generator=generator) * 0.1)
                if layer.is_dora(name):
                    magnitude = layer.lora_magnitude_vector[name].weight
                    magnitude.mul_(1 + 0.3 * torch.randn(magnitude.shape, generator=generator))


@pytest.fixture(scope="module")
def setup():
    reference = tiny_models.llama()
    for name, spec in SPECS.items():
        lorakit.inject(reference, lorakit.LoraConfig(**spec), adapter_name=name)
    _randomize(reference)
    model = tiny_models.llama()
    prepare_for_serving(model, "all-linear")
    bank = AdapterBank(model, max_rank=4, capacity=4)
    for name in SPECS:
        bank.load_from_model(name, reference, name)
    return reference, model, bank


@pytest.mark.parametrize("mode", [None, "loop", "padded"])
def test_mixed_lora_and_dora_batch_equals_each_request_alone(setup, mode) -> None:
    reference, model, bank = setup
    picks = ["dora", "lora", None, "dora-qv", "dora", "lora", "dora-qv", None]
    ids = tiny_models.input_ids(len(picks), 5)
    slots = torch.tensor([bank.slot_of(p) if p else -1 for p in picks])
    with routed(bank, slots[:, None].expand(len(picks), 5), mode=mode):
        mixed = model(ids).logits
    for row, pick in enumerate(picks):
        with torch.no_grad(), lorakit.use_adapters(reference, [pick] if pick else []):
            alone = reference(ids[row : row + 1]).logits
        torch.testing.assert_close(mixed[row : row + 1], alone, rtol=0, atol=1e-5)
    with torch.no_grad(), lorakit.use_adapters(reference, ["lora"]):
        as_lora = reference(ids[:1]).logits
    assert (mixed[:1] - as_lora).abs().max() > 1e-2  # the DoRA row is not a LoRA row


def test_a_peft_dora_directory_is_served_with_peft_outputs(tmp_path) -> None:
    base = tiny_models.gpt2()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], use_dora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "lora_" in name:
                noise = torch.randn(parameter.shape, generator=generator) * 0.1
                parameter.add_(noise if "magnitude" not in name else noise * parameter)
    theirs.save_pretrained(tmp_path / "dora")
    model = copy.deepcopy(base)
    prepare_for_serving(model, ["c_attn", "c_fc"])
    bank = AdapterBank(model, max_rank=4, capacity=2)
    served = ServedAdapters(bank, AdapterRegistry(tmp_path), model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a peft file has no base fingerprint
        served.ensure_loaded("dora")  # the registry found the directory at start-up
    ids = tiny_models.input_ids(2, 6)
    with routed(bank, torch.full((2, 6), bank.slot_of("dora"))):
        got = model(ids).logits
    with torch.no_grad():
        expected = theirs.eval()(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (expected - base(ids).logits).abs().max() > 1e-2


def test_a_slot_reused_by_a_lora_adapter_loses_the_dora_gain(setup) -> None:
    reference, _, _ = setup
    model = tiny_models.llama()
    prepare_for_serving(model, "all-linear")
    bank = AdapterBank(model, max_rank=4, capacity=1)
    bank.load_from_model("dora", reference, "dora")
    slot = bank.slot_of("dora")
    bank.forget("dora")
    assert bank.load_from_model("lora", reference, "lora") == slot
    ids = tiny_models.input_ids(2, 5)
    with routed(bank, torch.full((2, 5), slot)):
        served = model(ids).logits
    with torch.no_grad(), lorakit.use_adapters(reference, ["lora"]):
        alone = reference(ids).logits
    torch.testing.assert_close(served, alone, rtol=0, atol=1e-5)


def test_a_dora_adapter_without_its_magnitudes_is_refused(setup) -> None:
    from lorakit.errors import AdapterFileError

    reference, _, bank = setup
    tensors = {
        f"base_model.model.{path}.{role}.weight": tensor
        for path, layer in lora_layers(reference)
        if "dora" in layer.ranks
        for role, tensor in zip(
            ("lora_A", "lora_B"), layer.adapter_parameters("dora"), strict=False
        )
    }
    config = lorakit.LoraConfig(**SPECS["dora"])
    with pytest.raises(AdapterFileError, match=r"uses DoRA but has no .*lora_magnitude_vector"):
        bank.prepare("broken", config, tensors)


def test_the_dora_gain_tables_are_counted_in_the_banks_memory(setup) -> None:
    reference, _, _ = setup
    model = tiny_models.llama()
    prepare_for_serving(model, "all-linear")
    bank = AdapterBank(model, max_rank=4, capacity=2)
    pools = bank.memory_bytes()
    bank.load_from_model("lora", reference, "lora")
    assert bank.memory_bytes() == pools  # no DoRA adapter: no gain table
    bank.load_from_model("dora", reference, "dora")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][:-1]  # (lm_head)
    gains = sum((bank.capacity + 1) * layer.out_features * 4 for layer in linears)
    assert bank.memory_bytes() == pools + gains
