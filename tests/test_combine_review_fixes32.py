"""Review fixes (session 32) of combining and of the server's mixtures.

- ``combine`` put ``cᵢ = wᵢ sᵢ / s`` whole into ``Bᵢ`` and never checked its result: a weight
  of 1e39 saved inf into lora_B (``lorakit combine`` exit 0), one of 1e6 values of 2.5e6, and
  ``load_adapter`` refused both files. ``cat`` now shares ``cᵢ`` between A and B by a power of
  two (exact: the products ``Bᵢ Aᵢ`` are bit for bit those of the single rounding of ``cᵢ Bᵢ``),
  so 1e6 stays within float16's range, and a factor that still holds values no file may hold
  is refused (``FactorRangeError``, the rule of the file reader: ``unwritable``) naming the
  module and the weights, before anything is returned or written.
- A mixture with ``merge_strategy`` "linear" (or "cat") and ``rank`` was a 400 on
  ``merged_adapters`` saying "not cat"; it is now refused on ``merged_adapters.rank`` naming
  the strategy as sent, as ``density`` and ``seed`` are (docs/serving.md).
"""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit import functional
from lorakit.cli import main
from lorakit.combining.combined import FactorRangeError
from lorakit.errors import UserError
from lorakit.io.tensors import MAX_ABS_VALUE, unwritable
from lorakit.serve.mixtures import parse_mixture
from lorakit.serve.protocol import APIError
from tests import serving
from tests.serving import assert_error
from tests.tiny_models import llama, randomize_adapters

CONFIG_A = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])  # s = 2
CONFIG_B = lorakit.LoraConfig(
    r=3, lora_alpha=2, use_rslora=True, target_modules=["v_proj", "down_proj"]
)  # s = 2 / √3


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("combine32")
    for name, config, seed in (("a", CONFIG_A, 3), ("b", CONFIG_B, 4)):
        model = llama()
        lorakit.inject(model, config)
        randomize_adapters(model, seed=seed, std=0.3)
        lorakit.save_adapter(model, root / name)
    return root / "a", root / "b"


def _one_rounding_products(directories, weights) -> dict[str, torch.Tensor]:
    """module -> float64 ``[round32(c₁B₁), …] @ [A₁; …]`` with ``cᵢ = wᵢ sᵢ`` (the output's
    scale is 1): what ``cat`` computed before, with one float32 rounding of ``cᵢ Bᵢ``, from the
    files (``functional.scaling``: PEFT's scales)."""
    blocks: dict[str, tuple[list, list]] = {}
    for directory, weight in zip(directories, weights, strict=True):
        adapter = lorakit.read_adapter(directory)
        config = adapter.config
        scale = functional.scaling(config.r, config.lora_alpha, config.use_rslora)
        for key, lora_A in adapter.tensors.items():
            if key.endswith("lora_A.weight"):
                module = key[len("base_model.model.") : -len(".lora_A.weight")]
                lora_B = adapter.tensors[key.replace("lora_A", "lora_B")]
                scaled_B = (lora_B.double() * (weight * scale)).float().double()
                found = blocks.setdefault(module, ([], []))
                found[0].append(scaled_B)
                found[1].append(lora_A.double())
    return {m: torch.cat(b, dim=1) @ torch.cat(a, dim=0) for m, (b, a) in blocks.items()}


def _products(result) -> dict[str, torch.Tensor]:
    return {
        name: result.scale_for(name) * lora_B.double() @ lora_A.double()
        for name, (lora_A, lora_B) in result.factors.items()
    }


# ---------------------------------------------------------------- cat: exact and in range


@pytest.mark.parametrize("weights", [[1e6, -3e5], [-1e6, 2.5e7]])
def test_cat_with_large_weights_stays_within_range_exactly_and_loads(
    adapter_dirs, tmp_path, weights
):
    """A weight of 1e6 gave lora_B values of ~1e6, beyond what a file may hold: the scale is
    now shared between A and B by a power of two, and the products are unchanged, bit for bit."""
    result = lorakit.combine(list(adapter_dirs), weights)
    largest = max(float(t.abs().max()) for pair in result.factors.values() for t in pair)
    assert 100.0 < largest <= MAX_ABS_VALUE
    expected = _one_rounding_products(adapter_dirs, weights)
    got = _products(result)
    assert sorted(got) == sorted(expected)
    for module, product in got.items():
        assert torch.equal(product, expected[module]), module
    result.save(tmp_path / "big")
    model = lorakit.load_adapter(llama(), tmp_path / "big", adapter_name="big")
    assert model is not None  # (the file reader took it: no value beyond +-65504)


def test_cat_with_ordinary_weights_keeps_the_products_bit_for_bit(adapter_dirs):
    """The split moves exact powers of two only: ordinary weights give the products of the one
    rounding of ``cᵢ Bᵢ``, and ``|cᵢ|`` in [1/2, 2) leaves ``Aᵢ`` as it is in the file."""
    weights = [0.7, -0.3]
    result = lorakit.combine(list(adapter_dirs), weights)
    expected = _one_rounding_products(adapter_dirs, weights)
    for module, product in _products(result).items():
        assert torch.equal(product, expected[module]), module
    a = lorakit.read_adapter(adapter_dirs[0])
    name = "model.layers.0.self_attn.q_proj"  # only in "a", c = 0.7 * 2 = 1.4
    assert torch.equal(result.factors[name][0], a.tensors[f"base_model.model.{name}.lora_A.weight"])


# ---------------------------------------------------------------- values no file may hold


@pytest.mark.parametrize(
    ("weights", "method", "options"),
    [
        ([1e39, 1.0], "cat", {}),  # c B is inf in float32
        ([1e20, 1.0], "cat", {}),  # √c ~ 1e10: finite, beyond +-65504
        ([1e39, 1.0], "svd", {"rank": 2}),  # √σ ~ 3e19
    ],
)
def test_weights_that_break_the_factors_are_refused_naming_module_and_weights(
    adapter_dirs, weights, method, options
):
    with pytest.raises(FactorRangeError) as caught:
        lorakit.combine(list(adapter_dirs), weights, method=method, **options)
    message = str(caught.value)
    assert isinstance(caught.value, UserError)
    assert "model.layers.0.self_attn.q_proj" in message  # the first module combined
    assert f"{adapter_dirs[0]}: {weights[0]:g}" in message
    assert "+-65504" in message and "use smaller weights" in message


def test_the_command_line_refuses_such_weights_and_writes_nothing(adapter_dirs, tmp_path, capsys):
    output = tmp_path / "inf"
    arguments = ["combine", str(adapter_dirs[0]), "--weights", "1e39", "--output", str(output)]
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert "1e+39" in error and "use smaller weights" in error and "q_proj" in error
    assert not output.exists()


def test_unwritable_is_the_file_readers_rule():
    limit = torch.tensor([MAX_ABS_VALUE, -MAX_ABS_VALUE])
    assert not unwritable(limit) and not unwritable(limit.half())
    assert unwritable(torch.tensor([0.0, 65505.0])) and unwritable(torch.tensor([-7e4]))
    assert unwritable(torch.tensor([1.0, float("nan")])) and unwritable(
        torch.tensor([-float("inf")])
    )
    assert unwritable(torch.tensor([1e5], dtype=torch.bfloat16))
    assert not unwritable(torch.empty(0, 3)) and not unwritable(torch.tensor([10**6]))


# ---------------------------------------------------------------- the server's mixtures


@pytest.mark.parametrize(
    ("fields", "shown"),
    [
        ({"merge_strategy": "linear"}, "'linear'"),
        ({"merge_strategy": "cat"}, "'cat'"),
        ({}, "'cat'"),
    ],
)
def test_rank_for_linear_or_cat_is_refused_on_the_rank_entry(fields, shown):
    with pytest.raises(APIError) as caught:
        parse_mixture({"ids": ["a", "b"], "rank": 3, **fields})
    error = caught.value
    assert error.status == 400 and error.param == "merged_adapters.rank"
    assert f"not {shown}" in error.message and "svd" in error.message
    assert parse_mixture({"ids": ["a"], "rank": 3, "merge_strategy": "svd"}).rank == 3


def test_served_mixtures_with_large_weights(tmp_path):
    """A weight of 1e6 is served as the same combination saved and served as an adapter; one
    of 1e20 is a 400 on ``merged_adapters.weights`` naming the adapter, not the server's path;
    ``rank`` with ``linear`` is a 400 on ``merged_adapters.rank`` before combining."""
    root, tokenizer = serving.write_adapters(tmp_path)
    adapters = root / "adapters"
    lorakit.combine([adapters / "ad0"], [1e6]).save(adapters / "big")
    server = serving.Served(root, tokenizer)
    with server.client:
        mixed = serving.served_logprobs(
            server, serving.BASE, merged_adapters={"ids": ["ad0"], "weights": [1e6]}
        )
        saved = serving.served_logprobs(server, "big")
        base = serving.served_logprobs(server, serving.BASE)
        body = serving.completion(model=serving.BASE)
        mixtures = server.app.state.mixtures
        refused = server.post(
            "/v1/completions", dict(body, merged_adapters={"ids": ["ad0"], "weights": [1e20]})
        )
        combined = mixtures.combined
        rank = server.post(
            "/v1/completions",
            dict(body, merged_adapters={"ids": ["ad0"], "merge_strategy": "linear", "rank": 3}),
        )
    assert mixed == saved and mixed != base
    error = assert_error(refused, 400, "merged_adapters.weights", "ad0: 1e+20", "smaller")
    assert str(tmp_path) not in error["message"]
    assert_error(rank, 400, "merged_adapters.rank", "not 'linear'")
    assert mixtures.combined == combined
