"""``lorakit.combine``'s entry points: lorakit's ``PeftModel`` is taken as the model inside it,
the combining maths follows the updates' device (the meta device stands in for a GPU), options
a method would ignore are refused alike by the API, the command line and the server's
mixtures, and an integral rank of any integer type is a rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.combining import combined, methods
from lorakit.errors import UserError
from lorakit.serve.mixtures import Mixture, parse_mixture
from lorakit.serve.protocol import APIError
from lorakit.state import lora_layers
from tests.tiny_models import llama, randomize_adapters

CONFIG_A = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
CONFIG_B = lorakit.LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _peft_model():
    """lorakit's ``PeftModel`` over the tiny Llama with adapters "a" and "b" (B != 0)."""
    wrapper = lorakit.get_peft_model(llama(), CONFIG_A, "a")
    wrapper.add_adapter("b", CONFIG_B)
    randomize_adapters(wrapper.model, std=0.2)
    return wrapper


def _model():
    """The tiny Llama with adapters "a" and "b" (B != 0), no wrapper."""
    model = llama()
    lorakit.inject(model, CONFIG_A, "a")
    lorakit.inject(model, CONFIG_B, "b")
    randomize_adapters(model, std=0.2)
    return model


def _assert_same_factors(first, second) -> None:
    assert first.factors.keys() == second.factors.keys()
    for name, (lora_A, lora_B) in first.factors.items():
        assert torch.equal(lora_A, second.factors[name][0]), name
        assert torch.equal(lora_B, second.factors[name][1]), name


# ------------------------------------------------------------------ lorakit's PeftModel


@pytest.mark.parametrize(("method", "options"), [("cat", {}), ("svd", {"rank": 2})])
def test_combine_takes_the_peft_wrapper_as_the_model_inside_it(method, options):
    wrapper = _peft_model()
    through_wrapper = lorakit.combine(
        ["a", "b"], [0.6, -0.4], method=method, model=wrapper, **options
    )
    inner = lorakit.combine(["a", "b"], [0.6, -0.4], method=method, model=wrapper.model, **options)
    _assert_same_factors(through_wrapper, inner)
    assert through_wrapper.fingerprint == inner.fingerprint
    assert through_wrapper.config.to_dict() == inner.config.to_dict()


def test_add_to_the_peft_wrapper_injects_into_the_model_inside_it():
    """The same tensors as ``add_to(wrapper.model)``; the wrapper is returned and lists it."""
    wrapper, reference = _peft_model(), _peft_model()
    result = lorakit.combine(["a", "b"], [0.6, -0.4], method="cat", model=wrapper)
    assert result.add_to(wrapper, "mix") is wrapper
    result.add_to(reference.model, "mix")
    assert "mix" in wrapper.peft_config and "mix" not in wrapper.active_adapters
    expected = dict(lora_layers(reference.model))
    layers = [(name, layer) for name, layer in lora_layers(wrapper.model) if "mix" in layer.ranks]
    assert {name for name, _ in layers} == set(result.factors)
    for name, layer in layers:
        got = layer.adapter_parameters("mix")
        for tensor, reference_tensor in zip(
            got, expected[name].adapter_parameters("mix"), strict=True
        ):
            assert torch.equal(tensor, reference_tensor), name


# ------------------------------------------------------------------ devices


def _meta_updates() -> list[torch.Tensor]:
    return [torch.empty(8, 6, device="meta", dtype=torch.float64) for _ in range(2)]


@pytest.mark.parametrize("method", sorted(methods.MERGERS))
def test_the_merged_update_stays_on_the_updates_device(method):
    """Meta tensors stand in for CUDA ones: every helper tensor must follow the updates."""
    options = {"density": 0.5} if method != "svd" else {}
    if method.startswith("dare"):
        options["generator"] = torch.Generator().manual_seed(0)
    merged = methods.MERGERS[method](_meta_updates(), [0.7, -0.3], **options)
    assert merged.device.type == "meta"
    assert merged.shape == (8, 6) and merged.dtype == torch.float64


def test_the_masks_follow_the_updates_device_and_dtype():
    update = _meta_updates()[0]
    magnitude = methods.magnitude_mask(update, 0.5)
    drawn = methods.random_keep_mask(update, 0.5, torch.Generator().manual_seed(0))
    for mask in (magnitude, drawn):
        assert (mask.device.type, mask.dtype, mask.shape) == ("meta", torch.float64, (8, 6))


def test_the_seeded_mask_is_drawn_on_the_cpu_as_before():
    """Bit-identical to ``torch.bernoulli`` of a float32 CPU tensor of density (PEFT's draw)."""
    update = torch.randn(12, 20, dtype=torch.float64)
    mask = methods.random_keep_mask(update, 0.3, torch.Generator().manual_seed(7))
    full = torch.full((12, 20), 0.3, dtype=torch.float32)
    expected = torch.bernoulli(full, generator=torch.Generator().manual_seed(7))
    assert mask.dtype == torch.float64 and torch.equal(mask, expected.double())


# ------------------------------------------------------------------ options a method ignores


def test_option_methods_are_the_methods_that_use_each_option():
    assert combined.OPTION_METHODS == {
        "density": ("ties", "dare_linear", "dare_ties", "magnitude_prune"),
        "majority_sign_method": ("ties", "dare_ties"),
        "seed": ("dare_linear", "dare_ties"),
    }


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            {"method": "svd", "majority_sign_method": "frequency"},
            "combine: majority_sign_method is for ties, dare_ties, not svd; leave it out or "
            "choose one of those methods",
        ),
        (
            {"method": "svd", "seed": 5},
            "combine: seed is for dare_linear, dare_ties, not svd; leave it out or choose one of "
            "those methods",
        ),
        (
            {"method": "ties", "density": 0.5, "seed": 123},
            "combine: seed is for dare_linear, dare_ties, not ties; leave it out or choose one "
            "of those methods",
        ),
        (
            {"method": "dare_linear", "density": 0.5, "majority_sign_method": "total"},
            "combine: majority_sign_method is for ties, dare_ties, not dare_linear; leave it out "
            "or choose one of those methods",
        ),
        (
            {"method": "cat", "seed": 0},
            "combine: seed is for dare_linear, dare_ties, not cat; leave it out or choose one of "
            "those methods",
        ),
        (
            {"method": "svd", "density": 0.5},
            "combine: density is for ties, dare_linear, dare_ties, magnitude_prune, not svd; "
            "leave it out or choose one of those methods",
        ),
        (
            {"method": "dare_ties", "density": 0.5, "seed": 1.5},
            "combine: seed must be an integer, got 1.5",
        ),
    ],
)
def test_options_the_method_would_ignore_are_refused(arguments, message):
    model = _model()
    with pytest.raises(UserError) as refused:
        lorakit.combine(["a", "b"], model=model, **arguments)
    assert str(refused.value) == message


@pytest.mark.parametrize(
    ("method", "given", "default"),
    [
        ("ties", {"majority_sign_method": "total"}, {}),
        ("dare_linear", {"seed": 0}, {}),
        ("dare_ties", {"seed": 0, "majority_sign_method": "total"}, {}),
    ],
)
def test_an_omitted_option_is_the_methods_default(method, given, default):
    model = _model()
    explicit = lorakit.combine(["a", "b"], method=method, density=0.5, model=model, **given)
    omitted = lorakit.combine(["a", "b"], method=method, density=0.5, model=model, **default)
    _assert_same_factors(explicit, omitted)
    assert explicit.extra == omitted.extra


def test_used_options_change_the_result():
    model = _model()
    first = lorakit.combine(["a", "b"], method="dare_ties", density=0.5, model=model, seed=1)
    second = lorakit.combine(["a", "b"], method="dare_ties", density=0.5, model=model, seed=2)
    name = next(iter(first.factors))
    assert not torch.equal(first.factors[name][0], second.factors[name][0])
    assert (first.extra["seed"], second.extra["seed"]) == (1, 2)


def test_add_weighted_adapter_still_ignores_them_as_peft_does():
    """PEFT's signature always passes majority_sign_method and seed; for svd they do nothing."""
    model = _peft_model()
    model.add_weighted_adapter(["a", "b"], [0.6, -0.4], "plain", "svd", svd_rank=2)
    model.add_weighted_adapter(
        ["a", "b"], [0.6, -0.4], "given", "svd", svd_rank=2, majority_sign_method="frequency"
    )
    for name, layer in lora_layers(model.model):
        if "plain" in layer.ranks:
            plain, given = layer.adapter_parameters("plain"), layer.adapter_parameters("given")
            assert all(torch.equal(p, g) for p, g in zip(plain, given, strict=True)), name


@pytest.mark.parametrize(
    ("mixture", "param", "message"),
    [
        (
            {"ids": ["a", "b"], "merge_strategy": "ties", "density": 0.5, "seed": 3},
            "merged_adapters.seed",
            "'merged_adapters.seed' is for dare_linear, dare_ties, not ties; leave it out or "
            "choose one of those methods",
        ),
        (
            {"ids": ["a", "b"], "merge_strategy": "svd", "majority_sign_method": "frequency"},
            "merged_adapters.majority_sign_method",
            "'merged_adapters.majority_sign_method' is for ties, dare_ties, not svd; leave it "
            "out or choose one of those methods",
        ),
        (
            {"ids": ["a", "b"], "merge_strategy": "linear", "density": 0.5},
            "merged_adapters.density",
            "'merged_adapters.density' is for ties, dare_linear, dare_ties, magnitude_prune, not "
            "cat; leave it out or choose one of those methods",
        ),
    ],
)
def test_a_mixture_with_an_option_its_method_ignores_is_a_400_naming_the_entry(
    mixture, param, message
):
    with pytest.raises(APIError) as refused:
        parse_mixture(mixture)
    assert (refused.value.status, refused.value.param) == (400, param)
    assert refused.value.message == message


def test_a_mixture_passes_only_the_options_given():
    assert parse_mixture({"ids": ["a"], "merge_strategy": "ties", "density": 0.5}) == Mixture(
        ids=("a",), weights=(1.0,), method="ties", density=0.5
    )
    parsed = parse_mixture({"ids": ["a"], "merge_strategy": "dare_ties", "density": 1, "seed": 4})
    assert (parsed.seed, parsed.majority_sign_method, parsed.density) == (4, None, 1.0)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("combine_api")
    model = _model()
    for name in ("a", "b"):
        lorakit.save_adapter(model, root, adapter_name=name)
    return root / "a", root / "b"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--method", "ties", "--density", "0.5", "--seed", "3"],
            "combine: --seed is for dare_linear, dare_ties, not ties; leave it out or choose one "
            "of those methods",
        ),
        (
            ["--method", "svd", "--majority-sign", "frequency"],
            "combine: --majority-sign is for ties, dare_ties, not svd; leave it out or choose "
            "one of those methods",
        ),
    ],
)
def test_the_command_line_refuses_them_as_before(adapter_dirs, tmp_path, capsys, extra, message):
    dir_a, dir_b = adapter_dirs
    output = tmp_path / "never"
    assert main(["combine", str(dir_a), str(dir_b), *extra, "--output", str(output)]) == 2
    assert capsys.readouterr().err.strip().endswith(message)
    assert not output.exists()


def test_the_command_line_passes_the_options_it_is_given(adapter_dirs, tmp_path, capsys):
    dir_a, dir_b = adapter_dirs
    options = ["--method", "dare_ties", "--density", "0.5", "--seed", "3", "--json"]
    arguments = ["combine", str(dir_a), str(dir_b), *options, "--majority-sign", "frequency"]
    assert main([*arguments, "--output", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    expected = lorakit.combine(
        [dir_a, dir_b], method="dare_ties", density=0.5, seed=3, majority_sign_method="frequency"
    )
    _assert_same_factors(lorakit.combine([tmp_path / "out"]), expected)


# ------------------------------------------------------------------ rank


@pytest.mark.parametrize("rank", [np.int64(2), np.int32(2), np.uint8(2)])
def test_an_integral_rank_of_any_integer_type_is_a_rank(rank):
    model = _model()
    result = lorakit.combine(["a", "b"], method="svd", rank=rank, model=model)
    reference = lorakit.combine(["a", "b"], method="svd", rank=2, model=model)
    _assert_same_factors(result, reference)
    assert type(result.extra["rank"]) is int and result.extra["rank"] == 2
    assert result.config.r == 2


@pytest.mark.parametrize("rank", [True, 2.0, np.float64(2.0), "2"])
def test_a_rank_that_is_not_an_integer_is_refused(rank):
    model = _model()
    with pytest.raises(UserError, match=r"must be a positive integer"):
        lorakit.combine(["a", "b"], method="svd", rank=rank, model=model)
