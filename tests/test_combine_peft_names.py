"""``PeftModel.add_weighted_adapter``: PEFT's names and arguments, every method on ΔW; PEFT's
pitfalls (``linear`` and the other A/B-separate methods) refused, and shown to be pitfalls in
real PEFT; ``svd`` agrees with PEFT's where PEFT is right."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.state import lora_layers
from tests.peft_versions import peft_scales_rslora_combinations
from tests.tiny_models import input_ids, llama, randomize_adapters

CONFIG_A = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
CONFIG_B = lorakit.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])
WEIGHTS = [0.6, 0.4]


def _front_door():
    peft_model = lorakit.get_peft_model(llama(), CONFIG_A, "task")
    peft_model.add_adapter("style", CONFIG_B)
    randomize_adapters(peft_model.model, std=0.2)
    return peft_model


def _weighted_sum(peft_model) -> dict[str, torch.Tensor]:
    sums = {}
    for name, layer in lora_layers(peft_model.model):
        for adapter, weight in zip(("task", "style"), WEIGHTS, strict=True):
            lora_A, lora_B = (p.detach().double() for p in layer.adapter_parameters(adapter))
            sums[name] = sums.get(name, 0) + weight * layer.scalings[adapter] * lora_B @ lora_A
    return sums


def _delta(peft_model, name, adapter) -> torch.Tensor:
    layer = dict(lora_layers(peft_model.model))[name]
    lora_A, lora_B = (p.detach().double() for p in layer.adapter_parameters(adapter))
    return layer.scalings[adapter] * lora_B @ lora_A


def test_cat_is_the_weighted_sum_of_the_updates():
    peft_model = _front_door()
    peft_model.add_weighted_adapter(["task", "style"], WEIGHTS, "mix", combination_type="cat")
    assert peft_model.active_adapters == ["task"]  # not activated, as in PEFT
    for name, expected in _weighted_sum(peft_model).items():
        torch.testing.assert_close(_delta(peft_model, name, "mix"), expected)
    ids = input_ids()
    peft_model.set_adapter("mix")
    with torch.no_grad():
        mixed = peft_model(ids).logits
        with torch.no_grad(), lorakit.use_adapters(peft_model.model, []):
            base = peft_model(ids).logits
    assert (mixed - base).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("combination_type", "options"),
    [("svd", {"svd_rank": 8}), ("magnitude_prune_svd", {"svd_rank": 8, "density": 1.0})],
)
def test_svd_names_at_full_rank_are_exact(combination_type, options):
    peft_model = _front_door()
    peft_model.add_weighted_adapter(["task", "style"], WEIGHTS, "mix", combination_type, **options)
    for name, expected in _weighted_sum(peft_model).items():
        torch.testing.assert_close(_delta(peft_model, name, "mix"), expected, rtol=1e-5, atol=1e-6)


def test_svd_agrees_with_real_peft():
    """PEFT's ``svd`` is right for plain LoRA (only its A/B-separate methods are not)."""
    import peft

    peft_model = _front_door()
    peft_model.add_weighted_adapter(["task", "style"], WEIGHTS, "mix", "svd", svd_rank=3)
    real = peft.get_peft_model(
        llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), "task"
    )
    real.add_adapter(
        "style", peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    )
    _copy_to_peft(peft_model, real, ("task", "style"))
    real.add_weighted_adapter(["task", "style"], WEIGHTS, "mix", "svd", svd_rank=3)
    for name, _ in lora_layers(peft_model.model):
        peft_layer = real.base_model.model.get_submodule(name)
        expected = peft_layer.get_delta_weight("mix").double()
        torch.testing.assert_close(_delta(peft_model, name, "mix"), expected, rtol=1e-4, atol=1e-5)


def _copy_to_peft(ours, real, adapters) -> None:
    with torch.no_grad():
        for name, layer in lora_layers(ours.model):
            peft_layer = real.base_model.model.get_submodule(name)
            for adapter in adapters:
                lora_A, lora_B = layer.adapter_parameters(adapter)
                peft_layer.lora_A[adapter].weight.copy_(lora_A)
                peft_layer.lora_B[adapter].weight.copy_(lora_B)


def test_peft_linear_is_not_the_weighted_sum_and_lorakit_refuses_it():
    import peft

    peft_model = _front_door()
    real = peft.get_peft_model(
        llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), "task"
    )
    real.add_adapter(
        "style", peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    )
    _copy_to_peft(peft_model, real, ("task", "style"))
    real.add_weighted_adapter(["task", "style"], WEIGHTS, "mix", combination_type="linear")
    name, expected = next(iter(_weighted_sum(peft_model).items()))
    peft_delta = real.base_model.model.get_submodule(name).get_delta_weight("mix").double()
    assert (peft_delta - expected).norm() > 0.1 * expected.norm()  # PEFT's pitfall
    for combination_type in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"):
        with pytest.raises(ValueError, match="combines the A's and the B's separately"):
            peft_model.add_weighted_adapter(
                ["task", "style"], WEIGHTS, "x", combination_type, density=0.5
            )


def test_existing_names_unknown_adapters_and_svd_clamp_are_refused():
    peft_model = _front_door()
    with pytest.raises(ValueError, match="already has an adapter named 'style'"):
        peft_model.add_weighted_adapter(["task", "style"], WEIGHTS, "style", "cat")
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['other'\]"):
        peft_model.add_weighted_adapter(["task", "other"], WEIGHTS, "mix", "cat")
    with pytest.raises(ValueError, match="svd_clamp"):
        peft_model.add_weighted_adapter(["task", "style"], WEIGHTS, "mix", "svd", svd_clamp=0.99)
    with pytest.raises(ValueError, match="unknown combination_type"):
        peft_model.add_weighted_adapter(["task", "style"], WEIGHTS, "mix", "average")
    assert sorted(peft_model.peft_config) == ["style", "task"]


def test_cat_of_rslora_adapters_is_exact_where_peft_is_off_by_sqrt_of_the_rank():
    """PEFT before 0.22 gave ``cat`` of rsLoRA adapters √(Σrᵢ) times the exact sum; 0.22 is
    exact; lorakit's is exact."""
    import peft

    rslora = {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj"]}
    ours = lorakit.get_peft_model(llama(), lorakit.LoraConfig(**rslora), "task")
    ours.add_adapter("style", lorakit.LoraConfig(**rslora))
    randomize_adapters(ours.model, std=0.2)
    real = peft.get_peft_model(llama(), peft.LoraConfig(**rslora), "task")
    real.add_adapter("style", peft.LoraConfig(**rslora))
    _copy_to_peft(ours, real, ("task", "style"))
    ours.add_weighted_adapter(["task", "style"], [1.0, 1.0], "mix", "cat")
    real.add_weighted_adapter(["task", "style"], [1.0, 1.0], "mix", "cat")
    name = "model.layers.0.self_attn.q_proj"
    exact = _delta(ours, name, "task") + _delta(ours, name, "style")
    torch.testing.assert_close(_delta(ours, name, "mix"), exact)
    peft_delta = real.base_model.model.get_submodule(name).get_delta_weight("mix").double()
    factor = 8**0.5 if peft_scales_rslora_combinations() else 1.0
    torch.testing.assert_close(peft_delta, exact * factor, rtol=1e-5, atol=1e-6)


PEFT_NAMES = [
    "svd",
    "linear",
    "cat",
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
]


@pytest.mark.parametrize("combination_type", PEFT_NAMES)
@pytest.mark.parametrize("weight", [0.5, -0.7])
def test_one_adapter_is_combined_exactly_as_peft_does(combination_type, weight) -> None:
    """With ONE adapter PEFT switches every combination_type to ``linear`` (exact for one
    adapter: ``weight * ΔW`` at the adapter's rank), ignoring ``svd_rank``, ``density`` and
    ``majority_sign_method``: no pruning, no rank cut, no refusal. Real peft is the oracle."""
    import peft

    options = {"svd_rank": 2, "density": 0.3, "majority_sign_method": "frequency"}
    ours = _front_door()
    real = peft.get_peft_model(
        llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), "task"
    )
    real.add_adapter(
        "style", peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    )
    _copy_to_peft(ours, real, ("task", "style"))
    ours.add_weighted_adapter(["task"], [weight], "one", combination_type, **options)
    real.add_weighted_adapter(["task"], [weight], "one", combination_type, **options)
    for name, layer in lora_layers(ours.model):
        exact = weight * _delta(ours, name, "task")
        peft_delta = real.base_model.model.get_submodule(name).get_delta_weight("one").double()
        torch.testing.assert_close(peft_delta, exact, rtol=1e-5, atol=1e-7)  # PEFT: exact
        torch.testing.assert_close(_delta(ours, name, "one"), exact, rtol=1e-5, atol=1e-7)
        assert layer.ranks["one"] == 4  # the adapter's rank, as PEFT's
    assert sorted(ours.peft_config) == ["one", "style", "task"]


def test_one_adapter_with_patterns_and_rslora_is_exact_at_each_modules_rank() -> None:
    """Per-module ranks and scales (rank_pattern, alpha_pattern, rsLoRA) kept exactly: each
    module's update is ``weight * ΔW`` at its own rank (PEFT's copy of ``use_rslora`` would
    scale it by √r more, as with ``cat``)."""
    config = lorakit.LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"q_proj": 3},
    )
    ours = lorakit.get_peft_model(llama(), config, "task")
    randomize_adapters(ours.model, std=0.2)
    ours.add_weighted_adapter(["task"], [1.5], "one", "ties_svd", svd_rank=1, density=0.2)
    for name, layer in lora_layers(ours.model):
        exact = 1.5 * _delta(ours, name, "task")
        torch.testing.assert_close(_delta(ours, name, "one"), exact, rtol=1e-5, atol=1e-7)
        assert layer.ranks["one"] == layer.ranks["task"]
