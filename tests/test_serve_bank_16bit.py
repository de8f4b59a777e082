"""A bank that holds its adapters in 16 bits (``lorakit serve --adapter-dtype bfloat16``).

The adapters are rounded once, when written; every product stays float32. Reference: the same
adapters rounded to the bank's dtype and widened back, injected into a float32 model and run
one sequence at a time (``lorakit.use_adapters``), and a float64 formula per layer.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit.cli import build_parser
from lorakit.commands.serve import build
from lorakit.errors import UserError
from lorakit.serve import AdapterBank, prepare_for_serving, routed
from lorakit.serve.one_adapter import OneAdapterRouter, routed_one
from lorakit.state import lora_layers
from tests import tiny_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPECS = [
    dict(r=4, lora_alpha=12, target_modules="all-linear"),
    dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
]


def reference_model():
    """A float32 model with the SPECS adapters (non-zero A and B)."""
    model = tiny_models.llama()
    for index, spec in enumerate(SPECS):
        lorakit.inject(model, lorakit.LoraConfig(**spec), adapter_name=f"a{index}")
    tiny_models.randomize_adapters(model, std=0.3)
    return model


def rounded_copy(model, dtype):
    """``model`` with each adapter factor rounded to ``dtype`` and widened back (what a bank of
    that dtype holds)."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in rounded.named_parameters():
            if "lora_" in name:
                parameter.copy_(parameter.to(dtype).float())
    return rounded


def bank_of(reference, dtype):
    model = tiny_models.llama()
    prepare_for_serving(model, "all-linear")
    bank = AdapterBank(model, max_rank=8, capacity=4, dtype=dtype)
    for index in range(len(SPECS)):
        bank.load_from_model(f"a{index}", reference, f"a{index}")
    return model, bank


@pytest.fixture(scope="module")
def setup():
    exact = reference_model()
    model, bank = bank_of(exact, torch.bfloat16)
    return exact, rounded_copy(exact, torch.bfloat16), model, bank


@pytest.mark.parametrize("mode", ["loop", "padded"])
def test_a_bfloat16_bank_serves_the_rounded_adapters_with_float32_products(setup, mode):
    exact, rounded, model, bank = setup
    batch, length = 4, 20  # 20 rows of a slot: looped segments where mode allows
    ids = tiny_models.input_ids(batch, length)
    picks = [0, 1, -1, 1]
    slots = torch.tensor([bank.slot_of(f"a{p}") if p >= 0 else -1 for p in picks])
    with routed(bank, slots[:, None].expand(batch, length), mode=mode):
        served = model(ids).logits
    for row, pick in enumerate(picks):
        names = [f"a{pick}"] if pick >= 0 else []
        with torch.no_grad(), lorakit.use_adapters(rounded, names):
            alone = rounded(ids[row : row + 1]).logits
        with torch.no_grad(), lorakit.use_adapters(exact, names):
            unrounded = exact(ids[row : row + 1]).logits
        # float32 products of the rounded factors: float32's agreement, not bfloat16's
        torch.testing.assert_close(served[row : row + 1], alone, rtol=0, atol=2e-5)
        if pick >= 0:  # the factors were rounded (the bank holds 16 bits): the test can fail
            assert (served[row : row + 1] - unrounded).abs().max() > 1e-4


def test_the_one_adapter_route_of_a_bfloat16_bank_matches_the_float64_formula(setup):
    _, rounded, model, bank = setup
    name, layer = next(
        (n, lay) for n, lay in lora_layers(model) if n.endswith("layers.0.mlp.up_proj")
    )
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(3))
    router = OneAdapterRouter(bank, bank.slot_of("a1"))
    with routed_one(router):
        got = layer(x)
    ref_layer = dict(lora_layers(rounded))[name]
    lora_A, lora_B = (p.double() for p in ref_layer.adapter_parameters("a1"))
    expected = layer.base_layer(x).double() + (8 / 8) * x.double() @ lora_A.T @ lora_B.T
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)
    # what the products would give in bfloat16: far outside that agreement
    in_bf16 = x.bfloat16() @ lora_A.bfloat16().T @ lora_B.bfloat16().T
    assert (in_bf16.double() + layer.base_layer(x).double() - expected).abs().max() > 1e-3


def test_a_bfloat16_bank_holds_twice_the_pages_in_the_same_budget():
    model = tiny_models.llama()
    prepare_for_serving(model, "all-linear")
    budget = 400_000
    wide = AdapterBank(model, max_rank=8, memory_budget=budget)
    narrow = AdapterBank(model, max_rank=8, memory_budget=budget, dtype=torch.bfloat16)
    assert narrow.page_bytes * 2 == wide.page_bytes
    assert narrow.pages >= 2 * wide.pages - 1 and narrow.memory_bytes() <= budget
    assert narrow.compute_dtype == torch.float32 and wide.compute_dtype == torch.float32
    stack = narrow.stack_for(dict(lora_layers(model))["model.layers.0.self_attn.q_proj"])
    assert stack.lora_A.dtype == torch.bfloat16 and stack.scaling.dtype == torch.float32


def test_a_float32_bank_beside_a_bfloat16_base_loops_in_float32():
    """The looped segments computed in the base's bfloat16 before (the padded ones in float32):
    now both compute in float32 and round the sum once, into the base output."""
    exact = reference_model()
    model = tiny_models.llama().to(torch.bfloat16)
    prepare_for_serving(model, "all-linear")
    bank = AdapterBank(model, max_rank=8, capacity=4)  # float32 beside a bf16 base
    bank.load_from_model("a0", exact, "a0")
    name, layer = next(
        (n, lay) for n, lay in lora_layers(model) if n.endswith("layers.1.mlp.down_proj")
    )
    x = torch.randn(32, layer.in_features, generator=torch.Generator().manual_seed(5))
    x = x.bfloat16()
    base = layer.base_layer(x)
    lora_A, lora_B = (p.double() for p in dict(lora_layers(exact))[name].adapter_parameters("a0"))
    delta = (12 / 4) * x.double() @ lora_A.T @ lora_B.T
    expected = (base.double() + delta.float().bfloat16().double()).bfloat16()
    for mode in ("loop", "padded"):
        with routed(bank, torch.full((32,), bank.slot_of("a0")), mode=mode):
            got = layer(x)
        torch.testing.assert_close(got, expected, rtol=0, atol=0.02)


def test_lorakit_serve_takes_adapter_dtype(model_dir, tmp_path):
    adapters = tmp_path / "adapters"
    model = tiny_models.llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    tiny_models.randomize_adapters(model, std=0.1)
    lorakit.save_adapter(model, adapters / "one")
    args = build_parser().parse_args(
        [
            "serve",
            "--model",
            str(model_dir),
            "--adapters",
            str(adapters),
            "--adapter-dtype",
            "bfloat16",
        ]
    )
    app = build(args)
    bank = app.state.engine.bank
    assert bank.dtype == torch.bfloat16 and bank.compute_dtype == torch.float32
    with pytest.raises(UserError, match="--adapter-dtype: invalid choice: 'int8'"):
        build_parser().parse_args(["serve", "--adapters", str(adapters), "--adapter-dtype", "int8"])
