"""Review fixes (session 29) of combining: adapters of different base models that share no
module are refused (compared by their layer stacks); ``PeftModel.add_weighted_adapter`` takes
PEFT's positional arguments; every refusal of the PEFT-named entry point is a ``ValueError``; a
misspelled adapter name with ``model=`` says so; PEFT's rsLoRA-first scaling by √r (documented)
holds for ``svd`` and one adapter, where lorakit is exact."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.combining.compatible import check_compatible, layer_containers
from lorakit.combining.peft_names import PeftArgumentError
from lorakit.combining.sources import AdapterUpdates, ModuleFactors
from lorakit.errors import AdapterFileError, UserError
from lorakit.state import lora_layers
from tests.peft_versions import peft_scales_rslora_combinations
from tests.tiny_models import gpt2, llama, randomize_adapters


def _saved(tmp_path, name, model, config, seed=3):
    """``model`` with adapter ``config`` (B != 0) saved in ``tmp_path/name``."""
    wrapper = lorakit.get_peft_model(model, config)
    randomize_adapters(wrapper.model, seed=seed, std=0.2)
    wrapper.save_pretrained(tmp_path / name)
    return tmp_path / name, wrapper


def _deltas(wrapper, adapter) -> dict[str, torch.Tensor]:
    """module -> ``s B A`` (float64) of ``adapter`` on ``wrapper``'s model."""
    out = {}
    for name, layer in lora_layers(wrapper.model):
        if adapter in layer.ranks:
            lora_A, lora_B = (p.detach().double() for p in layer.adapter_parameters(adapter))
            out[name] = layer.scalings[adapter] * lora_B @ lora_A
    return out


def _result_deltas(result) -> dict[str, torch.Tensor]:
    return {
        name: result.scale_for(name) * lora_B.double() @ lora_A.double()
        for name, (lora_A, lora_B) in result.factors.items()
    }


# ------------------------------------------------------------- adapters of different bases


def test_layer_containers_are_the_prefixes_before_the_first_number():
    names = ["model.layers.3.self_attn.q_proj", "transformer.h.0.attn.c_attn", "lm_head"]
    assert layer_containers(names) == {"model.layers", "transformer.h"}
    assert layer_containers(["lm_head", "model.embed_tokens"]) == frozenset()


def test_adapters_of_different_bases_sharing_no_module_are_warned_about(tmp_path, capsys):
    llama_dir, _ = _saved(
        tmp_path, "llama", llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    gpt2_dir, _ = _saved(
        tmp_path, "gpt2", gpt2(), lorakit.LoraConfig(r=4, target_modules=["c_attn"])
    )
    with pytest.warns(UserWarning, match="different base models") as caught:
        lorakit.combine([llama_dir, gpt2_dir])
    message = str(caught[0].message)
    assert "model.layers" in message and "transformer.h" in message
    assert str(llama_dir) in message and str(gpt2_dir) in message
    capsys.readouterr()
    output = tmp_path / "out"
    with pytest.warns(UserWarning, match="different base models"):
        assert main(["combine", str(llama_dir), str(gpt2_dir), "--output", str(output)]) == 0


def test_adapters_of_one_base_with_disjoint_targets_still_combine(tmp_path):
    """q_proj only and v_proj only share the stack ``model.layers``; an lm_head-only adapter
    has no stack and combines with either: each module's update is its own adapter's, weighted."""
    q_dir, q_model = _saved(
        tmp_path, "q", llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"])
    )
    v_dir, v_model = _saved(
        tmp_path, "v", llama(), lorakit.LoraConfig(r=2, target_modules=["v_proj"]), seed=4
    )
    head_dir, head_model = _saved(
        tmp_path, "head", llama(), lorakit.LoraConfig(r=2, target_modules=["lm_head"]), seed=5
    )
    expected = {}
    for wrapper, weight in ((q_model, 0.7), (v_model, -0.4), (head_model, 1.5)):
        expected |= {n: weight * d for n, d in _deltas(wrapper, "default").items()}
    result = lorakit.combine([q_dir, v_dir, head_dir], [0.7, -0.4, 1.5])
    got = _result_deltas(result)
    assert got.keys() == expected.keys() and "lm_head" in got
    for name, delta in expected.items():
        torch.testing.assert_close(got[name], delta, rtol=1e-5, atol=1e-7)
    pair = _result_deltas(lorakit.combine([q_dir, head_dir], [1.0, 1.0]))
    assert set(pair) == set(_deltas(q_model, "default")) | {"lm_head"}


def _updates(label, modules, base=None, on_model=False) -> AdapterUpdates:
    factors = ModuleFactors(torch.zeros(2, 8), torch.zeros(8, 2), 1.0, False)
    config = lorakit.LoraConfig(r=2, target_modules=["q"], base_model_name_or_path=base)
    return AdapterUpdates(label, config, dict.fromkeys(modules, factors), None, on_model=on_model)


def test_stacks_of_one_base_link_through_a_shared_module_a_base_name_or_the_model():
    """An encoder's and a decoder's adapter of one model (disjoint stacks) are warned about
    alone, and combine silently when a third input links them, when both name the same base
    model, when both are on the model, or when every module of both is one of the model's."""
    encoder, decoder = ["encoder.block.0.q", "encoder.block.1.q"], ["decoder.block.0.q"]
    with pytest.warns(UserWarning, match=r"encoder\.block.*decoder\.block"):
        check_compatible([_updates("enc", encoder), _updates("dec", decoder)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_compatible(
            [
                _updates("enc", encoder),
                _updates("dec", decoder),
                _updates("both", encoder + decoder),
            ]
        )
        check_compatible(
            [_updates("enc", encoder, "t5-small"), _updates("dec", decoder, "t5-small")]
        )
        check_compatible(
            [_updates("enc", encoder, on_model=True), _updates("dec", decoder, on_model=True)]
        )
        pair = [_updates("enc", encoder), _updates("dec", decoder, on_model=True)]
        check_compatible(pair, model_modules=[*encoder, *decoder, "lm_head"])
    with pytest.warns(UserWarning, match="different base models"):
        check_compatible([_updates("enc", encoder, "t5-small"), _updates("dec", decoder, "t5")])
    with pytest.warns(UserWarning, match="different base models"):  # not all in the model
        check_compatible(
            [_updates("enc", encoder), _updates("dec", decoder)], model_modules=encoder
        )


def test_peft_encoder_and_decoder_adapters_of_one_t5_combine(tmp_path):
    """PEFT writes base_model_name_or_path None for a model built from a config; its encoder
    and decoder adapters combine as PEFT combines them (a warning without the model, none with
    it), and the result is the sum of the two updates."""
    import peft
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=64,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
    )
    base = T5ForConditionalGeneration(config).eval()
    directories = []
    for part in ("encoder", "decoder"):
        targets = [f"{part}.block.0.layer.0.SelfAttention.q"]
        wrapped = peft.get_peft_model(
            copy.deepcopy(base),
            peft.LoraConfig(r=2, target_modules=targets, init_lora_weights=False),
        )
        directory = tmp_path / part
        wrapped.save_pretrained(directory)
        directories.append(str(directory))
    with pytest.warns(UserWarning, match="different base models"):
        lorakit.combine(directories)
    model = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = lorakit.combine(directories, model=model)
    assert {name.split(".")[0] for name in _result_deltas(result)} == {"encoder", "decoder"}


# ------------------------------------------------------------- PeftModel.add_weighted_adapter


def _front_door():
    wrapper = lorakit.get_peft_model(
        llama(), lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), "a"
    )
    wrapper.add_adapter("b", lorakit.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"]))
    randomize_adapters(wrapper.model, std=0.2)
    return wrapper


def test_signature_is_peft_s_and_positional_calls_work():
    import peft

    ours = inspect.signature(lorakit.PeftModel.add_weighted_adapter).parameters
    theirs = inspect.signature(peft.LoraModel.add_weighted_adapter).parameters
    positional = [n for n, p in ours.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == list(theirs)
    assert all(ours[n].default == theirs[n].default for n in theirs)
    assert ours["seed"].kind is inspect.Parameter.KEYWORD_ONLY
    wrapper = _front_door()
    args = (["a", "b"], [0.6, 0.5], "m", "ties_svd", 3, None, True, None, 0.5, "frequency")
    wrapper.add_weighted_adapter(*args)
    wrapper.add_weighted_adapter(
        ["a", "b"],
        [0.6, 0.5],
        "k",
        combination_type="ties_svd",
        svd_rank=3,
        density=0.5,
        majority_sign_method="frequency",
    )
    positional_deltas, keyword_deltas = _deltas(wrapper, "m"), _deltas(wrapper, "k")
    assert positional_deltas.keys() == keyword_deltas.keys() == _deltas(wrapper, "a").keys()
    for name, delta in keyword_deltas.items():
        assert torch.equal(positional_deltas[name], delta), name
    assert all(layer.ranks["m"] == 3 for _, layer in lora_layers(wrapper.model))
    with pytest.raises(TypeError):
        wrapper.add_weighted_adapter(
            *args[:2], "x", "dare_ties_svd", 3, None, True, None, 0.5, "total", 1
        )


def test_dare_seed_is_keyword_only_and_reaches_the_masks():
    wrapper = _front_door()
    for name, seed in (("s1", 1), ("s1again", 1), ("s2", 2)):
        wrapper.add_weighted_adapter(
            ["a", "b"], [1.0, 1.0], name, "dare_linear_svd", 4, density=0.5, seed=seed
        )
    first, again, other = (_deltas(wrapper, n) for n in ("s1", "s1again", "s2"))
    name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(first[name], again[name]) and not torch.equal(first[name], other[name])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (dict(weights=[1.0]), "2 adapters but 1 weights"),
        (dict(combination_type="ties_svd"), "needs density"),
        (dict(combination_type="ties_svd", density=1.5), "needs density"),
        (dict(weights=[1.0, float("nan")]), "finite"),
        (dict(combination_type="svd", svd_rank=0), "positive integer"),
    ],
)
def test_every_refusal_of_the_peft_entry_point_is_a_value_error(call, match):
    wrapper = _front_door()
    arguments = {"weights": [0.5, 0.5], "combination_type": "svd"} | call
    with pytest.raises(ValueError, match=match) as refused:
        wrapper.add_weighted_adapter(["a", "b"], adapter_name="m", **arguments)
    assert isinstance(refused.value, PeftArgumentError) and isinstance(refused.value, UserError)
    assert sorted(wrapper.peft_config) == ["a", "b"]
    with pytest.raises(ValueError, match="1 adapters but 2 weights"):  # one adapter too
        wrapper.add_weighted_adapter(["a"], [0.5, 0.5], "one")


def test_user_error_is_still_not_a_value_error():
    """Only the PEFT-named entry point converts: ``UserError`` keeps its base classes."""
    assert not issubclass(UserError, ValueError)
    with pytest.raises(UserError) as refused:
        lorakit.combine(["a", "b"], [1.0], model=_front_door())
    assert not isinstance(refused.value, ValueError)


# ------------------------------------------------------------- a misspelled name with model=


def test_a_misspelled_adapter_name_with_a_model_says_both_readings():
    wrapper = _front_door()
    with pytest.raises(AdapterFileError) as refused:
        lorakit.combine(["a", "bb"], model=wrapper)
    message = str(refused.value)
    assert "'bb' is neither an adapter on the model" in message
    assert "'a', 'b'" in message and "nor an existing adapter directory" in message
    assert "does not exist" not in message


def test_directories_still_combine_with_a_model(tmp_path):
    wrapper = _front_door()
    wrapper.save_pretrained(tmp_path / "saved", selected_adapters=["a"])
    directory = next(p.parent for p in (tmp_path / "saved").rglob("adapter_config.json"))
    result = lorakit.combine(["b", directory], [1.0, -1.0], model=wrapper)
    expected = _deltas(wrapper, "b")
    for name, delta in _deltas(wrapper, "a").items():
        expected[name] = expected.get(name, 0) - delta
    for name, delta in _result_deltas(result).items():
        torch.testing.assert_close(delta, expected[name], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------- PEFT's rsLoRA-first scaling


def _copy_to_peft(ours, real, adapters) -> None:
    with torch.no_grad():
        for name, layer in lora_layers(ours.model):
            peft_layer = real.base_model.model.get_submodule(name)
            for adapter in adapters:
                if adapter in layer.ranks:
                    lora_A, lora_B = layer.adapter_parameters(adapter)
                    peft_layer.lora_A[adapter].weight.copy_(lora_A)
                    peft_layer.lora_B[adapter].weight.copy_(lora_B)


def test_peft_scales_svd_and_one_adapter_by_sqrt_rank_when_the_first_uses_rslora():
    """docs/combining.md: with an rsLoRA adapter first, PEFT before 0.22 made ``svd`` √svd_rank
    and its one-adapter result √r times the exact one (0.22 writes ``use_rslora=False`` into
    the new adapter: exact); lorakit's are exact."""
    import peft

    rs = {"r": 6, "lora_alpha": 3, "use_rslora": True, "target_modules": ["q_proj"]}
    plain = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    ours = lorakit.get_peft_model(llama(), lorakit.LoraConfig(**rs), "rs")
    ours.add_adapter("plain", lorakit.LoraConfig(**plain))
    randomize_adapters(ours.model, std=0.2)
    real = peft.get_peft_model(llama(), peft.LoraConfig(**rs), "rs")
    real.add_adapter("plain", peft.LoraConfig(**plain))
    _copy_to_peft(ours, real, ("rs", "plain"))
    cases = [
        ("svd", ["rs", "plain"], [0.7, -0.4], {"svd_rank": 16}, 16**0.5),
        ("one", ["rs"], [-0.5], {"combination_type": "ties", "density": 0.2}, 6**0.5),
    ]
    rs_deltas, plain_deltas = _deltas(ours, "rs"), _deltas(ours, "plain")
    for new, adapters, weights, options, factor in cases:
        ours.add_weighted_adapter(adapters, weights, new, **options)
        real.add_weighted_adapter(adapters, weights, new, **options)
        for name, delta in _deltas(ours, new).items():
            parts = (rs_deltas[name], plain_deltas[name])[: len(adapters)]
            exact = sum(w * d for w, d in zip(weights, parts, strict=True))
            torch.testing.assert_close(delta, exact, rtol=1e-5, atol=1e-7)
            peft_delta = real.base_model.model.get_submodule(name).get_delta_weight(new).double()
            scaled = factor if peft_scales_rslora_combinations() else 1.0
            torch.testing.assert_close(peft_delta, scaled * exact, rtol=1e-4, atol=1e-6)
