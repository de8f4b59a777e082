"""``lorakit.combine``: cat is exact, svd keeps the reported energy, the files load in lorakit
and in real peft with the same outputs, incompatible adapters are refused naming the module.

Two adapters on the tiny Llama with different ranks, alphas, rsLoRA, rank/alpha patterns and
target sets ("a": q_proj, v_proj; "b": v_proj, down_proj), non-zero B everywhere.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import lorakit
from lorakit.errors import BaseModelMismatchError, UserError
from lorakit.state import lora_layers
from tests.tiny_models import gpt2 as gpt2_model
from tests.tiny_models import input_ids, llama, llama_config, randomize_adapters

CONFIG_A = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
CONFIG_B = lorakit.LoraConfig(
    r=2,
    lora_alpha=3,
    use_rslora=True,
    target_modules=["v_proj", "down_proj"],
    rank_pattern={"down_proj": 3},
    alpha_pattern={"v_proj": 5},
)
WEIGHTS = [0.7, -0.3]


def _with_adapters(seed: int = 0):
    model = llama(seed)
    lorakit.inject(model, CONFIG_A, "a")
    lorakit.inject(model, CONFIG_B, "b")
    randomize_adapters(model, std=0.2)
    return model


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    """Directories of adapters "a" and "b" (saved as "default"), and the model holding both."""
    root = tmp_path_factory.mktemp("combine")
    model = _with_adapters()
    for name in ("a", "b"):
        single = llama()
        lorakit.inject(single, CONFIG_A if name == "a" else CONFIG_B)
        _copy_adapter(model, name, single, "default")
        lorakit.save_adapter(single, root / name)
    return root / "a", root / "b", model


def _copy_adapter(source, source_name, target, target_name) -> None:
    layers = dict(lora_layers(target))
    with torch.no_grad():
        for name, layer in lora_layers(source):
            if source_name in layer.ranks:
                pairs = zip(
                    layer.adapter_parameters(source_name),
                    layers[name].adapter_parameters(target_name),
                    strict=True,
                )
                for value, parameter in pairs:
                    parameter.copy_(value)


def _weighted_reference_logits(model, weights) -> torch.Tensor:
    """Both adapters active together, each B scaled by its weight (the adapters' own scales)."""
    reference = _with_adapters()
    with torch.no_grad():
        for _, layer in lora_layers(reference):
            for name, weight in zip(("a", "b"), weights, strict=True):
                if name in layer.ranks:
                    layer.adapter_parameters(name)[1].mul_(weight)
        lorakit.set_active(reference, ["a", "b"])
        return reference(input_ids()).logits


def _float64_sum(model, weights) -> dict[str, torch.Tensor]:
    """``Σ wᵢ sᵢ Bᵢ Aᵢ`` per module in float64, from the model's layers."""
    sums = {}
    for name, layer in lora_layers(model):
        for adapter, weight in zip(("a", "b"), weights, strict=True):
            if adapter in layer.ranks:
                lora_A, lora_B = (p.detach() for p in layer.adapter_parameters(adapter))
                delta = layer.scalings[adapter] * lora_B.double() @ lora_A.double()
                sums[name] = sums.get(name, 0) + weight * delta
    return sums


def _combined_deltas(result) -> dict[str, torch.Tensor]:
    return {
        name: result.scale_for(name) * lora_B.double() @ lora_A.double()
        for name, (lora_A, lora_B) in result.factors.items()
    }


def _loaded_logits(directory) -> torch.Tensor:
    model = llama()
    lorakit.load_adapter(model, directory)
    with torch.no_grad():
        return model(input_ids()).logits


def test_cat_equals_the_weighted_sum_and_running_both_adapters(two_adapters, tmp_path):
    dir_a, dir_b, model = two_adapters
    result = lorakit.combine([dir_a, dir_b], WEIGHTS, method="cat")
    expected = _float64_sum(model, WEIGHTS)
    deltas = _combined_deltas(result)
    assert sorted(deltas) == sorted(expected)  # the union of the target sets
    for name, delta in deltas.items():
        torch.testing.assert_close(delta, expected[name], rtol=1e-6, atol=1e-7)
    ranks = {report.name.rsplit(".", 1)[-1]: report.rank for report in result.modules}
    assert ranks == {"q_proj": 4, "v_proj": 6, "down_proj": 3}  # Σ rᵢ where present
    assert all(report.energy_kept == 1.0 for report in result.modules)
    result.save(tmp_path / "cat")
    logits = _loaded_logits(tmp_path / "cat")
    reference = _weighted_reference_logits(model, WEIGHTS)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        base = llama()(input_ids()).logits
    assert (logits - base).abs().max() > 1e-2  # the adapters do change the output


def test_adapters_on_a_model_combine_like_their_directories(two_adapters):
    dir_a, dir_b, model = two_adapters
    from_files = lorakit.combine([dir_a, dir_b], WEIGHTS, method="cat")
    from_model = lorakit.combine(["a", "b"], WEIGHTS, method="cat", model=model)
    assert from_model.config == from_files.config
    for name, (lora_A, lora_B) in from_files.factors.items():
        assert torch.equal(from_model.factors[name][0], lora_A)
        assert torch.equal(from_model.factors[name][1], lora_B)
    target = llama()
    from_model.add_to(target, "mix")
    lorakit.set_active(target, ["mix"])
    with torch.no_grad():
        logits = target(input_ids()).logits
    torch.testing.assert_close(
        logits, _weighted_reference_logits(model, WEIGHTS), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("rank", [1, 3, 10])
def test_svd_is_the_best_rank_r_fit_and_reports_the_energy_kept(two_adapters, rank):
    dir_a, dir_b, model = two_adapters
    result = lorakit.combine([dir_a, dir_b], WEIGHTS, method="svd", rank=rank)
    expected = _float64_sum(model, WEIGHTS)
    deltas = _combined_deltas(result)
    for report in result.modules:
        exact = expected[report.name]
        total_rank = {"q_proj": 4, "v_proj": 6, "down_proj": 3}[report.name.rsplit(".", 1)[-1]]
        assert report.rank == min(rank, total_rank)
        u, sigma, vh = torch.linalg.svd(exact, full_matrices=False)
        r = report.rank
        best = u[:, :r] @ torch.diag(sigma[:r]) @ vh[:r]
        torch.testing.assert_close(deltas[report.name], best, rtol=1e-5, atol=1e-6)
        energy = float((sigma[:r] ** 2).sum() / (sigma**2).sum())
        assert report.energy_kept == pytest.approx(energy, abs=1e-9)
        assert torch.linalg.matrix_rank(deltas[report.name]) == r
    if rank >= 6:  # every module keeps its full rank: exact
        assert all(report.energy_kept == pytest.approx(1.0) for report in result.modules)


def test_pruning_methods_act_on_the_updates_then_cut_by_svd(two_adapters):
    """At full rank the result is exactly PEFT's ``ties`` of the float64 updates sᵢ Bᵢ Aᵢ."""
    from peft.utils import merge_utils

    dir_a, dir_b, model = two_adapters
    result = lorakit.combine([dir_a, dir_b], WEIGHTS, method="ties", density=0.5, rank=64)
    deltas = _combined_deltas(result)
    for name, layer in lora_layers(model):
        present = [(a, w) for a, w in zip(("a", "b"), WEIGHTS, strict=True) if a in layer.ranks]
        updates = []
        for adapter, _ in present:
            lora_A, lora_B = (p.detach() for p in layer.adapter_parameters(adapter))
            updates.append(layer.scalings[adapter] * lora_B.double() @ lora_A.double())
        weights = torch.tensor([w for _, w in present], dtype=torch.float64)
        expected = merge_utils.ties(updates, weights, 0.5)
        torch.testing.assert_close(deltas[name], expected, rtol=1e-5, atol=1e-6)


def test_dare_is_seeded_and_reproducible(two_adapters):
    dir_a, dir_b, _ = two_adapters
    first, again, other = (
        lorakit.combine([dir_a, dir_b], WEIGHTS, method="dare_ties", density=0.3, seed=seed)
        for seed in (5, 5, 6)
    )
    name = first.modules[0].name
    assert torch.equal(first.factors[name][1], again.factors[name][1])
    assert not torch.allclose(first.factors[name][1], other.factors[name][1])


def test_combined_files_load_in_peft_with_identical_outputs(two_adapters, tmp_path):
    from peft import PeftModel

    dir_a, dir_b, _ = two_adapters
    for method, options in (("cat", {}), ("svd", {"rank": 2})):
        directory = tmp_path / method
        lorakit.combine([dir_a, dir_b], WEIGHTS, method=method, **options).save(directory)
        peft_model = PeftModel.from_pretrained(llama(), str(directory)).eval()
        with torch.no_grad():
            peft_logits = peft_model(input_ids()).logits
        torch.testing.assert_close(peft_logits, _loaded_logits(directory), rtol=1e-5, atol=1e-5)


def test_the_saved_adapter_keeps_the_base_fingerprint(two_adapters, tmp_path):
    dir_a, dir_b, _ = two_adapters
    lorakit.combine([dir_a, dir_b], WEIGHTS).save(tmp_path / "out")
    other_base = llama(seed=1)
    with pytest.raises(BaseModelMismatchError, match="different base weights"):
        lorakit.load_adapter(other_base, tmp_path / "out")


def test_different_base_weights_are_refused_naming_the_module(two_adapters, tmp_path):
    dir_a, _, _ = two_adapters
    other = llama(seed=1)
    lorakit.inject(other, CONFIG_B)
    randomize_adapters(other)
    lorakit.save_adapter(other, tmp_path / "other")
    with pytest.raises(BaseModelMismatchError, match=r"module model\.layers\.0\.self_attn\.v_proj"):
        lorakit.combine([dir_a, tmp_path / "other"], WEIGHTS)


def test_different_shapes_are_refused_naming_the_module(two_adapters, tmp_path):
    from transformers import LlamaForCausalLM

    dir_a, _, _ = two_adapters
    wider = LlamaForCausalLM(llama_config(hidden_size=32)).eval()
    lorakit.inject(wider, CONFIG_A)
    lorakit.save_adapter(wider, tmp_path / "wider")
    with pytest.raises(
        UserError, match=r"module model\.layers\.0\.self_attn\.q_proj: .* \(64, 64\)"
    ):
        lorakit.combine([dir_a, tmp_path / "wider"], WEIGHTS)


def test_adapters_with_trained_biases_or_saved_modules_are_refused(tmp_path):
    model = llama()
    lorakit.inject(model, CONFIG_A.replace(modules_to_save=["lm_head"]))
    lorakit.save_adapter(model, tmp_path / "saved")
    with pytest.raises(UserError, match="not a LoRA factor"):
        lorakit.combine([tmp_path / "saved", tmp_path / "saved"], [1, 1])


def test_dora_adapters_are_refused_on_a_model_and_from_a_directory(tmp_path):
    """A DoRA update is m / ||W0 + s B A|| (W0 + s B A) - W0, not B A: it has no low-rank sum
    (combining one on a model crashed on its three tensors; from a file the message blamed
    biases)."""
    model = llama()
    lorakit.inject(model, CONFIG_A.replace(use_dora=True))
    lorakit.inject(model, CONFIG_A, adapter_name="plain")
    lorakit.save_adapter(model, tmp_path / "dora")
    for sources in (["default", "plain"], [tmp_path / "dora", "plain"]):
        with pytest.raises(UserError, match=r"is a DoRA adapter .*combine plain LoRA adapters"):
            lorakit.combine(sources, [1, 1], model=model)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"weights": [1.0]}, "2 adapters but 1 weights"),
        ({"weights": [1.0, float("nan")]}, "finite"),
        ({"method": "linear"}, "unknown method 'linear'"),
        ({"method": "ties"}, "needs density"),
        ({"method": "ties", "density": 1.5}, "needs density in"),
        ({"method": "svd", "density": 0.5}, "density is for"),
        ({"method": "cat", "rank": 4}, "rank=4"),
        ({"method": "svd", "rank": 0}, "rank=0"),
        ({"method": "ties", "density": 0.5, "majority_sign_method": "max"}, "majority_sign"),
    ],
)
def test_bad_arguments_are_refused(two_adapters, arguments, message):
    dir_a, dir_b, _ = two_adapters
    options = {"weights": WEIGHTS} | arguments
    with pytest.raises(UserError, match=message):
        lorakit.combine([dir_a, dir_b], options.pop("weights"), **options)


def test_a_single_string_is_not_taken_for_a_list_of_adapters(two_adapters):
    dir_a, _, _ = two_adapters
    with pytest.raises(UserError, match="must be a list of adapters"):
        lorakit.combine(str(dir_a), [1.0])


def test_peft_written_adapters_without_fingerprint_combine(two_adapters, tmp_path):
    """An adapter saved by peft (no fingerprint) combines; the result carries the other's."""
    from peft import PeftModel

    dir_a, dir_b, model = two_adapters
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(llama(), str(dir_b))
    peft_model.save_pretrained(str(tmp_path / "by_peft"))
    result = lorakit.combine([dir_a, tmp_path / "by_peft"], WEIGHTS)
    for name, delta in _combined_deltas(result).items():
        torch.testing.assert_close(delta, _float64_sum(model, WEIGHTS)[name], rtol=1e-6, atol=1e-7)
    assert "model.layers.0.self_attn.q_proj" in result.fingerprint
    assert "model.layers.0.mlp.down_proj" not in result.fingerprint  # only b had it: no print


@pytest.mark.parametrize(
    ("builder", "first", "second"),
    [
        ("gpt2", ["c_attn"], ["c_attn", "c_fc"]),  # transformers Conv1D (fan_in_fan_out)
        ("llama", ["embed_tokens", "q_proj"], ["embed_tokens"]),  # embeddings
    ],
)
def test_conv1d_and_embedding_adapters_combine_exactly_and_load_in_peft(
    tmp_path, builder, first, second
):
    from peft import PeftModel

    from tests.tiny_models import BUILDERS

    directories = []
    for index, targets in enumerate((first, second)):
        model = BUILDERS[builder]()
        lorakit.inject(model, lorakit.LoraConfig(r=2 + index, lora_alpha=4, target_modules=targets))
        randomize_adapters(model, seed=index, std=0.2)
        directories.append(lorakit.save_adapter(model, tmp_path / str(index)))
    both = BUILDERS[builder]()
    for index, directory in enumerate(directories):
        lorakit.load_adapter(both, directory, f"adapter{index}")
        for _, layer in lora_layers(both):
            if f"adapter{index}" in layer.ranks:
                with torch.no_grad():
                    layer.adapter_parameters(f"adapter{index}")[1].mul_(WEIGHTS[index])
    lorakit.set_active(both, ["adapter0", "adapter1"])
    lorakit.combine(directories, WEIGHTS).save(tmp_path / "cat")
    combined = BUILDERS[builder]()
    lorakit.load_adapter(combined, tmp_path / "cat")
    peft_model = PeftModel.from_pretrained(BUILDERS[builder](), str(tmp_path / "cat")).eval()
    with torch.no_grad():
        expected = both(input_ids()).logits
        torch.testing.assert_close(combined(input_ids()).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(peft_model(input_ids()).logits, expected, rtol=1e-5, atol=1e-5)


def test_a_reader_that_ignores_the_patterns_computes_the_same_update(two_adapters, tmp_path):
    """vLLM's PEFTHelper takes one scale, lora_alpha / r, for every module and reads neither
    rank_pattern nor alpha_pattern: the combined file's modules of other ranks must not depend on
    them (each module's scale is 1)."""
    import json

    from safetensors.torch import load_file

    dir_a, dir_b, model = two_adapters
    lorakit.combine([dir_a, dir_b], WEIGHTS, method="cat").save(tmp_path / "cat")
    config = json.loads((tmp_path / "cat" / "adapter_config.json").read_text())
    assert config["rank_pattern"]  # ranks 4, 6 and 3: the patterns are needed
    one_scale = config["lora_alpha"] / config["r"]  # vLLM's rule
    tensors = load_file(tmp_path / "cat" / "adapter_model.safetensors")
    expected = _float64_sum(model, WEIGHTS)
    for key, lora_A in tensors.items():
        if ".lora_A." not in key:
            continue
        lora_B = tensors[key.replace(".lora_A.", ".lora_B.")]
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        delta = one_scale * lora_B.double() @ lora_A.double()
        torch.testing.assert_close(delta, expected[module], rtol=1e-6, atol=1e-7)


def test_bias_all_on_a_model_without_biases_combines_as_its_saved_file(tmp_path):
    """``bias="all"`` on a Llama (no biases) trains nothing but the LoRA factors: its saved file
    combines, and on the model it was refused ("trains biases"). A model with biases (GPT-2)
    is refused both ways, naming a bias."""
    model = llama()
    lorakit.inject(model, CONFIG_A.replace(bias="all"))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "saved")
    from_file = lorakit.combine([tmp_path / "saved"], [1.0])
    on_model = lorakit.combine(["default"], [1.0], model=model)
    assert set(on_model.factors) == set(from_file.factors) and on_model.factors
    for module, factors in on_model.factors.items():
        for got, want in zip(factors, from_file.factors[module], strict=True):
            assert torch.equal(got, want)
    gpt2 = lorakit.inject(gpt2_model(), lorakit.LoraConfig(r=2, bias="all"))
    lorakit.save_adapter(gpt2, tmp_path / "gpt2")
    for sources, model in (([tmp_path / "gpt2"], None), (["default"], gpt2)):
        with pytest.raises(UserError, match=r"bias"):
            lorakit.combine(sources, [1.0], model=model)
